"""Stage `bon`: Best-of-N as a policy on the test questions (params: prompt, evaluate, bon,
data.source, synth.out). N answers to each question from ``bon.policy``; the reward model picks
one (``best_of_n``), and, where gold exists, gold picks one (``oracle``, the headroom of a perfect
judge). Each pick is evaluated like a trained policy: every judge, reference overlap, length,
EOS, and its KL to the sampling policy (the sampled estimate beside the analytic bound
log N - (N-1)/N). Writes <bon.out>/generations.parquet, <bon.out>/oracle/generations.parquet and
metrics/eval_bon.json."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

from cqa_rlhf.best_of_n import group_kls, pick, sample_pool
from cqa_rlhf.bon_math import kl_bound
from cqa_rlhf.config import BoNConfig, DataConfig, EvaluateConfig, PromptConfig, SynthConfig
from cqa_rlhf.errors import ConfigError, cli
from cqa_rlhf.io import write_json_atomic
from cqa_rlhf.judging import (answer_metrics, generation_columns, judge, load_test_questions, summary_line,
                               use_gold, write_generations)
from cqa_rlhf.models import exported_dir, load_frozen
from cqa_rlhf.prompts import PromptFormatter
from cqa_rlhf.stages.common import Params, stage_args
from cqa_rlhf.tokenizer import load_tokenizer


def pickers(cfg: BoNConfig, evaluate: EvaluateConfig, with_gold: bool) -> dict[str, str]:
    """Output name -> the judge column that picks: the reward model, and gold for the oracle."""
    if cfg.reward_model not in evaluate.reward_models:
        raise ConfigError(f"bon.reward_model: {cfg.reward_model!r} is not a key of evaluate.reward_models "
                          f"(have {', '.join(sorted(evaluate.reward_models))})")
    return {"best_of_n": f"score_{cfg.reward_model}", **({"oracle": "gold"} if cfg.oracle and with_gold else {})}


def run(cfg: BoNConfig, evaluate: EvaluateConfig, prompt: PromptConfig, with_gold: bool) -> dict:
    """Best-of-``cfg.n`` by the reward model (and by gold); writes both tables and the metrics."""
    start, picked_by = time.perf_counter(), pickers(cfg, evaluate, with_gold)
    # 1. The test questions, as every policy answers them.
    questions, references = load_test_questions(evaluate)

    # 2. The pool: n answers to each question from the sampling policy ([Q * n]).
    policy_dir = exported_dir(cfg.policy, "bon.policy")
    tok = load_tokenizer(policy_dir)
    pool = sample_pool(load_frozen(policy_dir, tok, "causal"), PromptFormatter(prompt, tok), questions,
                       evaluate.sample, cfg.seed, evaluate.max_prompt_length, cfg.n, progress="bon")

    # 3. Every judge scores every answer of the pool.
    judged = judge(pool, evaluate, prompt, tok, with_gold)

    # 4. Each picker's answers, evaluated like a policy's; KL: the sampled estimate and the bound.
    metrics: dict = {"n": cfg.n, "reward_model": cfg.reward_model, "kl_bound": round(kl_bound(cfg.n), 6)}
    for name, column in picked_by.items():
        idx = pick(judged.columns[column], cfg.n)
        chosen, kl = [pool[i] for i in idx], group_kls(judged.columns[column], pool, cfg.n)
        metrics[name] = {"questions": len(questions), **judged.select(idx).means(),
                         **answer_metrics(chosen, references, with_gold),
                         "kl_to_reference": round(statistics.fmean(kl), 6)}
        out = Path(cfg.out) / ("" if name == "best_of_n" else name) / "generations.parquet"
        write_generations(out, generation_columns(chosen, references, judged.select(idx), kl))
        print(summary_line(f"bon ({name}, N={cfg.n}, KL bound {metrics['kl_bound']:.2f})", metrics[name],
                           time.perf_counter() - start, out))
    write_json_atomic(cfg.metrics, metrics)
    return metrics


@cli
def main(argv: list[str] | None = None) -> None:
    params = Params.read(stage_args(__doc__, argv).params)
    evaluate = params.section("evaluate", EvaluateConfig)
    with_gold = use_gold(evaluate, params.section("data", DataConfig), params.section("synth", SynthConfig))
    run(params.section("bon", BoNConfig), evaluate, params.section("prompt", PromptConfig), with_gold)


if __name__ == "__main__":
    main()
