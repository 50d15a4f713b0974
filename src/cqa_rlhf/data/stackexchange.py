"""Streaming reader for Stack Exchange data dumps (``Posts.xml``), as published.

Accepts a ``Posts.xml`` path, a site folder holding ``Posts.xml``, or the site's ``.7z`` archive
(read in-process with py7zr, no external 7z binary). The XML is parsed incrementally with lxml's
``iterparse``; each ``<row>`` is cleared once read, so memory does not grow with the file.
Format reference: https://meta.stackexchange.com/a/2678 (Posts.xml attributes).
"""

from __future__ import annotations

import queue
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from lxml import etree

from cqa_rlhf.errors import DataError
from cqa_rlhf.progress import read_progress

QUESTION, ANSWER = 1, 2


class _Failure(Exception):
    """A parse error at a line of the stream being parsed (turned into a DataError by callers)."""

    def __init__(self, line: int, message: str, column: int | None = None) -> None:
        super().__init__(message)
        self.line, self.column, self.message = line, column, message

    def error(self, label: str, line_offset: int = 0) -> DataError:
        col = f", column {self.column}" if self.column is not None else ""
        return DataError(f"{label}: line {self.line + line_offset}{col}: {self.message}")
POSTS_XML = "posts.xml"


@dataclass(frozen=True, slots=True)
class RawPost:
    """One question or answer row; bodies are still HTML."""

    id: int
    post_type: int  # QUESTION or ANSWER
    parent_id: int | None  # answers: the question's id
    accepted_answer_id: int | None  # questions: the accepted answer's id, if any
    score: int
    title: str
    body: str


@dataclass(frozen=True)
class DumpSource:
    """A resolved dump: where to read from and how to name it in errors."""

    path: Path  # Posts.xml or the .7z archive
    member: str | None  # the Posts.xml member inside a .7z, else None
    size_bytes: int  # uncompressed XML size (used to plan memory)

    @property
    def label(self) -> str:
        return f"{self.path}!{self.member}" if self.member else str(self.path)


def resolve_dump(source: str | Path) -> DumpSource:
    """Find the Posts.xml of a site folder, file or .7z archive; one-line error if absent."""
    p = Path(source)
    if not p.exists():
        raise DataError(f"{p}: source not found")
    if p.is_dir():
        for child in sorted(p.iterdir()):
            if child.name.lower() == POSTS_XML and child.is_file():
                return DumpSource(child, None, child.stat().st_size)
        archives = sorted(c for c in p.iterdir() if c.suffix.lower() == ".7z")
        if len(archives) == 1:
            return resolve_dump(archives[0])
        raise DataError(f"{p}: no Posts.xml (or single site .7z) in this folder")
    if p.suffix.lower() == ".7z":
        return _resolve_7z(p)
    return DumpSource(p, None, p.stat().st_size)


def _resolve_7z(p: Path) -> DumpSource:
    import py7zr

    try:
        with py7zr.SevenZipFile(p, mode="r") as archive:
            infos = archive.list()
    except (py7zr.exceptions.Bad7zFile, py7zr.exceptions.ArchiveError, EOFError, OSError) as exc:
        raise DataError(f"{p}: not a readable 7z archive ({exc})") from None
    for info in infos:
        if not info.is_directory and info.filename.replace("\\", "/").split("/")[-1].lower() == POSTS_XML:
            return DumpSource(p, info.filename, int(info.uncompressed or 0))
    raise DataError(f"{p}: archive has no Posts.xml member")


