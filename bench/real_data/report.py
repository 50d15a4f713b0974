"""The real-data run's report, from what collect.py committed (``bench/real_data/<date>/``):
``report.md`` beside the data, which docs/pretrained.md includes as is, so the page's figures are
the committed metrics and cannot go stale.

    python bench/real_data/report.py bench/real_data/<date> [--judge regression] [--samples 3]

Sections: the reward models against the length baseline (the held-out human votes of the test
pairs), the judges' agreement, the policies by the independent judge with their length against
SFT's (the issue's "within 15%"), the leaderboard compare wrote, stage times and peak memory, and
sample answers of SFT and the best policy."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

LENGTH_TOLERANCE = 0.15  # a win counts only if the policy's mean length is within 15% of SFT's


def ci(value: float, bounds: dict, digits: int = 3) -> str:
    return f"{value:.{digits}f} [{bounds['low']:.{digits}f}, {bounds['high']:.{digits}f}]"


def signed_ci(value: float, bounds: dict) -> str:
    return f"{value:+.3f} [{bounds['low']:+.3f}, {bounds['high']:+.3f}]"


def reward_table(metrics: Path, params: dict) -> list[str]:
    """One row per reward model: test pairwise accuracy, the length baseline and their paired difference."""
    rows = ["| reward model (training questions) | test pairs | accuracy [95% CI] | untrained | longer answer wins | accuracy − length baseline, paired |",
            "|---|---|---|---|---|---|"]
    for kind, cfg in sorted(params["reward"].items()):
        m = json.loads((metrics / f"reward_{kind}.json").read_text())
        rows.append(f"| {kind} ({cfg.get('train_questions', 'all')}, {m['steps']} steps) | {m['pairs']} | "
                    f"{ci(m['pairwise_accuracy'], m['pairwise_accuracy_ci95'])} | {m['untrained_pairwise_accuracy']:.3f} | "
                    f"{ci(m['length_baseline_accuracy'], m['length_baseline_ci95'])} | "
                    f"{signed_ci(m['accuracy_over_length'], m['accuracy_over_length_ci95'])} |")
    return rows


CURVES = {"classification": ("accuracy",), "regression": ("sign_accuracy", "mae")}  # validation curves per kind


def learning_curve(run_dir: Path, params: dict) -> list[str]:
    """Each reward model's validation checks through its one epoch, against the share of its
    training data seen by then: where more data would take it. The classification model's is its
    pairwise accuracy on the validation pairs; the regression model's, the original project's
    checks on the validation answers (sign of the predicted score, mean absolute error)."""
    rows = ["| reward model | step | share of its steps | validation |", "|---|---|---|---|"]
    for kind in sorted(params["reward"]):
        val = run_dir / "dvclive" / "reward" / kind / "plots" / "metrics" / "val"
        curves = {name: dict(line.split("\t")[:2] for line in (val / f"{name}.tsv").read_text().splitlines()[1:])
                  for name in CURVES.get(kind, ()) if (val / f"{name}.tsv").exists()}
        if not curves:
            continue
        steps = json.loads((run_dir / "metrics" / f"reward_{kind}.json").read_text())["steps"]
        for step in sorted(next(iter(curves.values())), key=int):
            shown = ", ".join(f"{name.replace('_', ' ')} {float(c[step]):.3f}" for name, c in curves.items() if step in c)
            rows.append(f"| {kind} | {int(step) + 1} | {(int(step) + 1) / steps:.2f} | {shown} |")
    return rows


def length_table(pairs: dict) -> list[str]:
    """pair_analysis.py's test-pair figures: what each reward model's verdicts have to do with length."""
    test = pairs["test"]
    pct = lambda r: f"{r['rate']:.3f} [{r['ci95']['low']:.3f}, {r['ci95']['high']:.3f}] (n {r['n']})"  # noqa: E731
    rows = ["| reward model | accuracy, voters chose the longer | accuracy, voters chose the shorter | picks the longer | Spearman(score, length) |",
            "|---|---|---|---|---|"]
    for kind in ("classification", "regression"):
        k = test[kind]
        rows.append(f"| {kind} | {pct(k['accuracy_voters_chose_longer'])} | {pct(k['accuracy_voters_chose_shorter'])} | "
                    f"{pct(k['picks_the_longer'])} | {k['spearman_score_length']:.3f} |")
    return rows + ["", f"Voters chose the longer answer in {pct(test['voters_chose_longer'])} of the pairs; the two reward "
                       f"models pick the same answer in {pct(test['same_pick'])}, their margins' Spearman "
                       f"{test['margin_spearman']:.3f}."]


def judges_table(compare: dict) -> list[str]:
    rows = ["| judges | Pearson | Spearman | same verdict against SFT |", "|---|---|---|---|"]
    for pair, v in sorted(compare.get("judges", {}).items()):
        rows.append(f"| {pair.replace('~', ' and ')} | {v['pearson']:.3f} | {v['spearman']:.3f} | {v['verdict_agreement']:.3f} |")
    return rows


def policy_table(compare: dict, judge: str) -> list[str]:
    """Each policy's win rate over SFT by ``judge``, and whether it wins with SFT's length (±15%)."""
    pol = compare["policies"]
    sft_tokens = pol["sft"]["mean_tokens"]
    rows = [f"| policy | win over SFT by {judge} [95% CI] | mean tokens (SFT {sft_tokens:.1f}) | length / SFT | EOS rate | KL to SFT | beats SFT, length within 15% |",
            "|---|---|---|---|---|---|---|"]
    for key, v in compare.items():
        if not key.endswith("_vs_sft") or key.startswith("base_"):
            continue
        name = key.removesuffix("_vs_sft")
        rate, bounds, p = v["win_rate"][judge], v["win_rate_ci95"][judge], pol[name]
        ratio = p["mean_tokens"] / sft_tokens
        wins = bounds["low"] > 0.5 and abs(ratio - 1) <= LENGTH_TOLERANCE
        label = f"{name} (oracle: not a method)" if name.endswith("_oracle") else name
        rows.append(f"| {label} | {ci(rate, bounds)} | {p['mean_tokens']:.1f} | {ratio:.2f} | {p['eos_rate']:.3f} | "
                    f"{p['kl_to_reference']:.2f} | {'yes' if wins else 'no'} |")
    return rows


def usage_table(run: dict) -> list[str]:
    """Per stage: the wall time it reports for its last invocation (timing.json, training stages),
    the time monitor.sh saw it run over every session, and its peak resident memory."""
    last = {k.replace("/", "@"): v for k, v in run["stage_wall_s"].items()}
    usage = run.get("stage_usage", {})
    fmt = lambda v: "—" if v is None else f"{v:.0f}"  # noqa: E731
    rows = ["| stage | wall, last invocation (s) | wall, every session (s) | peak memory (MB) |", "|---|---|---|---|"]
    for stage in sorted(set(last) | set(usage)):
        u = usage.get(stage, {})
        rows.append(f"| {stage} | {fmt(last.get(stage))} | {fmt(u.get('sampled_wall_s'))} | {fmt(u.get('peak_rss_mb'))} |")
    return rows


def sample_lines(samples: list[dict], judge: str, n: int) -> list[str]:
    out = []
    for s in samples[:n]:
        best = next(k for k in s if k not in ("question", "sft") and not k.startswith("score_"))
        quote = lambda text: " ".join(text.split())[:600]  # noqa: E731  one paragraph, bounded
        out += [f"> **Q:** {quote(s['question'])}", ">",
                f"> **SFT** ({judge} {s[f'score_{judge}_sft']:+.2f}): {quote(s['sft'])}", ">",
                f"> **{best}** ({judge} {s[f'score_{judge}_{best}']:+.2f}): {quote(s[best])}", ""]
    return out


def report(run_dir: Path, judge: str, n_samples: int) -> str:
    import yaml

    params = yaml.safe_load((run_dir / "params.yaml").read_text())
    compare = json.loads((run_dir / "metrics" / "compare.json").read_text())
    run = json.loads((run_dir / "run.json").read_text())
    samples = json.loads((run_dir / "samples.json").read_text())
    parts = [f"Run of {run['date']} on {run['cpu']} ({run['preset']}); {compare['questions']} test questions.", "",
             "**Reward models against the held-out human votes** (test pairs; intervals are 95%):", "",
             *reward_table(run_dir / "metrics", params), "",
             "**What they read** (`pairs.json`: the test pairs split by the answer the voters chose):", "",
             *length_table(json.loads((run_dir / "pairs.json").read_text())), "",
             "**Learning curve** (every validation check; in one epoch, the share of steps is the share of the training data seen):", "",
             *learning_curve(run_dir, params), "", "**The judges' agreement** (every evaluated answer):", "",
             *judges_table(compare), "", f"**Policies by the independent judge ({judge})**:", "",
             *policy_table(compare, judge), "", "**Leaderboard** (compare's, every judge):", "",
             (run_dir / "metrics" / "leaderboard.md").read_text().strip(), "",
             f"**Time and memory** (peak of any stage: {run.get('peak_rss_mb', '—')} MB):", "", *usage_table(run), "",
             f"**Sample answers** (the first test questions; SFT and the policy {judge} ranks best):", "",
             *sample_lines(samples, judge, n_samples)]
    return "\n".join(parts).rstrip() + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--judge", default="regression")
    ap.add_argument("--samples", type=int, default=3)
    args = ap.parse_args()
    (args.run_dir / "report.md").write_text(report(args.run_dir, args.judge, args.samples))
    print(f"wrote {args.run_dir / 'report.md'}")


if __name__ == "__main__":
    main()
