"""`dvc plots show` renders a page that works offline: the committed curves (SFT, reward models,
PPO) and the policy comparison, drawn by a real headless Chromium with no network requests."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT, stage_env

BROWSER = shutil.which("chromium-headless-shell") or shutil.which("chromium")


def test_the_template_is_configured_and_self_contained():
    config = (ROOT / ".dvc" / "config").read_text()
    assert "html_template = plots/offline.html" in config
    page = (ROOT / ".dvc" / "plots" / "offline.html").read_text()
    assert "{plot_divs}" in page and "{scripts}" not in page  # DVC's CDN script tags are left out
    assert "vegaEmbed" in page and not re.search(r"""(src|href)\s*=\s*["']https?:""", page)


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    out = tmp_path_factory.mktemp("plots")
    proc = subprocess.run([sys.executable, "-m", "dvc", "plots", "show", "-o", str(out)], cwd=ROOT,
                          capture_output=True, text=True, env=stage_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr
    return out / "index.html"


def test_page_names_every_curve_and_loads_nothing_from_the_network(page):
    html = page.read_text()
    for curve in ("dvclive/sft/plots/metrics/val/loss.tsv", "dvclive/reward/classification/plots/metrics/val/accuracy.tsv",
                  "dvclive/ppo/plots/metrics/objective/scores.tsv", "dvclive/ppo/plots/metrics/objective/kl.tsv",
                  "dvclive/ppo/plots/metrics/objective/beta.tsv", "dvclive/ppo/plots/metrics/rollout/response_length.tsv",
                  "dvclive/online_dpo/plots/metrics/rewards/margins.tsv", "metrics/compare_win_rate.csv",
                  "metrics/overopt.csv"):
        div = re.sub(r"[/.]", "_", curve)  # DVC names each chart's div after its file
        assert f"vegaEmbed('#{div}'" in html, curve
    assert not re.search(r"""(src|href)\s*=\s*["']https?:""", html)
    assert "cdn.jsdelivr" not in html
    # the win-rate chart is .dvc/plots/bar_ci.json: bars with the 95% interval of every judge
    chart = html[html.index('id = "metrics_compare_win_rate_csv"'):html.index("vegaEmbed('#metrics_compare_win_rate_csv'")]
    assert '"x2": {"field": "ci_high"}' in chart and '"field": "ci_low"' in chart and '"ci_low": ' in chart
    # the over-optimisation chart is .dvc/plots/overopt.json: a line per method and judge against sqrt(KL)
    chart = html[html.index('id = "metrics_overopt_csv"'):html.index("vegaEmbed('#metrics_overopt_csv'")]
    assert '"strokeDash": {"field": "judge"' in chart and '"sqrt_kl": ' in chart and '"method": "bon"' in chart


@pytest.mark.skipif(BROWSER is None and not os.environ.get("CQA_REQUIRE_BROWSER"),
                    reason="no headless Chromium here (CI installs chromium-headless-shell and requires it)")
def test_headless_chromium_draws_every_chart(page):
    assert BROWSER is not None, "CQA_REQUIRE_BROWSER is set but no chromium-headless-shell is installed"
    charts = len(re.findall(r"vegaEmbed\('#", page.read_text()))
    proc = subprocess.run([BROWSER, "--no-sandbox", "--disable-gpu", "--enable-logging=stderr", "--log-level=0",
                           "--virtual-time-budget=20000", "--dump-dom", page.as_uri()],
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    drawn = len(re.findall(r"<canvas\b", proc.stdout)) + len(re.findall(r'<svg\b[^>]*class="marks"', proc.stdout))
    assert charts > 20 and drawn == charts, (charts, drawn)
    console = [ln for ln in proc.stderr.splitlines() if "CONSOLE" in ln or "net::ERR" in ln]
    assert not [ln for ln in console if "Uncaught" in ln or "net::ERR" in ln or "Failed to load" in ln], console
