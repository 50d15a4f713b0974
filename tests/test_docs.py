"""The front door: a README that fits on a screen, whose leaderboard is the committed one, whose
links resolve, and a docs site that builds in strict mode."""

from __future__ import annotations

import json
import re
import subprocess
import sys

from conftest import ROOT

README = (ROOT / "README.md").read_text(encoding="utf-8")


def test_readme_fits_on_a_screen():
    assert len(README.splitlines()) <= 250


def leaderboard_rows() -> dict[str, list[str]]:
    """The README's leaderboard table: policy -> its cells."""
    start = README.index("| policy | gold win rate vs SFT [95% CI] |")
    rows = {}
    for line in README[start:].splitlines()[2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0].removesuffix(" (not a method)")] = cells[1:]
    return rows


def test_readme_leaderboard_is_the_committed_one():
    board = json.loads((ROOT / "metrics" / "compare.json").read_text())
    rows = leaderboard_rows()
    assert set(rows) == set(board["policies"]) - {"base"}
    for policy, (win, gold, kl, tokens) in rows.items():
        own = board["policies"][policy]
        if policy == board["baseline"]:
            assert win == "baseline"
        else:
            block = board[f"{policy}_vs_{board['baseline']}"]
            ci = block["win_rate_ci95"]["gold"]
            assert win == f"{block['win_rate']['gold']:.3f} [{ci['low']:.3f}, {ci['high']:.3f}]", policy
        assert (gold, kl, tokens) == (f"{own['gold']:.3f}", f"{own['kl_to_reference']:.3f}", f"{own['mean_tokens']:.1f}"), policy


def test_readme_links_resolve():
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", README)
    assert links
    missing = [link for link in links if not link.startswith("http") and not (ROOT / link).exists()]
    assert not missing, missing


def test_docs_site_builds_in_strict_mode(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet", "-d", str(tmp_path / "site")],
                          cwd=ROOT, capture_output=True, text=True, env={"NO_MKDOCS_2_WARNING": "1", "PATH": ""})
    assert proc.returncode == 0, proc.stderr
    api = (tmp_path / "site" / "reference" / "api" / "index.html").read_text(encoding="utf-8")
    assert "kl_bound" in api and "paired_comparison" in api  # generated from the docstrings
