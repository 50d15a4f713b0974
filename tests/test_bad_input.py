"""Bad input: a one-line error naming the file and position or key, exit 2, nothing left behind."""

from __future__ import annotations

import json

import pytest

from conftest import run_stage
from helpers import a, q, write_posts


def _params(tmp_path, source, **extra):
    return {"data": {"source": str(source), "out": str(tmp_path / "prepared"),
                     "metrics": str(tmp_path / "metrics" / "data.json"), **extra}}


def _assert_clean_failure(proc, tmp_path, *fragments):
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ")
    for frag in fragments:
        assert frag in lines[0], (frag, lines[0])
    # Nothing a later stage could take for valid, and no scratch left beside it.
    assert not (tmp_path / "prepared").exists()
    assert not (tmp_path / "metrics" / "data.json").exists()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".prepared")]


def _good_rows():
    return [q(1, "How do I brew?", accepted=2), a(2, 1, "<p>Like this, carefully.</p>", 3),
            q(3, "Why is it flat?"), a(4, 3, "<p>Not enough sugar.</p>", 1)]


@pytest.mark.parametrize("workers", [0, 2])
def test_truncated_xml(tmp_path, workers):
    path = write_posts(tmp_path / "raw" / "Posts.xml", _good_rows() * 1)
    path.write_bytes(path.read_bytes()[:-40])  # cut inside the last row
    proc = run_stage("data", _params(tmp_path, path, workers=workers), tmp_path)
    _assert_clean_failure(proc, tmp_path, str(path), "line ")


@pytest.mark.parametrize("workers", [0, 2])
def test_malformed_xml_names_line(tmp_path, workers):
    rows = [q(i, f"Question number {i}?") if i % 2 else a(i, i - 1, "<p>an answer here</p>", 1) for i in range(1, 400)]
    assert rows[298]["PostTypeId"] == 1  # line 301 of the file: a question, which has a Title
    path = write_posts(tmp_path / "raw" / "Posts.xml", rows)
    lines = path.read_bytes().split(b"\r\n")
    assert lines[300].startswith(b"  <row ")
    lines[300] = lines[300].replace(b'Title="', b'Title="a & b', 1)  # bare '&' in an attribute
    path.write_bytes(b"\r\n".join(lines))
    proc = run_stage("data", _params(tmp_path, path, workers=workers), tmp_path)
    _assert_clean_failure(proc, tmp_path, str(path), "line 301, column")


def test_not_a_posts_dump(tmp_path):
    path = tmp_path / "Users.xml"
    path.write_text('<?xml version="1.0" encoding="utf-8"?>\n<users>\n  <row Id="1" Reputation="1" />\n</users>\n')
    proc = run_stage("data", _params(tmp_path, path), tmp_path)
    _assert_clean_failure(proc, tmp_path, str(path), "line 2", "not <posts>")


def test_row_without_post_type(tmp_path):
    path = write_posts(tmp_path / "Posts.xml", [*_good_rows(), {"Id": 9, "Body": "x"}])
    proc = run_stage("data", _params(tmp_path, path), tmp_path)
    _assert_clean_failure(proc, tmp_path, str(path), "line 7", "PostTypeId")


def test_non_integer_id(tmp_path):
    path = write_posts(tmp_path / "Posts.xml", [*_good_rows(), {"Id": "x1", "PostTypeId": 1, "Body": "x"}])
    proc = run_stage("data", _params(tmp_path, path), tmp_path)
    _assert_clean_failure(proc, tmp_path, str(path), "line 7", "Id='x1'")


@pytest.mark.parametrize("workers", [0, 2])
def test_invalid_utf8_xml(tmp_path, workers):
    path = write_posts(tmp_path / "Posts.xml", _good_rows())
    raw = path.read_bytes().replace(b"carefully", b"careful\xff\xfely")
    path.write_bytes(raw)
    proc = run_stage("data", _params(tmp_path, path, workers=workers), tmp_path)
    _assert_clean_failure(proc, tmp_path, str(path), "line 4", "UTF-8")


def test_json_missing_field(tmp_path):
    path = tmp_path / "qa.json"
    path.write_text(json.dumps({"train": [{"Question": "q1?", "Answer": "a", "Score": 1},
                                          {"Question": "q2?", "Answer": "b"}]}))
    proc = run_stage("data", _params(tmp_path, path), tmp_path)
    _assert_clean_failure(proc, tmp_path, str(path), "train[1]", "'Score'")


def test_json_syntax_and_utf8(tmp_path):
    path = tmp_path / "qa.json"
    path.write_text('{"train": [\n  {"Question": "q", \n')
    proc = run_stage("data", _params(tmp_path, path), tmp_path)
    _assert_clean_failure(proc, tmp_path, str(path), "line 3", "invalid JSON")
    path.write_bytes(b'{"train": [{"Question": "\xff", "Answer": "a", "Score": 1}]}')
    proc = run_stage("data", _params(tmp_path, path), tmp_path)
    _assert_clean_failure(proc, tmp_path, str(path), "invalid UTF-8 at byte 25")


def test_json_wrong_shapes(tmp_path):
    path = tmp_path / "qa.json"
    for doc, frag in [({"training": []}, "'training'"), ({"train": {}}, "train: must be a list"),
                      ({"train": [{"Question": "q", "Answer": "a", "Score": "high"}]}, "train[0]: field 'Score'"),
                      ([1, 2], "top level")]:
        path.write_text(json.dumps(doc))
        proc = run_stage("data", _params(tmp_path, path), tmp_path)
        _assert_clean_failure(proc, tmp_path, str(path), frag)


def test_missing_source(tmp_path):
    proc = run_stage("data", _params(tmp_path, tmp_path / "nowhere"), tmp_path)
    _assert_clean_failure(proc, tmp_path, str(tmp_path / "nowhere"), "source not found")


def test_unknown_and_mistyped_params(tmp_path):
    path = write_posts(tmp_path / "Posts.xml", _good_rows())
    proc = run_stage("data", _params(tmp_path, path, filter={"x": 1}), tmp_path)
    _assert_clean_failure(proc, tmp_path, "params.yaml", "data.filter: unknown key")
    proc = run_stage("data", _params(tmp_path, path, split_seed="abc"), tmp_path)
    _assert_clean_failure(proc, tmp_path, "params.yaml", "data.split_seed")
    proc = run_stage("data", _params(tmp_path, path, memory_budget_mb=100, workers=4), tmp_path)
    _assert_clean_failure(proc, tmp_path, "data.memory_budget_mb")


def test_nothing_survives_filters(tmp_path):
    path = write_posts(tmp_path / "Posts.xml", _good_rows())
    proc = run_stage("data", _params(tmp_path, path, filters={"min_answer_chars": 1000}), tmp_path)
    _assert_clean_failure(proc, tmp_path, str(path), "no question survived")


def test_good_input_succeeds(tmp_path):
    path = write_posts(tmp_path / "Posts.xml", [*_good_rows(), a(5, 1, "<p>Another way to do it.</p>", 0)])
    proc = run_stage("data", _params(tmp_path, path, splits={"train": 1.0, "val": 0.0, "test": 0.0}), tmp_path)
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((tmp_path / "metrics" / "data.json").read_text())
    assert metrics["train"]["questions"] == 2 and metrics["train"]["pairs"] == 1
