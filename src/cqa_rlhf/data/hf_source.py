"""Preference data in the Hugging Face ``datasets`` format, mapped onto the same questions/answers
records as a Stack Exchange dump (``data.format: hf``; the layout and columns in ``data.hf``).

Where it is read from (``data.source``): a ``save_to_disk`` folder (a ``DatasetDict`` or one
``Dataset``), a parquet/JSON-lines/CSV file or a folder of them (a file whose name starts with a
split name, ``train``/``validation``/``test``, is that split), or ``hf://<owner>/<name>`` from the
Hub where there is network (DVC cannot track a Hub id: ``cqa-rlhf fetch`` saves it to a folder
once, then that folder is the source).

Three layouts, each a set of roles a column plays (``data.hf.columns`` renames any of them):

- ``pairs`` (the StackLLaMA pairs): question, chosen, rejected (``response_j`` beats
  ``response_k``); optional chosen_score, rejected_score.
- ``labelled_pairs`` (SHP): question, answer_a, answer_b, label (1: A preferred, 0: B); optional
  score_a, score_b (``score_A``/``score_B``, the answers' upvotes).
- ``ranked_answers`` (the Stack Exchange preferences): question, answers (a list of structs with
  the fields answer_text, answer_score and answer_accepted: ``text``, ``pm_score``, ``selected``).

Questions are identified by their text; all rows of a question merge into one question with its
distinct answers. Scores become the answers' votes, so the project's own rules (``data.pairs``)
rebuild the pairs; without scores, a question's most often preferred answer (ties: the first) is
its accepted answer. A dataset's own splits are kept (other split names: ``data.hf.splits``).
"""

from __future__ import annotations

import collections
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from cqa_rlhf.config import HFSourceConfig
from cqa_rlhf.data.html import html_to_text
from cqa_rlhf.data.json_source import SPLIT_KEYS, text_id
from cqa_rlhf.errors import DataError

HUB = "hf://"
FILE_BUILDERS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".csv": "csv"}
# layout -> (required roles, optional roles), each role -> its default column (or struct field)
LAYOUTS: dict[str, tuple[dict[str, str], dict[str, str]]] = {
    "pairs": ({"question": "question", "chosen": "response_j", "rejected": "response_k"},
              {"chosen_score": "score_j", "rejected_score": "score_k"}),
    "labelled_pairs": ({"question": "history", "answer_a": "human_ref_A", "answer_b": "human_ref_B", "label": "labels"},
                       {"score_a": "score_A", "score_b": "score_B"}),
    "ranked_answers": ({"question": "question", "answers": "answers", "answer_text": "text"},
                       {"answer_score": "pm_score", "answer_accepted": "selected"}),
}
NESTED = {"answer_text", "answer_score", "answer_accepted"}  # fields of the answers' structs


def hub_id(source: str | Path) -> str | None:
    """``owner/name`` of a Hub source (``hf://owner/name``; a Path keeps one slash), else None."""
    text = str(source)
    for prefix in (HUB, "hf:/"):
        if text.startswith(prefix):
            return text[len(prefix):]
    return None


def is_saved_dataset(path: Path) -> bool:
    """A folder ``save_to_disk`` wrote (a DatasetDict's or one Dataset's)."""
    return path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file())


def is_hf_source(path: Path) -> bool:
    """A Hub id, a ``save_to_disk`` folder, or a parquet/JSON-lines file (a ``.json`` file is the
    original project's layout unless ``data.format: hf`` says otherwise)."""
    if hub_id(path) is not None or is_saved_dataset(path):
        return True
    return not path.is_dir() and path.suffix.lower() in (".parquet", ".jsonl")


def load_splits(source: str | Path, cfg: HFSourceConfig, cache_dir: Path) -> dict[str, object]:
    """Split name -> ``datasets.Dataset`` (``"unsplit"`` for a dataset without splits)."""
    import datasets

    datasets.disable_progress_bars()  # the stage's log stays one line per stage
    repo = hub_id(source)
    if repo is not None:
        loaded = datasets.load_dataset(repo, revision=cfg.revision, cache_dir=str(cache_dir))
    else:
        path = Path(source)
        if not path.exists():
            raise DataError(f"{path}: source not found")
        if is_saved_dataset(path):
            loaded = datasets.load_from_disk(str(path))
        else:
            loaded = load_files(path, cache_dir)
    return dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {"unsplit": loaded}


