"""Build the offline HTML template of `dvc plots show` (.dvc/plots/offline.html).

DVC's default page loads vega, vega-lite and vega-embed from a CDN, so it shows nothing offline.
This template inlines the same versions that dvc-render asks the CDN for, taken from the npm
registry, and `.dvc/config` points `plots.html_template` at it, so `dvc plots show` writes a page
that needs no network. Rerun after upgrading dvc-render:

    python scripts/build_plots_template.py            # runs `npm pack` in a temporary directory
"""

from __future__ import annotations

import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / ".dvc" / "plots" / "offline.html"
PACKAGES = ("vega", "vega-lite", "vega-embed")


def cdn_versions() -> dict[str, str]:
    """The versions dvc-render's page would load from the CDN."""
    from dvc_render.vega import VegaRenderer

    found = dict(re.findall(r"npm/([a-z-]+)@([0-9.]+)", VegaRenderer.SCRIPTS))
    missing = [p for p in PACKAGES if p not in found]
    if missing:
        sys.exit(f"build_plots_template: dvc-render's scripts no longer name {missing}")
    return {p: found[p] for p in PACKAGES}


def main() -> None:
    versions = cdn_versions()
    scripts = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, version in versions.items():
            subprocess.run(["npm", "pack", "--silent", f"{name}@{version}"], cwd=tmp, check=True,
                           stdout=subprocess.DEVNULL)
            with tarfile.open(Path(tmp) / f"{name}-{version}.tgz") as tar:
                js = tar.extractfile(f"package/build/{name}.min.js").read().decode("utf-8")
            if "</script" in js or "{plot_divs}" in js:
                sys.exit(f"build_plots_template: {name} cannot be inlined as is")
            scripts.append(f"<!-- {name} {version} (BSD-3-Clause), npm registry -->\n<script>{js}</script>")
    page = "\n".join([
        "<!DOCTYPE html>", "<html>", "<head>", "{refresh_tag}", '<meta charset="utf-8">',
        "<title>cqa-rlhf plots</title>", *scripts,
        "<style>table { border-spacing: 15px; }</style>", "</head>", "<body>", "{plot_divs}", "</body>", "</html>", ""])
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(page, encoding="utf-8")
    print(f"wrote {OUT.relative_to(ROOT)} ({OUT.stat().st_size // 1024} KiB): "
          + ", ".join(f"{n} {v}" for n, v in versions.items()))


if __name__ == "__main__":
    main()
