"""A ``datasets`` source (data.format: hf): the three common layouts, written by the test itself
with ``datasets`` (save_to_disk folders, parquet, JSON lines), mapped onto the prepared tables;
column mapping by params; a layout it cannot map refused in one line; ``cqa-rlhf fetch``."""

from __future__ import annotations

import subprocess
import sys

import datasets
import pytest

from cqa_rlhf.config import DataConfig, Filters, HFSourceConfig, SplitRatios
from cqa_rlhf.data.prepare import prepare
from cqa_rlhf.data.tables import SPLITS, TABLES, read_table
from cqa_rlhf.errors import DataError

from conftest import run_stage, stage_env

LOOSE = Filters(min_question_chars=1, min_answer_chars=5, min_answers_per_question=1)
ALL_TRAIN = SplitRatios(train=1.0, val=0.0, test=0.0)


def tables(out):
    return {s: {t: read_table(out / s / t).to_pylist() for t in TABLES} for s in SPLITS}


def pairs_of(rows):
    return sorted((r["question"], r["chosen"], r["rejected"], r["source"]) for r in rows)


def shp_dict():
    """SHP's layout: history, human_ref_A/B, labels (1: A preferred), score_A/B (upvotes)."""
    row = lambda h, a, b, label, sa, sb: {"post_id": h[:3], "history": h, "human_ref_A": a,  # noqa: E731
                                          "human_ref_B": b, "labels": label, "score_A": sa, "score_B": sb}
    return datasets.DatasetDict({
        "train": datasets.Dataset.from_list([
            row("Why is my beer flat?", "Not enough priming sugar.", "It is simply cursed.", 1, 10, 2),
            row("Why is my beer flat?", "The caps leaked the gas.", "Not enough priming sugar.", 0, 4, 10)]),
        "test": datasets.Dataset.from_list([row("What is a stout?", "Nothing at all, really.", "A dark roasted ale.", 0, 1, 9)]),
    })


def test_shp_layout_from_a_save_to_disk_folder_keeps_its_splits_and_rebuilds_pairs_from_scores(tmp_path):
    shp_dict().save_to_disk(str(tmp_path / "shp"))
    prepare(DataConfig(source=str(tmp_path / "shp"), out=str(tmp_path / "o"), filters=LOOSE, splits=ALL_TRAIN))
    t = tables(tmp_path / "o")
    assert [r["question"] for r in t["test"]["prompts"]] == ["What is a stout?"]  # the dataset's split kept
    # the scores are the answers' votes: SFT takes the top-voted, pairs come from vote gaps >= 2
    assert [(r["answer"], r["source"]) for r in t["train"]["sft"]] == [("Not enough priming sugar.", "top_score")]
    assert sorted((r["answer"], r["votes"]) for r in t["train"]["reward"]) == [
        ("It is simply cursed.", 2.0), ("Not enough priming sugar.", 10.0), ("The caps leaked the gas.", 4.0)]
    q = "Why is my beer flat?"
    assert pairs_of(t["train"]["pairs"]) == [(q, "Not enough priming sugar.", "It is simply cursed.", "score"),
                                             (q, "Not enough priming sugar.", "The caps leaked the gas.", "score"),
                                             (q, "The caps leaked the gas.", "It is simply cursed.", "score")]
    assert pairs_of(t["test"]["pairs"]) == [("What is a stout?", "A dark roasted ale.", "Nothing at all, really.", "score")]
    assert {r["site"] for r in t["train"]["prompts"]} == {"shp"}


def test_ranked_answers_layout_from_parquet_with_html_and_accepted_marks(tmp_path):
    datasets.Dataset.from_list([{"qid": 7, "question": "<p>How do I brew a <b>lager</b>?</p>", "answers": [
        {"answer_id": 1, "text": "<p>Keep it cold for weeks.</p>", "pm_score": 2, "selected": "True"},
        {"answer_id": 2, "text": "<p>Buy one instead.</p>", "pm_score": 5, "selected": "False"}]}]
    ).to_parquet(str(tmp_path / "prefs.parquet"))
    prepare(DataConfig(source=str(tmp_path / "prefs.parquet"), out=str(tmp_path / "o"), filters=LOOSE, splits=ALL_TRAIN))
    t = tables(tmp_path / "o")["train"]
    assert [r["question"] for r in t["prompts"]] == ["How do I brew a lager?"]
    assert [(r["answer"], r["source"]) for r in t["sft"]] == [("Keep it cold for weeks.", "accepted")]
    # the accepted answer is never rejected, even against a higher-voted one
    assert pairs_of(t["pairs"]) == [("How do I brew a lager?", "Keep it cold for weeks.", "Buy one instead.", "accepted")]


