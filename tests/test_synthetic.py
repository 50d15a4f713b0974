"""The embedded default site: gold on hand-computed answers, determinism, realism of votes."""

from __future__ import annotations

import pytest

from cqa_rlhf.config import DataConfig, SynthConfig
from cqa_rlhf.data.html import html_to_text
from cqa_rlhf.data.prepare import prepare
from cqa_rlhf.data.tables import SPLITS, read_table
from cqa_rlhf.data.synthetic import (
    gold,
    gold_components,
    question_entity,
    question_kind,
    text_to_html,
    write_dump,
)

HOW = "How do I sort a git branch?\n\nI have a git branch in my project and I need to sort it."
WHY = "Why does my sql cache hang forever?\n\nMy sql cache started to hang forever."
WHAT = "What is a json queue used for?\n\nI keep seeing the json queue in examples."
FILL = " This works on most systems. Make sure you test it on a copy first. It is a common source of confusion."
GOOD_HOW = "To sort a git branch, use the git cli.\n\nRun this:\n\n```\ngit-cli sort git-branch --all\n```\n\n" + FILL.strip()


def test_question_parsing():
    assert (question_kind(HOW), question_entity(HOW)) == ("how", "git branch")
    assert (question_kind(WHY), question_entity(WHY)) == ("why", "sql cache")
    assert (question_kind(WHAT), question_entity(WHAT)) == ("what", "json queue")
    assert question_kind("Is beer good?") is None and question_entity("Is beer good?") is None


def test_gold_of_a_perfect_answer_is_one():
    assert len(GOOD_HOW.split()) == 38  # 9 + 2 + 1 + 4 + 1 + 21 (FILL)
    assert gold_components(HOW, GOOD_HOW) == {"addresses": 1.0, "content": 1.0, "length": 1.0, "ending": 1.0, "clean": 1.0}
    assert gold(HOW, GOOD_HOW) == 1.0


def test_gold_hand_computed_defects():
    off_topic = GOOD_HOW.replace("git branch", "css grid")
    assert gold(HOW, off_topic) == pytest.approx(0.70)  # loses 0.30
    no_code = GOOD_HOW.split("\n\nRun this")[0] + "\n\n" + FILL.strip()  # 30 words, no code block
    assert gold(HOW, no_code) == pytest.approx(0.75)
    trailing = GOOD_HOW[: GOOD_HOW.rindex(" ")]  # cut mid-sentence
    assert gold(HOW, trailing) == pytest.approx(0.85)
    assert gold(HOW, GOOD_HOW + " Thanks!") == pytest.approx(0.85)
    assert gold(HOW, GOOD_HOW + " +1, did you ever fix this?") == pytest.approx(0.85)
    short = "Use the git branch command."  # 5 words: length 5/25; no code
    assert gold(HOW, short) == pytest.approx(0.30 + 0.15 * 5 / 25 + 0.15 + 0.15)
    long = GOOD_HOW + FILL * 10  # 38 + 210 = 248 words: length 0
    assert len(long.split()) == 248
    assert gold_components(HOW, long)["length"] == 0.0
    repeated = GOOD_HOW + " Run it again." * 3
    assert gold_components(HOW, repeated)["clean"] == 0.0
    assert gold(HOW, "") == 0.0


def test_gold_content_kinds():
    because = "A sql cache can hang forever for a simple reason. This happens because the sql cache is never closed." + FILL
    assert gold_components(WHY, because)["content"] == 1.0
    assert gold_components(HOW, because)["content"] == 0.0
    listing = "A json queue is used for several things.\n\nCommon uses are:\n\n- one thing\n- another thing"
    assert gold_components(WHAT, listing)["content"] == 1.0
    assert gold_components(WHAT, "A json queue is used for:\n\n- one thing")["content"] == 0.0  # one item


def test_gold_for_questions_without_known_entity_uses_word_overlap():
    question = "Which hops give citrus aroma in pale ales?"
    # content words: which, hops, give, citrus, aroma, pale, ales (7); answer uses 4 -> min(1, 8/7)
    assert gold_components(question, "Citra hops give pale ales their aroma.")["addresses"] == 1.0
    assert gold_components(question, "Citrus notes.")["addresses"] == pytest.approx(2 / 7)


def test_html_round_trip_of_generated_answers(tmp_path):
    cfg = SynthConfig(out=str(tmp_path), n_questions=150)
    path = write_dump(cfg)
    prepare(DataConfig(source=str(path.parent), out=str(tmp_path / "o"),
                       filters={"min_answer_chars": 0, "min_question_chars": 0}))
    rows = [r for s in SPLITS for r in read_table(tmp_path / "o" / s / "reward").to_pylist()]
    assert len(rows) > 300
    for r in rows:
        assert html_to_text(text_to_html(r["answer"])) == r["answer"]


def test_dump_is_deterministic_and_realistic(tmp_path):
    p1 = write_dump(SynthConfig(out=str(tmp_path / "a"), n_questions=400))
    p2 = write_dump(SynthConfig(out=str(tmp_path / "b"), n_questions=400))
    p3 = write_dump(SynthConfig(out=str(tmp_path / "c"), n_questions=400, seed=7))
    assert p1.read_bytes() == p2.read_bytes() != p3.read_bytes()
    raw = p1.read_bytes()
    assert raw.startswith(b"\xef\xbb\xbf<?xml") and b"\r\n" in raw and b'PostTypeId="4"' in raw
    m = prepare(DataConfig(source=str(p1.parent), out=str(tmp_path / "o"))).metrics
    assert m["input"]["orphan_answers"] == 2  # answers to deleted questions, as in real dumps
    rows = [r for s in SPLITS for r in read_table(tmp_path / "o" / s / "reward").to_pylist()]
    golds = [gold(r["question"], r["answer"]) for r in rows]
    votes = [r["votes"] for r in rows]
    n = len(rows)
    mg, mv = sum(golds) / n, sum(votes) / n
    cov = sum((g - mg) * (v - mv) for g, v in zip(golds, votes))
    corr = cov / (sum((g - mg) ** 2 for g in golds) * sum((v - mv) ** 2 for v in votes)) ** 0.5
    assert 0.6 < corr < 0.97  # votes follow gold, with noise
    assert any(v < 0 for v in votes)
    # The accepted answer is usually, not always, the gold-best one.
    best = accepted_best = 0
    by_q: dict[int, list] = {}
    for r, g in zip(rows, golds):
        by_q.setdefault(r["question_id"], []).append((g, r["accepted"]))
    for answers in by_q.values():
        if any(acc for _, acc in answers) and len(answers) > 1:
            best += 1
            top = max(g for g, _ in answers)
            accepted_best += any(acc and g == top for g, acc in answers)
    assert 0.6 < accepted_best / best < 0.98
