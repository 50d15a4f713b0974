"""Stage `overopt`: reward over-optimisation curves, the experiment of Gao et al. 2022 (params:
prompt, evaluate, bon, overopt, the sections of overopt.methods, data.source, synth.out).

On the first ``overopt.prompts`` held-out prompts (the online stages' evaluation set), gold and
proxy score against d = sqrt(KL to SFT):
- each online method (``overopt.methods``) at every held-out evaluation of its run (its sample
  tables: the SFT policy as iteration 0, then every ``eval_every`` iterations), with KL its k1
  estimate on those answers, scored by gold and by every reward model (from the answer text);
- Best-of-N from ``bon.policy`` by ``bon.reward_model`` for N = 1, 2, 4, ..., ``overopt.pool``,
  the unbiased estimate from ``pool`` answers to each prompt, with KL the bound log N - (N-1)/N.
Gains are over the SFT point of the same curve; proxy scores in the reward model's normalised
units. Gao's forms are fitted to the gold gains: BoN d(alpha - beta d), RL d(alpha - beta log d).
Writes metrics/overopt.json (fits, peaks, the furthest point) and metrics/overopt.csv (the plot).
"""

from __future__ import annotations

import csv
import math
import statistics
import time
from pathlib import Path

from cqa_rlhf.best_of_n import sample_pool
from cqa_rlhf.bon_math import best_of_n_expectation, gao_fit, gao_peak, kl_bound
from cqa_rlhf.config import SECTIONS, BoNConfig, DataConfig, EvaluateConfig, OveroptConfig, PromptConfig, SynthConfig
from cqa_rlhf.data.synthetic import gold
from cqa_rlhf.data.tables import read_table
from cqa_rlhf.errors import ConfigError, DataError, cli
from cqa_rlhf.io import atomic_path, write_json_atomic
from cqa_rlhf.judging import judge, load_judges, normalised, use_gold
from cqa_rlhf.models import exported_dir, load_frozen
from cqa_rlhf.prompts import PromptFormatter
from cqa_rlhf.reward import Judge, score
from cqa_rlhf.stages.common import Params, stage_args
from cqa_rlhf.tokenizer import load_tokenizer

Point = dict[str, float]


def proxy_name(evaluate: EvaluateConfig, path: str, what: str) -> str:
    """The key of ``evaluate.reward_models`` whose model is ``path`` (a method's proxy)."""
    for name, rm in evaluate.reward_models.items():
        if Path(rm).resolve() == Path(path).resolve():
            return name
    raise ConfigError(f"{what}: {path} is not one of evaluate.reward_models ({', '.join(evaluate.reward_models)})")


def read_samples(samples_dir: Path, questions: set[str]) -> dict[int, list[dict]]:
    """Iteration -> the sample table's rows on ``questions`` (tables of every held-out evaluation)."""
    tables = sorted(samples_dir.glob("iteration_*.csv"))
    if not tables or tables[0].name != "iteration_0000.csv":
        raise DataError(f"{samples_dir}: no sample table of iteration 0 (the SFT policy); rerun its stage")
    out = {}
    for path in tables:
        with open(path, newline="", encoding="utf-8") as f:
            rows = [r for r in csv.DictReader(f) if r["question"] in questions]
        if not rows or "kl" not in rows[0]:
            raise DataError(f"{path}: no answers to the held-out prompts, or no kl column; rerun its stage")
        out[int(path.stem.split("_")[1])] = rows
    return out


def judge_texts(rows: list[dict], judges: dict[str, Judge], fmt: PromptFormatter, evaluate: EvaluateConfig,
                with_gold: bool) -> Point:
    """Every reward model's mean normalised score of the answer texts (cf. judging.judge, which
    scores sampled ids; ``fmt`` encodes the texts for a judge that shares the policy's
    tokenizer), and the mean gold."""
    pairs = [(r["question"], r["answer"]) for r in rows]
    out = {name: normalised(statistics.fmean(score(j.model, j.retokenize or fmt, pairs, evaluate.max_length,
                                                   evaluate.score_batch_size)), j.norm)
           for name, j in judges.items()}
    if with_gold:
        out["gold"] = statistics.fmean(gold(q, a) for q, a in pairs)
    return out