def test_stackllama_pairs_from_json_lines_files_named_by_split(tmp_path):
    folder = tmp_path / "pairs"
    folder.mkdir()
    row = lambda q, j, k: {"qid": 1, "question": q, "response_j": j, "response_k": k}  # noqa: E731
    datasets.Dataset.from_list([row("Q one, please?", "the good answer", "a bad answer"),
                                row("Q one, please?", "the good answer", "a worse answer"),
                                row("Q one, please?", "a bad answer", "a worse answer")]).to_json(str(folder / "train.jsonl"))
    datasets.Dataset.from_list([row("Q two, please?", "right answer", "wrong answer")]).to_json(str(folder / "test.jsonl"))
    prepare(DataConfig(source=str(folder), out=str(tmp_path / "o"), format="hf", filters=LOOSE, splits=ALL_TRAIN))
    t = tables(tmp_path / "o")
    # no scores: the most often preferred answer is the accepted one; it beats every other answer
    assert [(r["answer"], r["source"]) for r in t["train"]["sft"]] == [("the good answer", "accepted")]
    assert pairs_of(t["train"]["pairs"]) == [("Q one, please?", "the good answer", "a bad answer", "accepted"),
                                             ("Q one, please?", "the good answer", "a worse answer", "accepted")]
    assert t["train"]["reward"] == []  # no votes: nothing for the score regression
    assert [r["answer"] for r in t["test"]["sft"]] == ["right answer"]


def test_columns_and_split_names_mapped_by_params(tmp_path):
    datasets.DatasetDict({"dev": datasets.Dataset.from_list([
        {"prompt": "A renamed question?", "good": "the better answer", "bad": "the poor answer", "up": 3, "down": 0}])}
    ).save_to_disk(str(tmp_path / "renamed"))
    hf = HFSourceConfig(layout="pairs", splits={"dev": "test"}, columns={
        "question": "prompt", "chosen": "good", "rejected": "bad", "chosen_score": "up", "rejected_score": "down"})
    prepare(DataConfig(source=str(tmp_path / "renamed"), out=str(tmp_path / "o"), format="hf", hf=hf, filters=LOOSE))
    t = tables(tmp_path / "o")["test"]
    assert sorted((r["answer"], r["votes"]) for r in t["reward"]) == [("the better answer", 3.0), ("the poor answer", 0.0)]
    assert pairs_of(t["pairs"]) == [("A renamed question?", "the better answer", "the poor answer", "score")]


@pytest.mark.parametrize("case, fragments", [
    ("columns", ["[train]", "cannot map columns title, body, best", "pairs: question, response_j, response_k",
                 "labelled_pairs: history"]),
    ("label", ["[train] row 1", "labels must be 0/1 or true/false, got 2"]),
    ("split", ["split 'dev' is not train, validation or test", "data.hf.splits"]),
])
def test_a_layout_it_cannot_map_is_a_one_line_error_and_leaves_nothing(tmp_path, case, fragments):
    if case == "columns":
        ds = datasets.DatasetDict({"train": datasets.Dataset.from_list([{"title": "t", "body": "b", "best": "x"}])})
    else:
        ds = shp_dict()
        ds["train"] = ds["train"].map(lambda r, i: {"labels": 2 if i == 1 else r["labels"]}, with_indices=True)
        if case == "split":
            ds = datasets.DatasetDict({"dev": ds["test"]})
    ds.save_to_disk(str(tmp_path / "src"))
    params = {"data": {"source": str(tmp_path / "src"), "format": "hf", "out": str(tmp_path / "prepared"),
                       "metrics": str(tmp_path / "metrics" / "data.json")}}
    proc = run_stage("data", params, tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {tmp_path / 'src'}"), proc.stderr
    for frag in fragments:
        assert frag in lines[0], (frag, lines[0])
    assert not (tmp_path / "prepared").exists() and not (tmp_path / "metrics" / "data.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml", "src"]  # no scratch, no cache


def test_unknown_role_is_a_params_error():
    with pytest.raises(DataError, match="data.hf.columns: answer is not a role of layout pairs"):
        from cqa_rlhf.data.hf_source import resolve_columns
        resolve_columns(["question"], [], HFSourceConfig(layout="pairs", columns={"answer": "a"}), "src")


def test_fetch_saves_a_folder_that_prepares_as_the_files_do(tmp_path):
    shp = shp_dict()
    (tmp_path / "files").mkdir()
    for split, ds in shp.items():
        ds.to_parquet(str(tmp_path / "files" / f"{split}.parquet"))
    proc = subprocess.run([sys.executable, "-m", "cqa_rlhf.cli", "fetch", str(tmp_path / "files"), str(tmp_path / "saved")],
                          capture_output=True, text=True, env=stage_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "test 1 rows, train 2 rows" in proc.stdout
    assert datasets.load_from_disk(str(tmp_path / "saved"))["train"].column_names == shp["train"].column_names
    for name in ("files", "saved"):
        prepare(DataConfig(source=str(tmp_path / name), out=str(tmp_path / f"o_{name}"), format="hf", filters=LOOSE))
    a, b = tables(tmp_path / "o_files"), tables(tmp_path / "o_saved")
    for s in SPLITS:
        for t in TABLES:
            assert [{k: v for k, v in r.items() if k != "site"} for r in a[s][t]] == \
                   [{k: v for k, v in r.items() if k != "site"} for r in b[s][t]], (s, t)
