"""The data stage's tables: hand-computed cases, split hygiene, sharding invariance, real dumps."""

from __future__ import annotations

import json
import math

import pyarrow as pa
import pytest

from cqa_rlhf.config import DataConfig, Filters, PairsConfig, ScoreScaling, SplitRatios
from cqa_rlhf.data.prepare import normalize_scores, prepare, scale_score, split_of
from cqa_rlhf.data.tables import SPLITS, TABLES, read_table
from cqa_rlhf.errors import DataError

from helpers import a, q, write_posts

ALL_TRAIN = SplitRatios(train=1.0, val=0.0, test=0.0)
LOOSE = Filters(min_question_chars=1, min_answer_chars=5, min_answers_per_question=1)


def hand_dump(path):
    return write_posts(path / "Posts.xml", [
        q(1, "How do I brew a lager?", accepted=2),
        a(2, 1, "<p>Accepted: keep it cold.</p>", 1),
        a(3, 1, "<p>Use <b>lager</b> yeast.</p>", 5),
        a(4, 1, "<p>Ferment at ten degrees.</p>", 5),
        a(5, 1, "<p>Just buy one, honestly.</p>", -2),
        a(15, 1, "<p>use LAGER   yeast.</p>", 3),  # same text as answer 3 once normalised
        q(6, "Why is my beer flat?"),  # no accepted answer
        a(7, 6, "<p>No carbonation sugar.</p>", 3),
        a(8, 6, "<p>The cap leaked air.</p>", 3),
        a(9, 6, "<p>Too cold to condition.</p>", 0),
        q(10, "What is a porter?", accepted=99),  # accepted answer missing from the dump
        a(11, 10, "<p>A dark beer style.</p>", 2),
        q(12, "Empty answers only?"),
        a(13, 12, "", 1),  # empty body: filtered by length
        a(14, 1000, "<p>Answer to a deleted question.</p>", 4),  # orphan
        {"Id": 16, "PostTypeId": 4, "Body": "<p>tag wiki</p>", "Score": 0},
        {"Id": 17, "PostTypeId": 5, "Body": "", "Score": 0},
    ])


def tables(out):
    return {s: {t: read_table(out / s / t).to_pylist() for t in TABLES} for s in SPLITS}


def test_hand_computed_tables(tmp_path):
    hand_dump(tmp_path / "raw")
    cfg = DataConfig(source=str(tmp_path / "raw"), out=str(tmp_path / "out"), splits=ALL_TRAIN, filters=LOOSE,
                     score=ScoreScaling(transform="raw"), pairs=PairsConfig(min_score_gap=2))
    res = prepare(cfg)
    t = tables(tmp_path / "out")["train"]
    order = [r["question_id"] for r in t["prompts"]]
    assert sorted(order) == [1, 6, 10]  # 12 lost its only answer to the length filter
    sft = {r["question_id"]: (r["answer_id"], r["source"]) for r in t["sft"]}
    assert sft == {1: (2, "accepted"), 6: (7, "top_score"), 10: (11, "top_score")}  # tie 7/8: earliest
    reward = {(r["question_id"], r["answer_id"]): (r["votes"], r["score"], r["accepted"]) for r in t["reward"]}
    assert reward == {(1, 2): (1.0, 1.0, True), (1, 3): (5.0, 5.0, False), (1, 4): (5.0, 5.0, False),
                      (1, 5): (-2.0, -2.0, False), (6, 7): (3.0, 3.0, False), (6, 8): (3.0, 3.0, False),
                      (6, 9): (0.0, 0.0, False), (10, 11): (2.0, 2.0, False)}
    pairs = [(r["question_id"], r["chosen_id"], r["rejected_id"], r["margin"], r["source"]) for r in t["pairs"]]
    q1 = [p for p in pairs if p[0] == 1]
    assert q1 == [(1, 2, 3, 0.0, "accepted"), (1, 2, 4, 0.0, "accepted"), (1, 2, 5, 3.0, "accepted"),
                  (1, 3, 5, 7.0, "score"), (1, 4, 5, 7.0, "score")]  # 3 vs 4: equal votes, no pair
    assert [p for p in pairs if p[0] == 6] == [(6, 7, 9, 3.0, "score"), (6, 8, 9, 3.0, "score")]
    assert not [p for p in pairs if p[0] == 10]
    first = next(r for r in t["pairs"] if r["question_id"] == 1)  # rows are ordered by hash key
    assert first["question"] == "How do I brew a lager?\n\nbody of the question"
    assert first["chosen"] == "Accepted: keep it cold." and first["rejected"] == "Use lager yeast."
    assert res.metrics["input"] == {"questions": 4, "answers": 11, "orphan_answers": 1, "duplicate_answers": 1,
                                    "filtered_questions": 1, "filtered_answers": 1}
    assert res.metrics["train"]["questions"] == 3 and res.metrics["train"]["pairs"] == 7
    assert res.metrics["val"]["questions"] == 0


