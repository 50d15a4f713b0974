"""Raw posts -> prepared Parquet tables (sft, reward, pairs, prompts) per split, in bounded memory.

Two passes, so peak memory is set by ``memory_budget_mb`` and not by the dump's size:

1. **Shard.** Posts stream from the reader; bodies are cleaned to text (in worker processes
   when ``workers > 0``) and each record goes to shard ``floor(key * K / 2**64)`` where
   ``key = hash64(split_seed, question_id)``. Answers carry their question's key, so a question
   and all its answers land in the same shard. Records are buffered and flushed to Parquet.
2. **Build.** Each shard is loaded alone, joined, filtered, de-duplicated and turned into the
   four tables. Shards are contiguous ranges of ``key`` and rows are sorted by ``key`` inside a
   shard, so the output is ordered by ``key`` and is identical whatever ``K`` is.

``key`` also decides the split (``key / 2**64`` against the cumulative ratios), so a question's
answers never appear in two splits and the split of a question never depends on other data.
"""

from __future__ import annotations

import hashlib
import math
import multiprocessing as mp
import multiprocessing.pool
import os
import queue
import shutil
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from cqa_rlhf.config import DataConfig
from cqa_rlhf.data.html import html_to_text
from cqa_rlhf.data.hf_source import hub_id, is_hf_source, read_hf
from cqa_rlhf.data.json_source import is_json_source, read_json
from cqa_rlhf.data.stackexchange import (
    ANSWER,
    QUESTION,
    DumpSource,
    RawPost,
    iter_posts,
    iter_posts_range,
    plan_ranges,
    resolve_dump,
)
from cqa_rlhf.data.tables import OUT_SCHEMAS, SPLITS, TABLES, part_name
from cqa_rlhf.errors import ConfigError, DataError
from cqa_rlhf.io import replace_dir
from cqa_rlhf.progress import bar

_TWO64 = float(2**64)

# Pass-1 spill records (scratch files, not outputs).
Q_SCHEMA = pa.schema(
    [
        ("key", pa.uint64()),
        ("question_id", pa.int64()),
        ("question", pa.string()),
        ("accepted_id", pa.int64()),
        ("split_hint", pa.string()),
    ]
)
A_SCHEMA = pa.schema(
    [
        ("key", pa.uint64()),
        ("answer_id", pa.int64()),
        ("question_id", pa.int64()),
        ("answer", pa.string()),
        ("votes", pa.float64()),
    ]
)

# Arrow's default jemalloc pool keeps freed memory cached where the budget cannot see it; the
# system allocator gives it back at the same speed (bench/RESULTS.md). Arrow reads this variable
# when it loads: the stage entry sets it before importing pyarrow, and spawned workers inherit it.
ARROW_POOL_ENV = ("ARROW_DEFAULT_MEMORY_POOL", "system")


def rows_to_table(rows: list[tuple], schema: pa.Schema) -> pa.Table:
    cols = list(zip(*rows))
    return pa.table([pa.array(c, type=f.type) for c, f in zip(cols, schema)], schema=schema)


