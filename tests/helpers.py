"""Small builders for hand-made dumps (tests only)."""

from __future__ import annotations

from pathlib import Path
from xml.sax.saxutils import quoteattr


def write_posts(path: Path, rows: list[dict], crlf: bool = True) -> Path:
    """Write a Posts.xml the way Stack Exchange publishes it: BOM, CRLF, one row per line."""
    nl = "\r\n" if crlf else "\n"
    lines = ['\ufeff<?xml version="1.0" encoding="utf-8"?>', "<posts>"]
    for row in rows:
        attrs = " ".join(
            f"{k}={quoteattr(str(v), {chr(10): '&#xA;', chr(13): '&#xD;'})}" for k, v in row.items() if v is not None
        )
        lines.append(f"  <row {attrs} />")
    lines.append("</posts>")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes((nl.join(lines) + nl).encode("utf-8"))
    return path


def q(id: int, title: str, body: str = "<p>body of the question</p>", accepted: int | None = None, score: int = 0):
    return {"Id": id, "PostTypeId": 1, "AcceptedAnswerId": accepted, "Score": score, "Title": title, "Body": body}


def a(id: int, parent: int, body: str, score: int):
    return {"Id": id, "PostTypeId": 2, "ParentId": parent, "Score": score, "Body": body}