def test_pair_limits_and_sources(tmp_path):
    hand_dump(tmp_path / "raw")
    base = dict(source=str(tmp_path / "raw"), splits=ALL_TRAIN, filters=LOOSE)
    prepare(DataConfig(**base, out=str(tmp_path / "o1"), pairs=PairsConfig(accepted=False, min_score_gap=3)))
    rows = read_table(tmp_path / "o1/train/pairs").to_pylist()
    by_q = {qid: [(r["chosen_id"], r["rejected_id"]) for r in rows if r["question_id"] == qid] for qid in (1, 6)}
    # Without accepted pairs votes alone decide (the accepted answer 2 may be rejected), largest gap
    # first: 5 vs -2 (gap 7), 5 vs 1 (gap 4), 1 vs -2 (gap 3); 3 vs 0 on question 6.
    assert by_q == {1: [(3, 5), (4, 5), (3, 2), (4, 2), (2, 5)], 6: [(7, 9), (8, 9)]}
    assert len(rows) == 7
    prepare(DataConfig(**base, out=str(tmp_path / "o2"), pairs=PairsConfig(by_score=False, max_pairs_per_question=2)))
    p2 = [(r["chosen_id"], r["rejected_id"]) for r in read_table(tmp_path / "o2/train/pairs").to_pylist()]
    assert p2 == [(2, 3), (2, 4)]


def test_min_answers_and_dedup_switch(tmp_path):
    hand_dump(tmp_path / "raw")
    base = dict(source=str(tmp_path / "raw"), splits=ALL_TRAIN)
    res = prepare(DataConfig(**base, out=str(tmp_path / "o1"),
                             filters=LOOSE.model_copy(update={"min_answers_per_question": 2})))
    assert sorted(r["question_id"] for r in read_table(tmp_path / "o1/train/prompts").to_pylist()) == [1, 6]
    res = prepare(DataConfig(**base, out=str(tmp_path / "o2"), filters=LOOSE.model_copy(update={"dedup_answers": False})))
    assert res.metrics["input"]["duplicate_answers"] == 0 and res.metrics["train"]["reward"] == 9


def test_score_scaling():
    assert scale_score(0.0, "log") == 0.0
    assert scale_score(math.e - 1, "log") == pytest.approx(1.0)
    assert scale_score(-(math.e - 1), "log") == pytest.approx(-1.0)
    assert scale_score(7.0, "raw") == 7.0
    assert normalize_scores([1.0, 3.0]) == [-1.0, 1.0]
    assert normalize_scores([2.0, 2.0, 2.0]) == [0.0, 0.0, 0.0]
    z = normalize_scores([0.0, 1.0, 5.0])
    assert sum(z) == pytest.approx(0.0) and sum(x * x for x in z) / 3 == pytest.approx(1.0)


def test_question_normalisation_end_to_end(tmp_path):
    hand_dump(tmp_path / "raw")
    prepare(DataConfig(source=str(tmp_path / "raw"), out=str(tmp_path / "o"), splits=ALL_TRAIN, filters=LOOSE,
                       score=ScoreScaling(transform="log", normalize="question")))
    rows = read_table(tmp_path / "o/train/reward").to_pylist()
    for qid in (1, 6):
        scores = [r["score"] for r in rows if r["question_id"] == qid]
        assert sum(scores) == pytest.approx(0.0, abs=1e-12)
    assert [r["score"] for r in rows if r["question_id"] == 10] == [0.0]  # a single answer


def test_split_is_a_function_of_the_question_id_only():
    cfg = DataConfig()
    from cqa_rlhf.data.prepare import hash_key
    splits = [split_of(hash_key(0, i), cfg) for i in range(20000)]
    share = {s: splits.count(s) / len(splits) for s in SPLITS}
    assert share["train"] == pytest.approx(0.9, abs=0.01) and share["test"] == pytest.approx(0.05, abs=0.01)
    assert splits == [split_of(hash_key(0, i), cfg) for i in range(20000)]
    assert splits != [split_of(hash_key(1, i), cfg) for i in range(20000)]  # split_seed matters