def rl_curve(tables: dict[int, list[dict]], proxy: str, judges: dict[str, Judge], fmt: PromptFormatter,
             evaluate: EvaluateConfig, with_gold: bool) -> list[Point]:
    """One point per held-out evaluation: KL, gold, proxy and every reward model (normalised)."""
    points = []
    for iteration, rows in sorted(tables.items()):
        kl = max(statistics.fmean(float(r["kl"]) for r in rows), 0.0)  # k1's mean can dip below 0 near SFT
        point = {"step": iteration, "kl": kl, **judge_texts(rows, judges, fmt, evaluate, with_gold)}
        points.append({**point, "proxy": point[proxy]})
    return points


def bon_curve(cfg: OveroptConfig, bon: BoNConfig, questions: list[str], evaluate: EvaluateConfig,
              prompt: PromptConfig, with_gold: bool) -> list[Point]:
    """Best-of-N for N = 1, 2, 4, ..., pool: every judge's expected score of the proxy's pick."""
    policy_dir = exported_dir(bon.policy, "bon.policy")
    tok = load_tokenizer(policy_dir)
    pool = sample_pool(load_frozen(policy_dir, tok, "causal"), PromptFormatter(prompt, tok), questions,
                       evaluate.sample, cfg.seed, evaluate.max_prompt_length, cfg.pool, progress="overopt (BoN)")
    judged = judge(pool, evaluate, prompt, tok, with_gold)
    proxy = judged.columns[f"score_{bon.reward_model}"]
    m, points = cfg.pool, []
    for n in [2 ** i for i in range(int(math.log2(m)) + 1)]:
        point: Point = {"step": n, "kl": kl_bound(n)}
        for key, values in judged.columns.items():
            per_q = [best_of_n_expectation(proxy[g * m: (g + 1) * m], values[g * m: (g + 1) * m], n)
                     for g in range(len(questions))]
            name = key.removeprefix("score_")
            point[name] = normalised(statistics.fmean(per_q), judged.norms.get(name))
        points.append({**point, "proxy": point[bon.reward_model]})
    return points


def summarise(points: list[Point], form: str, with_gold: bool) -> dict:
    """Gains over the first (SFT) point; Gao's form fitted to the gold gains; the furthest point."""
    base = points[0]
    for p in points:
        p["sqrt_kl"] = math.sqrt(p["kl"])
        p["proxy_gain"] = p["proxy"] - base["proxy"]
        if with_gold:
            p["gold_gain"] = p["gold"] - base["gold"]
    last = points[-1]
    out = {"points": len(points), "kl_last": round(last["kl"], 6), "proxy_gain_last": round(last["proxy_gain"], 6)}
    if with_gold:
        best = max(points, key=lambda p: p["gold_gain"])
        out.update(gold_gain_last=round(last["gold_gain"], 6), gold_gain_best=round(best["gold_gain"], 6),
                   kl_at_best_gold=round(best["kl"], 6), gold_turns_down=last["gold_gain"] < best["gold_gain"], **fit(points, form))
    return out


def fit(points: list[Point], form: str) -> dict:
    """Gao's form fitted to the gold gains: alpha, beta and the KL where the fit peaks (nulls when
    the points cannot separate the two terms, e.g. fewer than two points beyond SFT)."""
    try:
        alpha, beta = gao_fit([p["sqrt_kl"] for p in points], [p["gold_gain"] for p in points], form)
    except ValueError:
        return {"alpha": None, "beta": None, "fitted_peak_kl": None}
    peak = gao_peak(alpha, beta, form)
    return {"alpha": round(alpha, 6), "beta": round(beta, 6), "fitted_peak_kl": None if peak is None else round(peak ** 2, 6)}


