"""HTML post bodies to plain text that keeps the structure a reader needs.

The canonical text form, shared by real dumps and the synthetic site:
- paragraphs (and headings, quotes) separated by one blank line, inner whitespace collapsed;
- code blocks (``<pre>``) fenced by lines of three backticks, their text kept verbatim;
- list items on their own lines, ``- item`` or ``1. item``;
- inline ``<code>`` in backticks; links and images become their text (or alt text);
- HTML entities unescaped (the XML layer has already undone the attribute escaping).
"""

from __future__ import annotations


import re
from html import unescape

from lxml import etree

_BLOCK = frozenset(
    "p div blockquote h1 h2 h3 h4 h5 h6 table tr hr section article header footer dl dt dd".split()
)
# One parser for all bodies: building a parser per call costs more than parsing a short post.
_PARSER = etree.HTMLParser(remove_comments=True, remove_pis=True, no_network=True)
_BLANKS = re.compile(r"\n{3,}")


class _Writer:
    """Accumulates blocks; inline text is buffered until the current block ends."""

    def __init__(self) -> None:
        self.blocks: list[str] = []
        self.inline: list[str] = []

    def text(self, s: str | None) -> None:
        if s:
            self.inline.append(s)

    def end_block(self) -> None:
        if self.inline:
            para = " ".join("".join(self.inline).split())
            self.inline.clear()
            if para:
                self.blocks.append(para)

    def raw_block(self, s: str) -> None:
        self.end_block()
        self.blocks.append(s)


def _walk(el: etree._Element, out: _Writer, list_stack: list[list[int | None]]) -> None:
    tag = el.tag if isinstance(el.tag, str) else ""
    if tag in _WHOLE:
        _WHOLE[tag](el, out)
    elif tag in ("ul", "ol"):
        _walk_list(el, tag, out, list_stack)
    elif tag == "blockquote":
        out.end_block()
        sub = _Writer()
        _walk_children(el, sub, list_stack)
        sub.end_block()
        if sub.blocks:
            quoted = "\n>\n".join("\n".join("> " + ln for ln in b.split("\n")) for b in sub.blocks)
            out.raw_block(quoted)
    else:
        block = tag in _BLOCK
        if block:
            out.end_block()
        _walk_children(el, out, list_stack)
        if block:
            out.end_block()
    out.text(el.tail)


def _pre(el: etree._Element, out: _Writer) -> None:
    code = "".join(el.itertext()).replace("\r\n", "\n").strip("\n")
    if code.strip():
        out.raw_block("```\n" + code + "\n```")


def _br(el: etree._Element, out: _Writer) -> None:
    out.end_block()  # a line break inside a paragraph ends that line: keep it as a paragraph boundary


def _img(el: etree._Element, out: _Writer) -> None:
    out.text(el.get("alt") or "")


def _code(el: etree._Element, out: _Writer) -> None:
    inner = "".join(el.itertext())
    out.text(f"`{inner}`" if inner.strip() else inner)


def _a(el: etree._Element, out: _Writer) -> None:
    inner = "".join(el.itertext())
    out.text(inner if inner.strip() else (el.get("href") or ""))


# Elements written whole by one function (their tail follows in _walk).
_WHOLE = {"pre": _pre, "br": _br, "img": _img, "code": _code, "a": _a}


def _walk_list(el: etree._Element, tag: str, out: _Writer, list_stack: list[list[int | None]]) -> None:
    """A ``ul``/``ol`` as ``- `` / ``1. `` items, nested items indented under their marker."""
    out.end_block()
    list_stack.append([1 if tag == "ol" else None])
    out.text(el.text if el.text and el.text.strip() else None)
    items: list[str] = []
    for child in el:
        if isinstance(child.tag, str) and child.tag == "li":
            item = _list_item(child, list_stack)
            if item:
                items.append(item)
        else:
            _walk(child, out, list_stack)
    list_stack.pop()
    if items:
        out.raw_block("\n".join(items))