def test_real_dump_exact_counts_and_disjoint_splits(real_site, tmp_path):
    """beer: 663 questions, 1572 answers, 644 questions with at least one answer, 410 with an
    accepted answer (all present), no orphans -- counted independently with a regex scan."""
    cfg = DataConfig(source=str(real_site("beer")), out=str(tmp_path / "o"), filters=Filters(
        min_question_chars=0, max_question_chars=10**6, min_answer_chars=0, max_answer_chars=10**6,
        dedup_answers=False))
    m = prepare(cfg).metrics
    assert m["input"] == {"questions": 663, "answers": 1572, "orphan_answers": 0, "duplicate_answers": 0,
                          "filtered_questions": 19, "filtered_answers": 0}
    assert sum(m[s]["questions"] for s in SPLITS) == 644
    assert sum(m[s]["reward"] for s in SPLITS) == 1572
    t = tables(tmp_path / "o")
    assert sum(r["source"] == "accepted" for s in SPLITS for r in t[s]["sft"]) == 410
    ids = {s: {r["question_id"] for tab in TABLES for r in t[s][tab]} for s in SPLITS}
    assert not (ids["train"] & ids["val"]) and not (ids["train"] & ids["test"]) and not (ids["val"] & ids["test"])
    for s in SPLITS:
        for r in t[s]["pairs"]:
            assert r["margin"] >= 0 and r["chosen_id"] != r["rejected_id"]
        for r in t[s]["reward"]:
            assert r["score"] == pytest.approx(math.copysign(math.log1p(abs(r["votes"])), r["votes"]))
    votes = {r["answer_id"]: r["votes"] for s in SPLITS for r in t[s]["reward"]}
    for s in SPLITS:
        for r in t[s]["pairs"]:
            if r["source"] == "score":
                assert votes[r["chosen_id"]] - votes[r["rejected_id"]] >= 2  # equal votes never pair


@pytest.mark.parametrize("site", ["beer", "dsmeta"])
def test_sharded_parallel_run_equals_in_memory_run(real_site, tmp_path, site):
    src = str(real_site(site))
    prepare(DataConfig(source=src, out=str(tmp_path / "mem"), shards=1, workers=0))
    prepare(DataConfig(source=src, out=str(tmp_path / "par"), shards=7, workers=2))
    for s in SPLITS:
        for t in TABLES:
            assert read_table(tmp_path / "mem" / s / t).equals(read_table(tmp_path / "par" / s / t)), (s, t)
    assert len(list((tmp_path / "par/train/reward").glob("part-*.parquet"))) > 1


def test_7z_run_equals_plain_run(real_site, tmp_path):
    import py7zr
    site = real_site("dsmeta")
    archive = tmp_path / f"{site.name}.7z"  # named as published: the site name is the same
    with py7zr.SevenZipFile(archive, "w") as z:
        z.write(site / "Posts.xml", "Posts.xml")
    prepare(DataConfig(source=str(site), out=str(tmp_path / "plain")))
    prepare(DataConfig(source=str(archive), out=str(tmp_path / "7z"), shards=3, workers=2))
    for s in SPLITS:
        for t in TABLES:
            assert read_table(tmp_path / "plain" / s / t).equals(read_table(tmp_path / "7z" / s / t))


def test_empty_split_tables_keep_their_schema(tmp_path):
    hand_dump(tmp_path / "raw")
    prepare(DataConfig(source=str(tmp_path / "raw"), out=str(tmp_path / "o"), splits=ALL_TRAIN, filters=LOOSE))
    empty = read_table(tmp_path / "o/test/pairs")
    assert empty.num_rows == 0 and "margin" in empty.column_names


def test_failure_keeps_previous_output_and_leaves_no_scratch(tmp_path):
    hand_dump(tmp_path / "raw")
    cfg = DataConfig(source=str(tmp_path / "raw"), out=str(tmp_path / "o"), splits=ALL_TRAIN, filters=LOOSE)
    prepare(cfg)
    before = read_table(tmp_path / "o/train/sft")
    (tmp_path / "raw" / "Posts.xml").write_bytes((tmp_path / "raw" / "Posts.xml").read_bytes()[:-30])
    with pytest.raises(DataError):
        prepare(cfg)
    assert read_table(tmp_path / "o/train/sft").equals(before)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o", "raw"]