class _QueueReader:
    """A read-only binary stream fed by a py7zr extraction thread through a bounded queue.

    The queue holds at most ``maxsize`` chunks, so a slow parser back-pressures decompression
    and memory stays bounded whatever the archive's size.
    """

    _END = object()

    def __init__(self, dump: DumpSource, maxsize: int = 16) -> None:
        self._q: queue.Queue = queue.Queue(maxsize=maxsize)
        self._buf = b""
        self._done = False
        self._closed = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(dump,), daemon=True)
        self._thread.start()

    def _run(self, dump: DumpSource) -> None:
        import py7zr
        from py7zr.io import Py7zIO, WriterFactory

        reader = self

        class _Sink(Py7zIO):
            def write(self, s: bytes | bytearray) -> int:
                while True:
                    if reader._closed.is_set():
                        raise InterruptedError("reader closed")
                    try:
                        reader._q.put(bytes(s), timeout=0.1)
                        return len(s)
                    except queue.Full:
                        continue

            def read(self, size: int | None = None) -> bytes:
                return b""

            def seek(self, offset: int, whence: int = 0) -> int:
                return 0

            def flush(self) -> None:
                return None

            def size(self) -> int:
                return 0

        class _Factory(WriterFactory):
            def create(self, filename: str) -> Py7zIO:
                return _Sink()

        try:
            with py7zr.SevenZipFile(dump.path, mode="r") as archive:
                archive.extract(targets=[dump.member], factory=_Factory())
        except InterruptedError:
            pass
        except BaseException as exc:  # surfaced to the parsing thread in read()
            self._error = exc
        finally:
            while not self._closed.is_set():
                try:
                    self._q.put(self._END, timeout=0.1)
                    break
                except queue.Full:
                    continue

    def read(self, n: int = -1) -> bytes:
        while not self._done and (n < 0 or len(self._buf) < n):
            chunk = self._q.get()
            if chunk is self._END:
                self._done = True
                if self._error is not None:
                    raise DataError(f"7z extraction failed: {self._error}")
            else:
                self._buf += chunk
        if n < 0:
            out, self._buf = self._buf, b""
        else:
            out, self._buf = self._buf[:n], self._buf[n:]
        return out

    def close(self) -> None:
        self._closed.set()
        self._thread.join(timeout=5)


def _open(dump: DumpSource) -> BinaryIO:
    if dump.member is None:
        return open(dump.path, "rb", buffering=1 << 20)
    return _QueueReader(dump)  # type: ignore[return-value]


def _int(attrib: dict, key: str, line: int, required: bool) -> int | None:
    value = attrib.get(key)
    if value is None:
        if required:
            raise _Failure(line, f"row lacks the {key} attribute")
        return None
    try:
        return int(value)
    except ValueError:
        raise _Failure(line, f"{key}={value!r} is not an integer") from None


def iter_posts(dump: DumpSource) -> Iterator[RawPost]:
    """Yield questions and answers in file order; other post types are skipped.

    Raises :class:`DataError` naming the file and line for malformed or truncated XML, invalid
    UTF-8, a root element other than ``<posts>`` and rows that lack ``Id``/``PostTypeId``.
    """
    stream = read_progress(_open(dump), dump.size_bytes, f"reading {dump.label}")
    try:
        yield from _parse(stream)
    except _Failure as exc:
        raise exc.error(dump.label) from None
    finally:
        stream.close()


def iter_posts_range(dump: DumpSource, start: int, end: int) -> Iterator[RawPost]:
    """Posts of bytes ``[start, end)`` of a plain Posts.xml, a run of whole ``<row>`` lines (see
    :func:`plan_ranges`). Parsed as ``<posts>`` + range + ``</posts>``, so any malformation
    inside the range is still an error, reported with its line in the whole file."""
    stream = _RangeReader(dump.path, start, end)
    try:
        yield from _parse(stream)
    except _Failure as exc:
        raise exc.error(dump.label, _count_lines(dump.path, start)) from None
    finally:
        stream.close()


def _count_lines(path: Path, end: int) -> int:
    """Newlines in the first ``end`` bytes (only on the error path)."""
    lines = 0
    with open(path, "rb") as f:
        while end > 0:
            chunk = f.read(min(end, 1 << 24))
            if not chunk:
                break
            lines += chunk.count(b"\n")
            end -= len(chunk)
    return lines