def _list_item(li: etree._Element, list_stack: list[list[int | None]]) -> str:
    sub = _Writer()
    _walk_children(li, sub, list_stack)
    sub.end_block()
    body = "\n".join(sub.blocks).strip()
    if not body:
        return ""
    counter = list_stack[-1][0]
    marker = f"{counter}." if counter is not None else "-"
    if counter is not None:
        list_stack[-1][0] = counter + 1
    lines = body.split("\n")
    pad = " " * (len(marker) + 1)
    return f"{marker} {lines[0]}" + "".join("\n" + pad + ln if ln else "\n" for ln in lines[1:])


def _walk_children(el: etree._Element, out: _Writer, list_stack: list[list[int | None]]) -> None:
    out.text(el.text)
    for child in el:
        if isinstance(child.tag, str):
            _walk(child, out, list_stack)
        else:  # comments and processing instructions: drop them, keep their tail text
            out.text(child.tail)


# Fast path. Most bodies are paragraphs with inline markup only; for those a few regex passes
# give exactly what the DOM walk gives, at a fraction of the cost (tests/test_html.py checks the
# two agree on every body of the real dumps). Anything else takes the DOM walk.
_INLINE = r"(?:a|em|strong|b|i|u|s|strike|del|ins|sup|sub|kbd|span|code|img)"
_BREAK = r"(?:p|div|h[1-6]|hr|br)"  # tags that only end a paragraph
_BREAK_TAG = re.compile(r"</?" + _BREAK + r"(?:\s[^<>]*)?/?>", re.I)
_IMG = re.compile(r"<img(?:\s[^<>]*)?>", re.I)
_ALT = re.compile(r"\salt=\"([^\"]*)\"", re.I)
_CODE = re.compile(r"<code(?:\s[^<>]*)?>([^<]*)</code>", re.I)
_ANY_TAG = re.compile(r"<[^<>]*>")
_NOT_SIMPLE = re.compile(  # one '<'-anchored scan; \x00 is checked apart (our block marker)
    r"<(?:"
    r"(?!/?(?:" + _INLINE + "|" + _BREAK + r")(?:\s[^<>]*)?/?>)"  # other tags, comments, bare '<'
    r"|code(?:\s[^<>]*)?>[^<]*<(?!/code>)"  # code spans holding markup
    r"|a(?:\s[^<>]*)?>[^<]*<(?!/a>)"  # links holding markup (DOM shows their text only)
    r"|a(?:\s[^<>]*)?>\s*</a>"  # empty links (DOM shows their href)
    r"|img(?:\s[^<>]*)?\salt='"  # single-quoted alt text
    r")",
    re.I,
)


def _code_span(m: re.Match) -> str:
    inner = m.group(1)
    return f"`{inner}`" if inner.strip() else inner


def _img_alt(m: re.Match) -> str:
    alt = _ALT.search(m.group(0))
    return alt.group(1) if alt else ""


def _fast_html_to_text(html: str) -> str | None:
    """Paragraph-level and inline tags only, else None (then the DOM walk runs)."""
    if "\x00" in html or _NOT_SIMPLE.search(html):
        return None
    text = html
    if "<code" in text or "<CODE" in text:
        text = _CODE.sub(_code_span, text)
    if "<img" in text or "<IMG" in text:
        text = _IMG.sub(_img_alt, text)
    text = _ANY_TAG.sub("", _BREAK_TAG.sub("\x00", text))
    if "&" in text:
        text = unescape(text)
    return "\n\n".join(p for p in (" ".join(piece.split()) for piece in text.split("\x00")) if p)


def html_to_text(html: str | None) -> str:
    """Convert one post body to canonical plain text (see module doc). Empty input gives ''."""
    if not html or not html.strip():
        return ""
    if "<" not in html and "&" not in html:
        return " ".join(html.split())
    fast = _fast_html_to_text(html)
    if fast is not None:
        return fast
    return dom_html_to_text(html)


def dom_html_to_text(html: str) -> str:
    """The general path: parse with libxml2's HTML parser and walk the tree."""
    doc = etree.fromstring(f"<div>{html}</div>", _PARSER)  # libxml2 recovers from broken HTML
    body = doc.find("body") if doc is not None else None
    if body is None or len(body) == 0:
        return " ".join(html.split())
    root = body[0] if len(body) == 1 else body
    out = _Writer()
    _walk_children(root, out, [])
    out.end_block()
    return _BLANKS.sub("\n\n", "\n\n".join(out.blocks)).strip()