def test_json_layout(tmp_path):
    data = {
        "train": [
            {"Question": "How to chill beer fast?", "Answer": "Use ice water and salt.", "Score": 7},
            {"Question": "How to chill beer fast?", "Answer": "Put it in the freezer.", "Score": 2},
            {"Question": "How to chill beer fast?", "Accepted_Answer": "Use ice water and salt.",
             "Answer": "Wait an hour."},
        ],
        "test": [{"Question": "What is a stout?", "Answer": "A dark, roasted ale.", "Score": 3}],
    }
    (tmp_path / "qa.json").write_text(json.dumps(data))
    m = prepare(DataConfig(source=str(tmp_path / "qa.json"), out=str(tmp_path / "o"), filters=LOOSE,
                           splits=SplitRatios(train=1.0, val=0.0, test=0.0))).metrics
    t = tables(tmp_path / "o")
    assert [r["question"] for r in t["test"]["prompts"]] == ["What is a stout?"]  # the file's split kept
    assert [r["question"] for r in t["train"]["prompts"]] == ["How to chill beer fast?"]
    assert [r["answer"] for r in t["train"]["sft"]] == ["Use ice water and salt."]
    assert t["train"]["sft"][0]["source"] == "accepted"
    assert sorted(r["answer"] for r in t["train"]["reward"]) == ["Put it in the freezer.", "Use ice water and salt."]
    pairs = sorted((r["chosen"], r["rejected"], r["source"]) for r in t["train"]["pairs"])
    assert pairs == [("Use ice water and salt.", "Put it in the freezer.", "accepted"),
                     ("Use ice water and salt.", "Wait an hour.", "accepted")]
    assert m["input"] == {"questions": 2, "answers": 4, "orphan_answers": 0, "duplicate_answers": 0,
                          "filtered_questions": 0, "filtered_answers": 0}


def test_read_table_missing(tmp_path):
    with pytest.raises(DataError, match="no prepared table"):
        read_table(tmp_path)


def test_row_to_table_types():
    from cqa_rlhf.data.prepare import rows_to_table
    from cqa_rlhf.data.tables import OUT_SCHEMAS
    tab = rows_to_table([(1, "q", "site")], OUT_SCHEMAS["prompts"])
    assert tab.schema == OUT_SCHEMAS["prompts"] and isinstance(tab, pa.Table)


# --- several sites at once --------------------------------------------------------------------
def _rows_by_split(out, table="reward"):
    return {s: sorted((r["site"], r["question_id"], r["answer_id"]) for r in read_table(out / s / table).to_pylist())
            for s in SPLITS}


def test_a_folder_of_sites_is_each_site_split_as_alone_with_a_site_column(real_site, tmp_path):
    """beer + dsmeta from a folder holding both: every row carries its site, and each site's rows
    and splits are exactly those of the site prepared alone (splits by question, per site)."""
    root = tmp_path / "sites"
    root.mkdir()
    for name in ("beer", "dsmeta"):
        (root / real_site(name).name).symlink_to(real_site(name))
    both = prepare(DataConfig(source=str(root), out=str(tmp_path / "both"))).metrics
    combined = _rows_by_split(tmp_path / "both")
    alone_rows: dict[str, set] = {s: set() for s in SPLITS}
    alone = {}
    for name in ("beer", "dsmeta"):
        alone[name] = prepare(DataConfig(source=str(real_site(name)), out=str(tmp_path / name))).metrics
        assert both["sites"][real_site(name).name] == alone[name]
        for s, rows in _rows_by_split(tmp_path / name).items():
            assert {r[0] for r in rows} == {real_site(name).name}
            alone_rows[s] |= set(rows)
    assert {s: set(r) for s, r in combined.items()} == alone_rows
    for s in SPLITS:
        assert both[s]["questions"] == sum(m[s]["questions"] for m in both["sites"].values())
    picked = prepare(DataConfig(source=str(root), sites=[real_site("dsmeta").name], out=str(tmp_path / "one"))).metrics
    assert picked == alone["dsmeta"]  # one site picked: the single-site metrics
    assert {r[0] for rows in _rows_by_split(tmp_path / "one").values() for r in rows} == {real_site("dsmeta").name}


def test_unknown_site_is_a_one_line_error(real_site, tmp_path):
    from cqa_rlhf.errors import ConfigError

    root = tmp_path / "sites"
    root.mkdir()
    (root / "beer.stackexchange.com").symlink_to(real_site("beer"))
    with pytest.raises(ConfigError, match=r"data.sites: nope not in .*sites \(there: beer.stackexchange.com\)"):
        prepare(DataConfig(source=str(root), sites=["nope"], out=str(tmp_path / "o")))
    with pytest.raises(ConfigError, match="is one dump, not a folder of sites"):
        prepare(DataConfig(source=str(real_site("beer") / "Posts.xml"), sites=["beer"], out=str(tmp_path / "o")))
    assert not (tmp_path / "o").exists()
