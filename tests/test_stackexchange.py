"""Streaming reader on the real dumps (BOM, CRLF, other post types), folders and .7z archives."""

from __future__ import annotations

import re
import shutil

import py7zr
import pytest

from cqa_rlhf.data.stackexchange import ANSWER, QUESTION, iter_posts, iter_posts_range, plan_ranges, resolve_dump
from cqa_rlhf.errors import DataError

# Counted independently of the reader: a regex over the raw rows (see the note in issue #2).
EXPECTED = {"beer": (663, 1572), "matheducators": (397, 1507), "dsmeta": (95, 152)}


def _regex_counts(path):
    text = (path / "Posts.xml").read_text(encoding="utf-8-sig")
    return (len(re.findall(r'<row [^>]*PostTypeId="1"', text)), len(re.findall(r'<row [^>]*PostTypeId="2"', text)))


@pytest.mark.parametrize("site", sorted(EXPECTED))
def test_real_dump_counts(real_site, site):
    path = real_site(site)
    assert _regex_counts(path) == EXPECTED[site]
    posts = list(iter_posts(resolve_dump(path)))
    assert sum(p.post_type == QUESTION for p in posts) == EXPECTED[site][0]
    assert sum(p.post_type == ANSWER for p in posts) == EXPECTED[site][1]
    assert all(p.parent_id is not None for p in posts if p.post_type == ANSWER)


def test_real_dump_has_bom_crlf_and_other_post_types(real_site):
    raw = (real_site("beer") / "Posts.xml").read_bytes()
    assert raw.startswith(b"\xef\xbb\xbf") and b"\r\n" in raw and b'PostTypeId="4"' in raw
    first = next(iter_posts(resolve_dump(real_site("beer"))))
    assert first.id == 1 and first.accepted_answer_id == 4 and first.title.startswith("What is a citra hop")
    assert "\r" not in first.body


def test_resolve_file_folder_and_missing(real_site, tmp_path):
    site = real_site("dsmeta")
    assert resolve_dump(site).path == site / "Posts.xml"
    assert resolve_dump(site / "Posts.xml").path == site / "Posts.xml"
    with pytest.raises(DataError, match="source not found"):
        resolve_dump(tmp_path / "nope")
    with pytest.raises(DataError, match="no Posts.xml"):
        resolve_dump(tmp_path)


def test_7z_archive_streams_the_posts_member(real_site, tmp_path):
    site = real_site("dsmeta")
    archive = tmp_path / "datascience.meta.stackexchange.com.7z"
    (tmp_path / "Users.xml").write_text('<?xml version="1.0"?>\n<users>\n</users>\n')
    with py7zr.SevenZipFile(archive, "w") as z:  # laid out as the published site archives
        z.write(tmp_path / "Users.xml", "Users.xml")
        z.write(site / "Posts.xml", "Posts.xml")
    dump = resolve_dump(archive)
    assert dump.member == "Posts.xml" and dump.size_bytes == (site / "Posts.xml").stat().st_size
    from_7z = list(iter_posts(dump))
    assert from_7z == list(iter_posts(resolve_dump(site)))
    # A folder holding just the archive resolves to it too.
    folder = tmp_path / "site"
    folder.mkdir()
    shutil.move(archive, folder / archive.name)
    assert resolve_dump(folder).member == "Posts.xml"


def test_7z_without_posts_and_broken_7z(tmp_path):
    archive = tmp_path / "x.7z"
    (tmp_path / "Users.xml").write_text("<users/>")
    with py7zr.SevenZipFile(archive, "w") as z:
        z.write(tmp_path / "Users.xml", "Users.xml")
    with pytest.raises(DataError, match="no Posts.xml member"):
        resolve_dump(archive)
    bad = tmp_path / "bad.7z"
    bad.write_bytes(b"not an archive at all")
    with pytest.raises(DataError, match="not a readable 7z archive"):
        resolve_dump(bad)


@pytest.mark.parametrize("n", [2, 3, 7])
def test_byte_ranges_cover_every_row_once(real_site, n):
    dump = resolve_dump(real_site("beer"))
    ranges = plan_ranges(dump, n)
    assert ranges is not None and len(ranges) == n
    assert all(a < b for a, b in ranges) and all(b == c for (_, b), (c, _) in zip(ranges, ranges[1:]))
    ranged = [p for a, b in ranges for p in iter_posts_range(dump, a, b)]
    assert ranged == list(iter_posts(dump))


def test_ranges_refused_for_unusual_layout(tmp_path):
    p = tmp_path / "Posts.xml"
    p.write_text('<posts><row Id="1" PostTypeId="1" Body="" /></posts>')  # all on one line
    assert plan_ranges(resolve_dump(p), 2) is None


def test_error_in_a_range_names_the_line_in_the_file(real_site, tmp_path):
    lines = (real_site("dsmeta") / "Posts.xml").read_bytes().split(b"\n")
    lines[200] = lines[200].replace(b"<row ", b"<row <", 1)
    p = tmp_path / "Posts.xml"
    p.write_bytes(b"\n".join(lines))
    dump = resolve_dump(p)
    with pytest.raises(DataError, match=r"line 201, column") as whole:
        list(iter_posts(dump))
    ranges = plan_ranges(dump, 2)
    assert ranges is not None
    messages = []
    for a, b in ranges:
        try:
            list(iter_posts_range(dump, a, b))
        except DataError as exc:
            messages.append(str(exc))
    assert len(messages) == 1 and messages[0].startswith(f"{p}: line 201, column")
    assert str(whole.value).split(":")[1] == messages[0].split(":")[1]