def hash_key(split_seed: int, question_id: int) -> int:
    """Stable 64-bit key of a question: decides its split, shard and output order."""
    digest = hashlib.blake2b(f"{split_seed}:{question_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def question_text(title: str, body: str) -> str:
    """Question text = title + cleaned body, separated by a blank line."""
    title = " ".join(html_to_text(title).split()) if title else ""
    body = html_to_text(body)
    return f"{title}\n\n{body}" if title and body else (title or body)


def split_of(key: int, cfg: DataConfig, hint: str | None = None) -> str:
    u = key / _TWO64
    r = cfg.splits
    if hint == "test":
        return "test"
    if hint == "train":  # the JSON layout's own train split: carve val out of it
        denom = r.train + r.val
        return "val" if denom > 0 and u < r.val / denom else "train"
    if hint == "val":
        return "val"
    if u < r.train:
        return "train"
    if u < r.train + r.val:
        return "val"
    return "test"


# --------------------------------------------------------------------------------------------
# Pass 1: shard
# --------------------------------------------------------------------------------------------
class ShardWriter:
    """Buffers cleaned records and flushes them to per-shard Parquet files of one process."""

    def __init__(self, workdir: Path, n_shards: int, tag: str, flush_bytes: int) -> None:
        self.workdir, self.n_shards, self.tag, self.flush_bytes = workdir, n_shards, tag, flush_bytes
        self.q: list[list[tuple]] = [[] for _ in range(n_shards)]
        self.a: list[list[tuple]] = [[] for _ in range(n_shards)]
        self.buffered = 0
        self.writers: dict[tuple[str, int], pa.ipc.RecordBatchFileWriter] = {}

    def shard(self, key: int) -> int:
        return (key * self.n_shards) >> 64

    def add_question(self, key: int, qid: int, text: str, accepted: int | None, hint: str | None) -> None:
        self.q[self.shard(key)].append((key, qid, text, accepted, hint))
        self._grow(len(text))

    def add_answer(self, key: int, aid: int, qid: int, text: str, votes: float | None) -> None:
        self.a[self.shard(key)].append((key, aid, qid, text, votes))
        self._grow(len(text))

    def _grow(self, n: int) -> None:
        self.buffered += n + 120  # text plus per-row object overhead
        if self.buffered >= self.flush_bytes:
            self.flush()

    def flush(self) -> None:
        for kind, buffers, schema in (("q", self.q, Q_SCHEMA), ("a", self.a, A_SCHEMA)):
            for s, rows in enumerate(buffers):
                if not rows:
                    continue
                table = rows_to_table(rows, schema)
                writer = self.writers.get((kind, s))
                if writer is None:  # spill files are scratch: uncompressed Arrow IPC, fastest both ways
                    path = self.workdir / f"{kind}-{s:05d}-{self.tag}.arrow"
                    writer = self.writers[(kind, s)] = pa.ipc.new_file(path, schema)
                writer.write_table(table)
                rows.clear()
        self.buffered = 0

    def close(self) -> None:
        self.flush()
        for w in self.writers.values():
            w.close()


@dataclass
class IngestStats:
    questions: int = 0
    answers: int = 0

    def add(self, other: IngestStats) -> None:
        self.questions += other.questions
        self.answers += other.answers


def _ingest_posts(posts: Iterable[RawPost], writer: ShardWriter, split_seed: int) -> IngestStats:
    stats = IngestStats()
    for p in posts:
        if p.post_type == QUESTION:
            key = hash_key(split_seed, p.id)
            writer.add_question(key, p.id, question_text(p.title, p.body), p.accepted_answer_id, None)
            stats.questions += 1
        elif p.post_type == ANSWER:
            assert p.parent_id is not None
            key = hash_key(split_seed, p.parent_id)
            writer.add_answer(key, p.id, p.parent_id, html_to_text(p.body), float(p.score))
            stats.answers += 1
    return stats


def _worker(inbox: mp.Queue, outbox: mp.Queue, workdir: str, n_shards: int, tag: str,
            flush_bytes: int, split_seed: int) -> None:
    """Worker process: clean and shard batches of raw posts until it receives ``None``."""
    try:
        writer = ShardWriter(Path(workdir), n_shards, tag, flush_bytes)
        stats = IngestStats()
        while (batch := inbox.get()) is not None:
            stats.add(_ingest_posts(batch, writer, split_seed))
        writer.close()
        outbox.put(("ok", stats))
    except BaseException as exc:  # reported to the parent, which raises
        outbox.put(("error", f"{type(exc).__name__}: {exc}"))


def shard_records(records: tuple[list[tuple], list[tuple]], workdir: Path, n_shards: int, cfg: DataConfig,
                  flush_bytes: int) -> IngestStats:
    """Pass 1 for sources read whole into records (the original project's JSON layout, a
    ``datasets`` source): questions (qid, text, accepted_id, split), answers (aid, qid, text, votes)."""
    questions, answers = records
    writer = ShardWriter(workdir, n_shards, "w0", flush_bytes)
    for qid, text, accepted, split in questions:
        writer.add_question(hash_key(cfg.split_seed, qid), qid, text, accepted, split)
    for aid, qid, text, votes in answers:
        writer.add_answer(hash_key(cfg.split_seed, qid), aid, qid, text, votes)
    writer.close()
    return IngestStats(questions=len(questions), answers=len(answers))


def _range_worker(task: tuple) -> IngestStats:
    """Pool task: parse, clean and shard one byte range of a plain Posts.xml."""
    dump, start, end, workdir, n_shards, tag, flush_bytes, split_seed = task
    writer = ShardWriter(Path(workdir), n_shards, tag, flush_bytes)
    stats = _ingest_posts(iter_posts_range(dump, start, end), writer, split_seed)
    writer.close()
    return stats


def _batched(posts: Iterator[RawPost], size: int) -> Iterator[list[RawPost]]:
    batch: list[RawPost] = []
    for p in posts:
        batch.append(p)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def shard_dump(dump: DumpSource, workdir: Path, n_shards: int, cfg: DataConfig, workers: int,
               flush_bytes: int, get_pool: Callable[[], mp.pool.Pool] | None = None) -> IngestStats:
    """Pass 1 for a Stack Exchange dump.

    ``workers <= 1``: one process parses, cleans and shards. A plain ``Posts.xml`` with more
    workers is cut into byte ranges of whole rows, each parsed, cleaned and sharded by its own
    process (nothing is serial). A ``.7z`` stream can't be cut: this process parses it and
    ``workers`` processes clean and shard batches of rows.
    """
    ranges = plan_ranges(dump, workers) if workers >= 2 and get_pool is not None else None
    if ranges is not None:
        assert get_pool is not None
        tasks = [(dump, a, b, str(workdir), n_shards, f"r{i}", flush_bytes, cfg.split_seed)
                 for i, (a, b) in enumerate(ranges)]
        stats = IngestStats()
        for part in bar(get_pool().imap_unordered(_range_worker, tasks), f"reading {dump.label}",
                        total=len(tasks), unit="range"):
            stats.add(part)
        return stats
    posts = iter_posts(dump)
    if workers <= 1:
        writer = ShardWriter(workdir, n_shards, "w0", flush_bytes)
        stats = _ingest_posts(posts, writer, cfg.split_seed)
        writer.close()
        return stats
    with _Cleaners(workers, (str(workdir), n_shards, flush_bytes, cfg.split_seed)) as cleaners:
        for batch in _batched(posts, 1000):
            cleaners.put(batch)
        return cleaners.finish()


class _Cleaners:
    """``workers`` processes that clean and shard batches of posts this process parses. Each
    queue holds at most 2 batches per worker: the parser cannot run ahead of the cleaners by
    more than that, so memory stays bounded when parsing is the faster step. A failed worker or
    bad input stops the others at once."""

    def __init__(self, workers: int, args: tuple) -> None:
        ctx = mp.get_context("spawn")  # no fork: the parent may hold threads (7z reader)
        self.inbox: mp.Queue = ctx.Queue(maxsize=2 * workers)
        self.outbox: mp.Queue = ctx.Queue()
        workdir, n_shards, flush_bytes, split_seed = args
        self.procs = [ctx.Process(target=_worker, args=(self.inbox, self.outbox, workdir, n_shards, f"w{i}",
                                                        flush_bytes, split_seed), daemon=True)
                      for i in range(workers)]

    def __enter__(self) -> _Cleaners:
        for p in self.procs:
            p.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            for p in self.procs:  # bad input or a failed worker: stop the others now
                p.terminate()
        for p in self.procs:
            p.join(timeout=10)

    def alive_or_raise(self) -> None:
        for p in self.procs:
            if p.exitcode not in (None, 0):
                raise RuntimeError(f"prepare worker {p.name} died with exit code {p.exitcode}")

    def put(self, item: object) -> None:
        while True:  # never block forever on a queue whose consumer died
            try:
                self.inbox.put(item, timeout=1.0)
                return
            except queue.Full:
                self.alive_or_raise()

    def finish(self) -> IngestStats:
        """Tell every worker to stop, and sum what they report."""
        for _ in self.procs:
            self.put(None)
        stats, pending = IngestStats(), len(self.procs)
        while pending:
            try:
                status, payload = self.outbox.get(timeout=1.0)
            except queue.Empty:
                self.alive_or_raise()
                if all(p.exitcode == 0 for p in self.procs) and self.outbox.empty():
                    raise RuntimeError("prepare worker exited without reporting") from None
                continue
            pending -= 1
            if status != "ok":
                raise RuntimeError(f"prepare worker failed: {payload}")
            stats.add(payload)
        return stats


# --------------------------------------------------------------------------------------------
# Pass 2: build the tables from one shard
# --------------------------------------------------------------------------------------------
def scale_score(votes: float, transform: str) -> float:
    """``raw`` keeps the votes; ``log`` is sign(v) * log1p(|v|)."""
    if transform == "log":
        return math.copysign(math.log1p(abs(votes)), votes)
    return float(votes)


def normalize_scores(scores: list[float]) -> list[float]:
    """Z-score within one question (population std); all-equal scores give zeros."""
    n = len(scores)
    mean = sum(scores) / n
    std = math.sqrt(sum((x - mean) ** 2 for x in scores) / n)
    return [(x - mean) / std if std > 0 else 0.0 for x in scores]


@dataclass
class BuildStats:
    """Counters of pass 2; ``add`` merges the stats of shards built in other processes."""

    orphan_answers: int = 0
    filtered_questions: int = 0
    filtered_answers: int = 0
    duplicate_answers: int = 0
    duplicate_questions: int = 0
    counts: dict[str, dict[str, int]] = field(
        default_factory=lambda: {s: {t: 0 for t in TABLES} for s in SPLITS}
    )
    sums: dict[str, dict[str, float]] = field(
        default_factory=lambda: {s: {"question_chars": 0.0, "answer_chars": 0.0, "sft_answer_chars": 0.0}
                                 for s in SPLITS}
    )

    def add(self, other: BuildStats) -> None:
        for name in ("orphan_answers", "filtered_questions", "filtered_answers", "duplicate_answers",
                     "duplicate_questions"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for s in SPLITS:
            for k, v in other.sums[s].items():
                self.sums[s][k] += v
            for k, n in other.counts[s].items():
                self.counts[s][k] += n


def _read_shard(workdir: Path, kind: str, shard: int, schema: pa.Schema, sort_keys: list[str]) -> dict:
    """One shard's records as column lists, sorted by ``sort_keys`` (file order breaks ties)."""
    files = sorted(workdir.glob(f"{kind}-{shard:05d}-*.arrow"))
    table = pa.concat_tables([pa.ipc.open_file(f).read_all() for f in files]) if files else schema.empty_table()
    table = table.take(pc.sort_indices(table, [(k, "ascending") for k in sort_keys]))
    return {name: table.column(name).to_pylist() for name in table.column_names}


@dataclass
class _Answer:
    id: int
    text: str
    votes: float | None


def _build_task(task: tuple) -> BuildStats:
    """Pool task: build one shard's tables and write them as ``<split>/<table>/part-<shard>``."""
    workdir, out, shard, cfg, site = task
    stats = BuildStats()
    q = _read_shard(Path(workdir), "q", shard, Q_SCHEMA, ["key", "question_id"])
    a = _read_shard(Path(workdir), "a", shard, A_SCHEMA, ["key", "question_id", "answer_id"])
    rows = build_shard(q, a, cfg, stats)
    for s in SPLITS:
        for t in TABLES:
            stats.counts[s][t] += len(rows[s][t])
            if rows[s][t]:
                table = rows_to_table([(*r, site) for r in rows[s][t]], OUT_SCHEMAS[t])
                pq.write_table(table, Path(out) / s / t / part_name(shard))
    return stats


def build_shard(q: dict, a: dict, cfg: DataConfig, stats: BuildStats) -> dict[str, dict[str, list[tuple]]]:
    """Turn one shard's questions and answers (column lists sorted by key, question id[, answer
    id]) into the four tables' rows, per split. A merge-join: both inputs are in the same order."""
    f = cfg.filters
    out: dict[str, dict[str, list[tuple]]] = {s: {t: [] for t in TABLES} for s in SPLITS}
    a_key, a_qid, a_id, a_text, a_votes = a["key"], a["question_id"], a["answer_id"], a["answer"], a["votes"]
    n_a, j = len(a_id), 0
    prev_qid = None
    for i in range(len(q["question_id"])):
        key, qid = q["key"][i], q["question_id"][i]
        if qid == prev_qid:  # the same question id twice: the first row wins
            stats.duplicate_questions += 1
            continue
        prev_qid = qid
        while j < n_a and (a_key[j], a_qid[j]) < (key, qid):
            stats.orphan_answers += 1  # no question with this id in the dump
            j += 1
        answers: list[_Answer] = []
        seen_ids: set[int] = set()
        seen_texts: set[str] = set()
        while j < n_a and a_key[j] == key and a_qid[j] == qid:
            text = a_text[j]
            if a_id[j] in seen_ids:
                pass
            elif not f.min_answer_chars <= len(text) <= f.max_answer_chars:
                stats.filtered_answers += 1
            else:
                norm = " ".join(text.lower().split())
                if f.dedup_answers and norm in seen_texts:
                    stats.duplicate_answers += 1
                else:
                    seen_texts.add(norm)
                    answers.append(_Answer(a_id[j], text, a_votes[j]))
                seen_ids.add(a_id[j])
            j += 1
        question = q["question"][i]
        if not f.min_question_chars <= len(question) <= f.max_question_chars:
            stats.filtered_questions += 1
            continue
        if len(answers) < f.min_answers_per_question:
            stats.filtered_questions += 1
            continue
        split = split_of(key, cfg, q["split_hint"][i])
        _emit_question(qid, question, q["accepted_id"][i], answers, cfg, out[split], stats.sums[split])
    stats.orphan_answers += n_a - j
    return out


def _pair_indices(answers: list[_Answer], acc: int, scored: list[int], cfg: DataConfig) -> list[tuple[int, int, str]]:
    """(chosen, rejected, source) answer indices of a question's pairs, at most
    ``max_pairs_per_question``, accepted pairs first, then by vote gap. The accepted answer is
    never "rejected" while accepted pairs are on, so the two sources never contradict each
    other; equal votes never make a pair (min_score_gap >= 1)."""
    pc, ids = cfg.pairs, [x.id for x in answers]
    pairs: list[tuple[int, int, str]] = []
    if pc.accepted and acc >= 0:
        pairs.extend((acc, k, "accepted") for k in range(len(answers)) if k != acc)
    if pc.by_score:
        by_gap = []
        for c in scored:
            for r in scored:
                if c == acc and pc.accepted or (pc.accepted and r == acc):
                    continue
                gap = answers[c].votes - answers[r].votes  # type: ignore[operator]
                if gap >= pc.min_score_gap:
                    by_gap.append((-gap, ids[c], ids[r], c, r))
        by_gap.sort()
        pairs.extend((c, r, "score") for _, _, _, c, r in by_gap)
    return pairs[: pc.max_pairs_per_question]


def _emit_question(qid: int, question: str, accepted: int | None, answers: list[_Answer],
                   cfg: DataConfig, out: dict[str, list[tuple]], sums: dict[str, float]) -> None:
    ids = [x.id for x in answers]
    acc = ids.index(accepted) if accepted is not None and accepted in ids else -1
    scored = [k for k, x in enumerate(answers) if x.votes is not None]
    scores: list[float | None] = [None] * len(answers)
    if scored:
        scaled = [scale_score(answers[k].votes, cfg.score.transform) for k in scored]  # type: ignore[arg-type]
        if cfg.score.normalize == "question":
            scaled = normalize_scores(scaled)
        for k, v in zip(scored, scaled):
            scores[k] = v

    out["prompts"].append((qid, question))
    sums["question_chars"] += len(question)

    # sft: the accepted answer, else the top-voted one (ties: the earliest answer).
    if acc >= 0:
        best, source = acc, "accepted"
    else:
        best = min(scored, key=lambda k: (-answers[k].votes, ids[k])) if scored else 0  # type: ignore[operator]
        source = "top_score"
    out["sft"].append((qid, question, ids[best], answers[best].text, source))
    sums["sft_answer_chars"] += len(answers[best].text)

    # reward: every answer with a known score.
    for k in scored:
        x = answers[k]
        out["reward"].append((qid, question, x.id, x.text, x.votes, scores[k], k == acc))
        sums["answer_chars"] += len(x.text)

    # pairs: the accepted answer beats every other; higher votes beat lower by >= min_score_gap.
    for c, r, source in _pair_indices(answers, acc, scored, cfg):
        margin = 0.0
        if scores[c] is not None and scores[r] is not None:
            margin = max(0.0, scores[c] - scores[r])  # type: ignore[operator]
        out["pairs"].append((qid, question, ids[c], answers[c].text, ids[r], answers[r].text, margin, source))


# --------------------------------------------------------------------------------------------
# Orchestration
# --------------------------------------------------------------------------------------------
@dataclass
class PrepareResult:
    metrics: dict
    out: Path


PROCESS_MB = 105  # RSS of one process with pyarrow, lxml and this package loaded (~90 MB measured)
XML_TO_RAM = 7.0  # peak RAM per byte of XML while one shard is built (bench/RESULTS.md)
MIN_WORKER_MB = 48  # below this a process would flush and shard so often that it crawls


@dataclass(frozen=True)
class Plan:
    """How prepare spends ``memory_budget_mb``: processes, shards and pass-1 buffers."""

    workers: int  # 0: everything in this process; >= 2: a pool of that many processes
    shards: int
    flush_bytes: int  # pass-1 buffer of text per process before it spills to disk


def plan(size_bytes: int, cfg: DataConfig) -> Plan:
    """Fit the run in ``cfg.memory_budget_mb``: each process costs PROCESS_MB, and what is left
    is shared by the processes that hold data (a shard being built, or pass-1 buffers)."""
    budget = cfg.memory_budget_mb

    def per_worker_mb(w: int) -> float:
        procs = 1 + w if w >= 2 else 1
        return (budget - PROCESS_MB * procs) / max(1, w)

    if cfg.workers is None:  # processes cost ~0.4 s to start: not worth it for small inputs
        workers = 0 if size_bytes < 8 * 2**20 else min(8, os.cpu_count() or 1)
        while workers >= 2 and per_worker_mb(workers) < MIN_WORKER_MB:
            workers -= 1
    else:
        workers = cfg.workers
    workers = workers if workers >= 2 else 0
    per_mb = per_worker_mb(workers)
    if per_mb < MIN_WORKER_MB:
        need = PROCESS_MB * (1 + workers if workers else 1) + MIN_WORKER_MB * max(1, workers)
        raise ConfigError(f"data.memory_budget_mb: {budget} MB is too small for {max(1, workers)} "
                          f"process(es) of prepare; give at least {need} MB or fewer workers")
    per_bytes = per_mb * 2**20
    # At least one shard per worker, so pass 2 runs in parallel too.
    shards = cfg.shards or max(workers, 1, math.ceil(size_bytes / (per_bytes / XML_TO_RAM)))
    # Buffered text costs about twice its length as Python objects, and again as Arrow at flush;
    # a process keeps its high-water mark afterwards (CPython rarely returns memory).
    return Plan(workers=workers, shards=shards, flush_bytes=int(per_bytes / 6))


class _LazyPool:
    """One pool for both passes (starting processes costs ~0.4 s), made on first use: a .7z's
    pass 1 runs its own cleaning processes, which end before pass 2 needs the pool. Spawn, not
    fork: the parent may hold threads (the 7z reader, Arrow's pools)."""

    def __init__(self, workers: int) -> None:
        self.workers, self.pool = workers, None

    def __call__(self) -> mp.pool.Pool:
        if self.pool is None:
            self.pool = mp.get_context("spawn").Pool(self.workers)
        return self.pool

    def close(self) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()


def _build_tables(workdir: Path, tmp_out: Path, n_shards: int, cfg: DataConfig, workers: int,
                  get_pool: _LazyPool, site: str) -> BuildStats:
    """Pass 2 over every shard into ``tmp_out``; an empty table still gets one (empty) part, so
    readers get its schema."""
    for s in SPLITS:
        for t in TABLES:
            (tmp_out / s / t).mkdir(parents=True)
    stats = BuildStats()
    tasks = [(str(workdir), str(tmp_out), shard, cfg, site) for shard in range(n_shards)]
    parallel = workers >= 2 and n_shards > 1
    for part in (get_pool().imap_unordered(_build_task, tasks) if parallel else map(_build_task, tasks)):
        stats.add(part)
    for s in SPLITS:
        for t in TABLES:
            if not any((tmp_out / s / t).iterdir()):
                pq.write_table(OUT_SCHEMAS[t].empty_table(), tmp_out / s / t / part_name(0))
    return stats


def site_name(source: Path) -> str:
    """A dump's site name: its folder's name for a Posts.xml, else the file's name without
    its suffix (``beer.stackexchange.com.7z`` -> ``beer.stackexchange.com``)."""
    source = Path(source)
    if source.is_file() and source.name.lower() == "posts.xml":
        source = source.parent
    return source.name if source.is_dir() else source.stem


def _is_dump(path: Path) -> bool:
    """One site: a Posts.xml, .7z or JSON file, or a folder with a Posts.xml or a single .7z."""
    if is_hf_source(path):
        return True
    if path.is_dir():
        children = list(path.iterdir())
        return any(c.name.lower() == "posts.xml" for c in children) or sum(c.suffix.lower() == ".7z" for c in children) == 1
    return path.suffix.lower() in (".7z", ".json", ".xml")


def resolve_sources(cfg: DataConfig) -> list[tuple[str, Path]]:
    """(site, path) of every source: ``data.source`` itself when it is one dump, or the site
    folders/.7z files inside it (those named in ``data.sites``, else all), sorted by name."""
    root = Path(cfg.source)
    if hub_id(cfg.source) is not None:
        return [(hub_id(cfg.source).replace("/", "__"), root)]
    if not root.exists():
        raise DataError(f"{root}: source not found")
    if cfg.sites is None and _is_dump(root):
        return [(site_name(root), root)]
    if not root.is_dir():
        raise ConfigError(f"data.sites: {root} is one dump, not a folder of sites")
    found = {site_name(c): c for c in sorted(root.iterdir()) if not c.name.startswith(".") and _is_dump(c)}
    if not found:
        raise DataError(f"{root}: no Posts.xml, site folder or .7z here")
    missing = sorted(set(cfg.sites or ()) - set(found))
    if missing:
        raise ConfigError(f"data.sites: {', '.join(missing)} not in {root} (there: {', '.join(found)})")
    return [(name, found[name]) for name in sorted(cfg.sites or found)]


def prepare(cfg: DataConfig) -> PrepareResult:
    """Prepare every source (each split by question as a single site would be), tables
    combined with a ``site`` column; outputs appear at ``cfg.out`` only when all succeeded."""
    out, sources = Path(cfg.out), resolve_sources(cfg)
    scratch_root = Path(cfg.workdir) if cfg.workdir else out.parent
    scratch_root.mkdir(parents=True, exist_ok=True)
    tmp_out = scratch_root / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp_out, ignore_errors=True)
    try:
        if len(sources) == 1:
            metrics = _prepare_site(cfg, *sources[0], tmp_out, scratch_root)
        else:
            per_site = {}
            for i, (site, path) in enumerate(sources):
                per_site[site] = _prepare_site(cfg, site, path, tmp_out / f".site-{i}", scratch_root)
                _move_parts(tmp_out / f".site-{i}", tmp_out, i)
            metrics = combined_metrics(per_site)
        replace_dir(tmp_out, out)
        return PrepareResult(metrics=metrics, out=out)
    except BaseException:
        shutil.rmtree(tmp_out, ignore_errors=True)
        raise


def _move_parts(site_out: Path, tmp_out: Path, index: int) -> None:
    """A site's parts into the combined tables as ``part-<site index>-<shard>``, in site order."""
    for s in SPLITS:
        for t in TABLES:
            (tmp_out / s / t).mkdir(parents=True, exist_ok=True)
            for part in sorted((site_out / s / t).glob("part-*.parquet")):
                os.replace(part, tmp_out / s / t / f"part-{index:03d}-{part.name.removeprefix('part-')}")
    shutil.rmtree(site_out)


def combined_metrics(per_site: dict[str, dict]) -> dict:
    """Counts summed over the sites, means weighted by their counts, and every site's own metrics."""
    out: dict = {"sites": per_site}
    means = {"mean_question_chars": "questions", "mean_answer_chars": "reward", "mean_sft_answer_chars": "sft"}
    for s in SPLITS:
        rows = [m[s] for m in per_site.values()]
        split = {k: sum(r[k] for r in rows) for k in ("questions", "sft", "reward", "pairs")}
        for mean, count in means.items():
            split[mean] = round(sum(r[mean] * r[count] for r in rows) / split[count], 2) if split[count] else 0.0
        out[s] = split
    out["input"] = {k: sum(m["input"][k] for m in per_site.values()) for k in next(iter(per_site.values()))["input"]}
    return out


def source_format(cfg: DataConfig, source: Path) -> str:
    if cfg.format != "auto":
        return cfg.format
    return "hf" if is_hf_source(source) else "json" if is_json_source(source) else "stackexchange"


def read_source(cfg: DataConfig, source: Path, scratch_root: Path) -> tuple[DumpSource | None, tuple | None]:
    """A dump to stream (Stack Exchange), or the records of a source read whole (JSON, datasets)."""
    fmt = source_format(cfg, source)
    if fmt == "stackexchange":
        return resolve_dump(source), None
    if fmt == "hf":
        return None, read_hf(source, cfg.hf, scratch_root)
    if not source.is_file():
        raise DataError(f"{source}: source not found")
    return None, read_json(source)


def records_bytes(records: tuple[list[tuple], list[tuple]]) -> int:
    """The records' text size: what plans the shards of a source read whole."""
    questions, answers = records
    return sum(len(q[1]) for q in questions) + sum(len(a[2]) for a in answers)


def _prepare_site(cfg: DataConfig, site: str, source: Path, tmp_out: Path, scratch_root: Path) -> dict:
    """Both passes over one dump into ``tmp_out`` (tables carry ``site``); returns its metrics."""
    dump, records = read_source(cfg, source, scratch_root)
    run = plan(dump.size_bytes if dump is not None else records_bytes(records), cfg)
    os.environ.setdefault(*ARROW_POOL_ENV)  # for the workers spawned below
    workdir = scratch_root / f".{Path(cfg.out).name}.shards-{os.getpid()}"
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    tmp_out.mkdir(parents=True)
    get_pool = _LazyPool(run.workers)
    try:
        if dump is not None:
            ingest = shard_dump(dump, workdir, run.shards, cfg, run.workers, run.flush_bytes, get_pool)
        else:
            ingest = shard_records(records, workdir, run.shards, cfg, run.flush_bytes)
        stats = _build_tables(workdir, tmp_out, run.shards, cfg, run.workers, get_pool, site)
        if not any(stats.counts[s]["prompts"] for s in SPLITS):
            raise DataError(f"{source}: no question survived the filters; nothing to prepare")
        return _metrics(ingest, stats, run.shards)
    finally:
        get_pool.close()
        shutil.rmtree(workdir, ignore_errors=True)


def _metrics(ingest: IngestStats, stats: BuildStats, n_shards: int) -> dict:
    splits = {}
    for s in SPLITS:
        c, sm = stats.counts[s], stats.sums[s]
        splits[s] = {
            "questions": c["prompts"],
            "sft": c["sft"],
            "reward": c["reward"],
            "pairs": c["pairs"],
            "mean_question_chars": round(sm["question_chars"] / c["prompts"], 2) if c["prompts"] else 0.0,
            "mean_answer_chars": round(sm["answer_chars"] / c["reward"], 2) if c["reward"] else 0.0,
            "mean_sft_answer_chars": round(sm["sft_answer_chars"] / c["sft"], 2) if c["sft"] else 0.0,
        }
    return {
        **splits,
        "input": {
            "questions": ingest.questions,
            "answers": ingest.answers,
            "orphan_answers": stats.orphan_answers,
            "duplicate_answers": stats.duplicate_answers,
            "filtered_questions": stats.filtered_questions,
            "filtered_answers": stats.filtered_answers,
        },
    }
