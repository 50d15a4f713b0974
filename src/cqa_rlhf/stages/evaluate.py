"""Stage `evaluate@<policy>`: answer the test questions with one policy and score the answers
(params: prompt, evaluate, data.source, synth.out). Writes metrics/eval_<policy>.json and a
generations table (question, reference, generated, every score) that pandas opens."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

from cqa_rlhf.config import DataConfig, EvaluateConfig, PromptConfig, SynthConfig
from cqa_rlhf.errors import cli
from cqa_rlhf.generation import generate
from cqa_rlhf.io import write_json_atomic
from cqa_rlhf.judging import (answer_metrics, generation_columns, judge, load_test_questions, summary_line,
                               use_gold, write_generations)
from cqa_rlhf.models import exported_dir, load_frozen
from cqa_rlhf.prompts import PromptFormatter
from cqa_rlhf.rollout import kl_to_reference
from cqa_rlhf.stages.common import entry_args, entry_name
from cqa_rlhf.tokenizer import load_tokenizer


def run(name: str, cfg: EvaluateConfig, prompt: PromptConfig, with_gold: bool) -> dict:
    """Evaluate policy ``name`` of ``cfg.policies``; writes its generations and metrics."""
    start = time.perf_counter()
    # 1. Questions and reference answers of the test split.
    questions, references = load_test_questions(cfg)

    # 2. One sampled answer per question (same seed for every policy).
    policy_dir = exported_dir(cfg.policies[name], f"evaluate.policies.{name}")
    tok = load_tokenizer(policy_dir)
    policy = load_frozen(policy_dir, tok, "causal")
    gens = generate(policy, PromptFormatter(prompt, tok), questions, cfg.sample, cfg.seed, cfg.max_prompt_length,
                    progress=f"evaluate@{name}")

    # 3. Judges: every reward model, and gold where it exists.
    judged = judge(gens, cfg, prompt, tok, with_gold)

    # 4. KL to the reference policy on the policy's own samples; reference overlap, length, EOS.
    reference = load_frozen(exported_dir(cfg.reference, "evaluate.reference"), tok, "causal")
    kl = kl_to_reference(policy, reference, gens, tok.pad_token_id, cfg.sample.temperature, cfg.sample.batch_size)
    metrics = {"questions": len(questions), "policy": name, **judged.means(),
               **answer_metrics(gens, references, with_gold), "kl_to_reference": round(statistics.fmean(kl), 6)}

    # 5. The generations table and the metrics, each written whole or not at all.
    out = Path(cfg.out) / name / "generations.parquet"
    write_generations(out, generation_columns(gens, references, judged, kl))
    write_json_atomic(Path(cfg.metrics_dir) / f"eval_{name}.json", metrics)
    print(summary_line(f"evaluate@{name}", metrics, time.perf_counter() - start, out))
    return metrics


@cli
def main(argv: list[str] | None = None) -> None:
    params, policy = entry_args(__doc__, "--policy", argv, help="a key of evaluate.policies")
    cfg = params.section("evaluate", EvaluateConfig)
    name = entry_name(policy, cfg.policies, "evaluate.policies", params.path)
    with_gold = use_gold(cfg, params.section("data", DataConfig), params.section("synth", SynthConfig))
    run(name, cfg, params.section("prompt", PromptConfig), with_gold)


if __name__ == "__main__":
    main()
