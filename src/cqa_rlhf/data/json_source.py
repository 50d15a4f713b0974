"""The original CQA_RLHF project's JSON layout, mapped onto the same questions/answers records.

Layout: ``{"train": [...], "test": [...]}`` (``val``/``valid``/``validation`` also accepted) with
records ``{"Question", "Answer", "Score"}`` (scored answers) or
``{"Question", "Accepted_Answer", "Answer"}`` (contrast records: accepted vs. another answer).
Questions are identified by their text; a question's records are merged, so a contrast record
yields an accepted answer (the pairs' ``chosen``) plus an unscored other answer. The file's own
train/test split is kept (val is carved out of train by the question's hash). The file is read
whole with ``json.load``: the layout is meant for prepared subsets, not full dumps.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from cqa_rlhf.data.html import html_to_text
from cqa_rlhf.errors import DataError

SPLIT_KEYS = {"train": "train", "test": "test", "val": "val", "valid": "val", "validation": "val"}
_SCORED = ("Question", "Answer", "Score")
_CONTRAST = ("Question", "Accepted_Answer", "Answer")


def is_json_source(path: Path) -> bool:
    return path.suffix.lower() == ".json"


def text_id(*parts: str) -> int:
    """Stable positive 63-bit id from text (JSON records carry no ids)."""
    h = hashlib.blake2b("\x1f".join(parts).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(h, "big") >> 1


def _load(path: Path) -> dict:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: source not found") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise DataError(f"{path}: invalid UTF-8 at byte {exc.start} (line {line})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: line {exc.lineno}, column {exc.colno}: invalid JSON: {exc.msg}") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: top level must be an object with 'train'/'test' lists")
    for key in data:
        if key not in SPLIT_KEYS:
            raise DataError(f"{path}: unknown top-level key {key!r} (expected train, val or test)")
    return data


def read_json(path: Path) -> tuple[list[tuple], list[tuple]]:
    """Questions ``(qid, text, accepted_id, split)`` and answers ``(aid, qid, text, votes)``
    from a JSON-layout file; unscored answers (contrast records) have ``votes=None``."""
    data = _load(path)
    questions: dict[int, list] = {}  # qid -> [text, accepted_id, split]
    answers: dict[int, tuple] = {}

    def add_answer(qid: int, text: str, votes: float | None) -> int:
        aid = text_id(str(qid), text)
        answers.setdefault(aid, (aid, qid, text, votes))
        return aid

    for split_key, records in data.items():
        split = SPLIT_KEYS[split_key]
        if not isinstance(records, list):
            raise DataError(f"{path}: {split_key}: must be a list of records")
        for i, rec in enumerate(records):
            where = f"{path}: {split_key}[{i}]"
            if not isinstance(rec, dict):
                raise DataError(f"{where}: record must be an object")
            fields = _CONTRAST if "Accepted_Answer" in rec else _SCORED
            for f in fields:
                if f not in rec:
                    raise DataError(f"{where}: missing field {f!r} (record needs {', '.join(fields)})")
            for f in fields:
                if f != "Score" and not isinstance(rec[f], str):
                    raise DataError(f"{where}: field {f!r} must be a string")
            question = html_to_text(rec["Question"])
            qid = text_id(question)
            entry = questions.setdefault(qid, [question, None, split])
            if fields is _SCORED:
                score = rec["Score"]
                if isinstance(score, bool) or not isinstance(score, (int, float)):
                    raise DataError(f"{where}: field 'Score' must be a number, got {score!r}")
                add_answer(qid, html_to_text(rec["Answer"]), float(score))
            else:
                acc = add_answer(qid, html_to_text(rec["Accepted_Answer"]), None)
                if entry[1] is None:
                    entry[1] = acc
                add_answer(qid, html_to_text(rec["Answer"]), None)
    return [(qid, *v) for qid, v in questions.items()], list(answers.values())