def load_files(path: Path, cache_dir: Path):
    """A data file, or a folder of them, as a DatasetDict (splits from the files' names)."""
    import datasets

    files = sorted(p for p in (path.iterdir() if path.is_dir() else [path]) if p.suffix.lower() in FILE_BUILDERS)
    builders = {FILE_BUILDERS[p.suffix.lower()] for p in files}
    if len(builders) != 1:
        raise DataError(f"{path}: expected parquet, JSON-lines or CSV files of one kind, found "
                        f"{', '.join(sorted(p.name for p in files)) or 'none'}")
    by_split: dict[str, list[str]] = collections.defaultdict(list)
    for p in files:
        split = next((s for s in ("train", "validation", "valid", "val", "test") if p.name.lower().startswith(s)), "unsplit")
        by_split[split].append(str(p))
    try:
        return datasets.load_dataset(builders.pop(), data_files=dict(by_split), cache_dir=str(cache_dir))
    except (ValueError, OSError) as exc:  # pyarrow's and datasets' parse errors
        raise DataError(f"{path}: cannot read as a dataset: {str(exc).splitlines()[0]}") from None


def resolve_columns(columns: list[str], fields: list[str], cfg: HFSourceConfig, where: str) -> tuple[str, dict[str, str]]:
    """The layout (``cfg.layout`` or the one whose default columns are all there) and each role's
    column; one-line error naming the columns when the dataset cannot be mapped."""
    candidates = [cfg.layout] if cfg.layout != "auto" else list(LAYOUTS)
    for layout in candidates:
        required, optional = LAYOUTS[layout]
        unknown = sorted(set(cfg.columns) - set(required) - set(optional))
        if unknown and cfg.layout != "auto":
            raise DataError(f"{where}: data.hf.columns: {', '.join(unknown)} is not a role of layout {layout} "
                            f"(roles: {', '.join([*required, *optional])})")
        roles = {**required, **optional, **cfg.columns}
        present = lambda role: roles[role] in (fields if role in NESTED else columns)  # noqa: E731
        if all(present(r) for r in required):
            return layout, {r: c for r, c in roles.items() if present(r)}
    wanted = "; ".join(f"{name}: {', '.join(cfg.columns.get(r, c) for r, c in req.items())}"
                       for name, (req, _) in LAYOUTS.items() if name in candidates)
    raise DataError(f"{where}: cannot map columns {', '.join(columns)} to a layout ({wanted}); "
                    "set data.hf.layout and data.hf.columns")


def struct_fields(ds, column: str | None) -> list[str]:
    """The field names of a list-of-structs column (the ranked answers), else []."""
    feature = ds.features.get(column) if column else None
    inner = getattr(feature, "feature", None) or (feature[0] if isinstance(feature, list) and feature else None)
    return list(inner) if isinstance(inner, dict) else []


class Records:
    """Questions and answers merged by text: ``questions`` (qid, text, accepted_id, split) and
    ``answers`` (aid, qid, text, votes), as json_source.read_json returns them."""

    def __init__(self) -> None:
        self.questions: dict[int, list] = {}  # qid -> [text, accepted_id, split]
        self.answers: dict[int, tuple] = {}
        self.preferred: dict[int, collections.Counter] = collections.defaultdict(collections.Counter)

    def question(self, text: str, split: str | None) -> int:
        qid = text_id(text)
        self.questions.setdefault(qid, [text, None, split])
        return qid

    def answer(self, qid: int, text: str, votes: float | None, preferred: bool = False, accepted: bool = False) -> int:
        aid = text_id(str(qid), text)
        self.answers.setdefault(aid, (aid, qid, text, votes))
        if preferred:
            self.preferred[qid][aid] += 1
        if accepted and self.questions[qid][1] is None:
            self.questions[qid][1] = aid
        return aid

    def result(self) -> tuple[list[tuple], list[tuple]]:
        """An unscored question's most often preferred answer (ties: the first) is its accepted one."""
        scored = {a[1] for a in self.answers.values() if a[3] is not None}
        for qid, wins in self.preferred.items():
            if self.questions[qid][1] is None and qid not in scored:
                self.questions[qid][1] = wins.most_common(1)[0][0]
        return [(qid, *v) for qid, v in self.questions.items()], list(self.answers.values())