def write_plot(path: str | Path, curves: dict[str, list[Point]], with_gold: bool) -> None:
    """One row per (method, judge, point): the gain against sqrt(KL), for `dvc plots`."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["method", "judge", "step", "kl", "sqrt_kl", "gain"])
        for method, points in curves.items():
            for judge_name in (("gold", "proxy") if with_gold else ("proxy",)):
                for p in points:
                    w.writerow([method, judge_name, p["step"], round(p["kl"], 6), round(p["sqrt_kl"], 6),
                                round(p[f"{judge_name}_gain"], 6)])


def held_out(cfg: OveroptConfig) -> list[str]:
    questions = [r["question"] for r in read_table(Path(cfg.data) / "val" / "prompts").to_pylist()][: cfg.prompts]
    if not questions:
        raise DataError(f"{cfg.data}/val/prompts: no held-out prompts")
    return questions


def run(cfg: OveroptConfig, sections: dict, bon: BoNConfig, evaluate: EvaluateConfig, prompt: PromptConfig,
        tokenizer_dir: str, with_gold: bool) -> dict:
    """The curves of every method of ``cfg.methods`` (``sections``: name -> its stage's config) and
    of Best-of-N; writes the metrics and the plot."""
    start, questions = time.perf_counter(), held_out(cfg)
    curves = {"bon": bon_curve(cfg, bon, questions, evaluate, prompt, with_gold)}
    tok = load_tokenizer(tokenizer_dir)
    judges, fmt = load_judges(evaluate, prompt, tok), PromptFormatter(prompt, tok)
    for name, section in sections.items():
        tables = read_samples(Path(section.live_dir) / "samples", set(questions))
        proxy = proxy_name(evaluate, section.reward_model, f"{cfg.methods[name]}.reward_model")
        curves[name] = rl_curve(tables, proxy, judges, fmt, evaluate, with_gold)
    metrics = {"prompts": len(questions), "pool": cfg.pool,
               **{name: summarise(points, "bon" if name == "bon" else "rl", with_gold) for name, points in curves.items()}}
    write_json_atomic(cfg.metrics, metrics)
    write_plot(cfg.plot, curves, with_gold)
    shown = "; ".join(f"{k}: KL {v['kl_last']:.2f}" + (f", gold gain {v['gold_gain_last']:+.3f} (best {v['gold_gain_best']:+.3f} "
                      f"at KL {v['kl_at_best_gold']:.2f})" if with_gold else "") for k, v in metrics.items() if isinstance(v, dict))
    print(f"overopt: {len(questions)} prompts; {shown}; {time.perf_counter() - start:.0f}s -> {cfg.metrics}")
    return metrics


def method_sections(params: Params, cfg: OveroptConfig) -> dict:
    """Method -> its online stage's config (``overopt.methods`` names the section)."""
    out = {}
    for name, section in cfg.methods.items():
        model = SECTIONS.get(section)
        if model is None or "reward_model" not in model.model_fields or "live_dir" not in model.model_fields:
            raise ConfigError(f"{params.path}: overopt.methods.{name}: {section!r} is not an online stage's section")
        out[name] = params.section(section, model)
    return out


@cli
def main(argv: list[str] | None = None) -> None:
    params = Params.read(stage_args(__doc__, argv).params)
    cfg, evaluate = params.section("overopt", OveroptConfig), params.section("evaluate", EvaluateConfig)
    with_gold = use_gold(evaluate, params.section("data", DataConfig), params.section("synth", SynthConfig))
    run(cfg, method_sections(params, cfg), params.section("bon", BoNConfig), evaluate,
        params.section("prompt", PromptConfig), params.shared().tokenizer.out, with_gold)


if __name__ == "__main__":
    main()