def _parse(stream: BinaryIO) -> Iterator[RawPost]:
    context = etree.iterparse(
        stream, events=("start", "end"), huge_tree=True, resolve_entities=False, no_network=True
    )
    depth = 0
    try:
        for event, elem in context:
            if event == "start":
                depth += 1
                if depth == 1 and elem.tag != "posts":
                    raise _Failure(elem.sourceline, f"root element is <{elem.tag}>, not <posts>: "
                                   "not a Stack Exchange Posts.xml dump")
                continue
            depth -= 1
            if depth != 1:
                continue
            if elem.tag == "row":
                post = _row(elem.attrib, elem.sourceline)
                if post is not None:
                    yield post
            # Free the row and everything before it: constant memory on 100 GB dumps.
            elem.clear(keep_tail=True)
            parent = elem.getparent()
            if parent is not None:
                while elem.getprevious() is not None:
                    del parent[0]
    except etree.XMLSyntaxError as exc:
        line, col = exc.position if exc.position else (exc.lineno, 0)
        msg = exc.msg.split(", line ")[0] if exc.msg else "malformed XML"
        if "UTF-8" in msg or "character encoding" in msg:
            msg = "invalid UTF-8 (" + msg + ")"
        raise _Failure(line, msg, col) from None


class _RangeReader:
    """``<posts>`` + bytes ``[start, end)`` of a file + ``</posts>``, as a binary stream."""

    def __init__(self, path: Path, start: int, end: int) -> None:
        self._f = open(path, "rb", buffering=0)
        self._f.seek(start)
        self._left = end - start
        self._head, self._tail = b"<posts>", b"</posts>"

    def read(self, n: int = -1) -> bytes:
        if n < 0:
            n = 1 << 62
        out = self._head[:n]
        self._head = self._head[len(out):]
        if len(out) < n and self._left > 0:
            chunk = self._f.read(min(n - len(out), self._left, 1 << 20))
            self._left -= len(chunk)
            if not chunk:
                self._left = 0
            out += chunk
        if len(out) < n and self._left <= 0:
            rest = self._tail[: n - len(out)]
            self._tail = self._tail[len(rest):]
            out += rest
        return out

    def close(self) -> None:
        self._f.close()


_HEAD = re.compile(rb"^(?:\xef\xbb\xbf)?\s*(?:<\?xml[^>]*?encoding=[\"'](?i:utf-8)[\"'][^>]*\?>)?\s*<posts\s*>\s*\n")
_TAIL = re.compile(rb"\n\s*</posts>\s*$")
_ROW_START = re.compile(rb"\n[ \t]*<row[ \t]")


def plan_ranges(dump: DumpSource, n: int) -> list[tuple[int, int]] | None:
    """Split a plain Posts.xml into ``n`` byte ranges of whole ``<row>`` lines for parallel parsing.

    Returns ``(start, end)`` pairs, or None when the file is not laid out
    as Stack Exchange publishes it (prologue and ``<posts>`` on their own lines, one row per
    line, ``</posts>`` last); the caller then parses the one stream, which reports exactly what
    is wrong. A range boundary is a newline followed by ``<row``: a ``<`` cannot occur inside an
    attribute value, so such a boundary never cuts a row in two.
    """
    if dump.member is not None or n < 2:
        return None
    size = dump.path.stat().st_size
    with open(dump.path, "rb") as f:
        head = f.read(1 << 16)
        m = _HEAD.match(head)
        if m is None:
            return None
        f.seek(max(0, size - (1 << 16)))
        tail = f.read()
        t = _TAIL.search(tail)
        if t is None:
            return None
        body_start, body_end = m.end(), size - len(tail) + t.start() + 1
        cuts = [body_start]
        for i in range(1, n):
            f.seek(max(cuts[-1], body_start + (body_end - body_start) * i // n))
            window = f.read(1 << 20)
            r = _ROW_START.search(window)
            if r is None:
                continue
            cut = f.tell() - len(window) + r.start() + 1
            if cuts[-1] < cut < body_end:
                cuts.append(cut)
        cuts.append(body_end)
        ranges = list(zip(cuts, cuts[1:]))
    return ranges


def _row(attrib: dict, line: int) -> RawPost | None:
    post_type = _int(attrib, "PostTypeId", line, required=True)
    if post_type not in (QUESTION, ANSWER):
        return None
    post_id = _int(attrib, "Id", line, required=True)
    assert post_id is not None
    return RawPost(
        id=post_id,
        post_type=post_type,
        parent_id=_int(attrib, "ParentId", line, required=post_type == ANSWER),
        accepted_answer_id=_int(attrib, "AcceptedAnswerId", line, required=False),
        score=_int(attrib, "Score", line, required=False) or 0,
        title=attrib.get("Title", ""),
        body=attrib.get("Body", ""),
    )