def text(value: object, where: str, role: str) -> str:
    if not isinstance(value, str):
        raise DataError(f"{where}: {role} must be text, got {type(value).__name__}")
    return html_to_text(value)


def number(value: object, where: str, role: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise DataError(f"{where}: {role} must be a number, got {value!r}")
    return float(value)


def flag(value: object, where: str, role: str) -> bool:
    """A 0/1 label or accepted mark (bool, 0/1, or the strings True/False)."""
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    if isinstance(value, (bool, int)) and value in (0, 1):
        return bool(value)
    raise DataError(f"{where}: {role} must be 0/1 or true/false, got {value!r}")


def add_row(records: Records, row: dict, layout: str, cols: dict[str, str], split: str | None, where: str) -> None:
    """One dataset row into ``records`` by its layout."""
    qid = records.question(text(row[cols["question"]], where, cols["question"]), split)
    score = lambda role: number(row[cols[role]], where, cols[role]) if role in cols else None  # noqa: E731
    if layout == "pairs":
        records.answer(qid, text(row[cols["chosen"]], where, cols["chosen"]), score("chosen_score"), preferred=True)
        records.answer(qid, text(row[cols["rejected"]], where, cols["rejected"]), score("rejected_score"))
    elif layout == "labelled_pairs":
        a_wins = flag(row[cols["label"]], where, cols["label"])
        records.answer(qid, text(row[cols["answer_a"]], where, cols["answer_a"]), score("score_a"), preferred=a_wins)
        records.answer(qid, text(row[cols["answer_b"]], where, cols["answer_b"]), score("score_b"), preferred=not a_wins)
    else:
        for k, ans in enumerate(row[cols["answers"]] or []):
            at = f"{where}: {cols['answers']}[{k}]"
            records.answer(qid, text(ans.get(cols["answer_text"]), at, cols["answer_text"]),
                           number(ans.get(cols["answer_score"]), at, cols["answer_score"]) if "answer_score" in cols else None,
                           accepted="answer_accepted" in cols and flag(ans.get(cols["answer_accepted"]), at, cols["answer_accepted"]))


def split_hint(name: str, cfg: HFSourceConfig, where: str) -> str | None:
    """The project split a dataset split goes to (None: split by the question's hash)."""
    if name in cfg.splits:
        return cfg.splits[name]
    if name == "unsplit":
        return None
    if name not in SPLIT_KEYS:
        raise DataError(f"{where}: split {name!r} is not train, validation or test; map it in data.hf.splits")
    return SPLIT_KEYS[name]


def rows(ds, batch_size: int = 1000) -> Iterator[dict]:
    for batch in ds.iter(batch_size=batch_size):
        names = list(batch)
        for values in zip(*(batch[n] for n in names)):
            yield dict(zip(names, values))


def read_hf(source: str | Path, cfg: HFSourceConfig, scratch: Path) -> tuple[list[tuple], list[tuple]]:
    """Questions ``(qid, text, accepted_id, split)`` and answers ``(aid, qid, text, votes)`` of a
    ``datasets`` source; ``scratch`` holds datasets' conversion cache while it reads."""
    cache = Path(tempfile.mkdtemp(prefix=".hf-cache-", dir=scratch))
    try:
        splits, records = load_splits(source, cfg, cache), Records()
        for name, ds in sorted(splits.items()):
            where = f"{source} [{name}]"
            hint = split_hint(name, cfg, where)
            nested = cfg.columns.get("answers", "answers")
            layout, cols = resolve_columns(list(ds.column_names), struct_fields(ds, nested), cfg, where)
            for i, row in enumerate(rows(ds)):
                add_row(records, row, layout, cols, hint, f"{where} row {i}")
        return records.result()
    finally:
        shutil.rmtree(cache, ignore_errors=True)
