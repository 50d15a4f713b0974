"""The prepared tables' layout: splits, tables, schemas and the one reader.

Kept apart from the ingestion code so training stages that read tables don't depend on (and
are not rerun for changes to) HTML cleaning or dump parsing.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from cqa_rlhf.errors import DataError

SPLITS = ("train", "val", "test")
TABLES = ("sft", "reward", "pairs", "prompts")

OUT_SCHEMAS = {
    "sft": pa.schema(
        [
            ("question_id", pa.int64()),
            ("question", pa.string()),
            ("answer_id", pa.int64()),
            ("answer", pa.string()),
            ("source", pa.string()),  # "accepted" or "top_score"
            ("site", pa.string()),  # the dump it came from (data.prepare.site_name)
        ]
    ),
    "reward": pa.schema(
        [
            ("question_id", pa.int64()),
            ("question", pa.string()),
            ("answer_id", pa.int64()),
            ("answer", pa.string()),
            ("votes", pa.float64()),  # raw Score attribute
            ("score", pa.float64()),  # votes scaled as data.score says
            ("accepted", pa.bool_()),
            ("site", pa.string()),
        ]
    ),
    "pairs": pa.schema(
        [
            ("question_id", pa.int64()),
            ("question", pa.string()),
            ("chosen_id", pa.int64()),
            ("chosen", pa.string()),
            ("rejected_id", pa.int64()),
            ("rejected", pa.string()),
            ("margin", pa.float64()),  # scaled score gap, >= 0 (0 when scores are unknown)
            ("source", pa.string()),  # "accepted" or "score"
            ("site", pa.string()),
        ]
    ),
    "prompts": pa.schema([("question_id", pa.int64()), ("question", pa.string()), ("site", pa.string())]),
}


def part_name(shard: int) -> str:
    return f"part-{shard:05d}.parquet"


def read_table(path: str | Path) -> pa.Table:
    """Read one prepared table (a directory of parts) in its canonical row order."""
    parts = sorted(Path(path).glob("part-*.parquet"))
    if not parts:
        raise DataError(f"{path}: no prepared table here (run the data stage)")
    return pa.concat_tables([pq.read_table(p) for p in parts])


def question_half(question_id: int) -> str:
    """``half_a`` or ``half_b``: a fixed split of the questions by a hash of their id, the same
    in every run (hashing evens out any pattern in the ids)."""
    digest = hashlib.blake2b(int(question_id).to_bytes(8, "big", signed=True), digest_size=1, person=b"cqa-half").digest()
    return "half_a" if digest[0] % 2 == 0 else "half_b"


def training_rows(rows: list[dict], which: str) -> list[dict]:
    """The rows of the training questions a model learns from (``train_questions``: all, half_a, half_b)."""
    return rows if which == "all" else [r for r in rows if question_half(r["question_id"]) == which]
