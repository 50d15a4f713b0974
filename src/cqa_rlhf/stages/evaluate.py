"""Stage `evaluate@<policy>`: answer the test questions with one policy and score the answers
(params: prompt, evaluate, data.source, synth.out). Writes metrics/eval_<policy>.json and a
generations table (question, reference, generated, every score) that pandas opens."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from cqa_rlhf.config import DataConfig, EvaluateConfig, PromptConfig, SynthConfig
from cqa_rlhf.data.synthetic import gold
from cqa_rlhf.data.tables import read_table
from cqa_rlhf.errors import ConfigError, DataError, cli
from cqa_rlhf.evaluation import bleu, rouge
from cqa_rlhf.generation import Generation, generate
from cqa_rlhf.io import atomic_path, write_json_atomic
from cqa_rlhf.models import exported_dir, load_frozen
from cqa_rlhf.prompts import PromptFormatter
from cqa_rlhf.reward import load_judge
from cqa_rlhf.rollout import kl_to_reference, score_generations
from cqa_rlhf.stages.common import Params, stage_parser
from cqa_rlhf.tokenizer import load_tokenizer


def use_gold(cfg: EvaluateConfig, data: DataConfig, synth: SynthConfig) -> bool:
    """Gold quality exists only for the embedded synthetic site."""
    if cfg.gold != "auto":
        return cfg.gold == "on"
    return Path(data.source).resolve() == Path(synth.out).resolve()


def judge(gens: list[Generation], references: list[str], cfg: EvaluateConfig, prompt: PromptConfig,
          tok, with_gold: bool) -> tuple[dict[str, list], dict[str, float]]:
    """Every reward model's score of every answer (on the exact sampled ids when it shares the
    policy's tokenizer), and gold where it exists: (table columns, their means)."""
    columns: dict[str, list] = {}
    metrics: dict[str, float] = {}
    for name, path in sorted(cfg.reward_models.items()):
        j = load_judge(path, f"evaluate.reward_models.{name}", prompt, tok)
        s = score_generations(j.model, gens, tok.pad_token_id, cfg.max_length, cfg.score_batch_size, j.retokenize)
        columns[f"score_{name}"] = s
        metrics[f"score_{name}"] = round(statistics.fmean(s), 6)
        metrics[f"score_{name}_normalized"] = round((statistics.fmean(s) - j.norm[0]) / j.norm[1], 6)
    if with_gold:
        columns["gold"] = [gold(g.question, g.text) for g in gens]
        metrics["gold"] = round(statistics.fmean(columns["gold"]), 6)
        metrics["gold_reference"] = round(statistics.fmean(gold(g.question, r) for g, r in zip(gens, references)), 6)
    return columns, metrics


def write_generations(path: Path, columns: dict[str, list]) -> None:
    with atomic_path(path) as tmp:
        pq.write_table(pa.table(columns), tmp)


def run(name: str, cfg: EvaluateConfig, prompt: PromptConfig, with_gold: bool) -> dict:
    """Evaluate policy ``name`` of ``cfg.policies``; writes its generations and metrics."""
    start = time.perf_counter()
    # 1. Questions and reference answers of the test split.
    rows = read_table(Path(cfg.data) / "test" / "sft").to_pylist()[: cfg.max_questions]
    if not rows:
        raise DataError(f"{cfg.data}/test/sft: no test questions")
    questions, references = [r["question"] for r in rows], [r["answer"] for r in rows]

    # 2. One sampled answer per question (same seed for every policy).
    policy_dir = exported_dir(cfg.policies[name], f"evaluate.policies.{name}")
    tok = load_tokenizer(policy_dir)
    policy = load_frozen(policy_dir, tok, "causal")
    gens = generate(policy, PromptFormatter(prompt, tok), questions, cfg.sample, cfg.seed, cfg.max_prompt_length,
                    progress=f"evaluate@{name}")
    answers = [g.text for g in gens]

    # 3. Judges: every reward model, and gold where it exists.
    scores, judged = judge(gens, references, cfg, prompt, tok, with_gold)

    # 4. Reference overlap, length, EOS, and KL to the reference policy on the policy's own samples.
    reference = load_frozen(exported_dir(cfg.reference, "evaluate.reference"), tok, "causal")
    kl = kl_to_reference(policy, reference, gens, tok.pad_token_id, cfg.sample.temperature, cfg.sample.batch_size)
    columns = {"question": questions, "reference": references, "generated": answers,
               "ended": [g.ended for g in gens], "tokens": [len(g.response_ids) for g in gens], **scores, "kl": kl}
    metrics = {"questions": len(rows), "policy": name, **judged, "bleu": round(bleu(answers, references), 4),
               **{k: round(v, 6) for k, v in rouge(answers, references).items()},
               "mean_tokens": round(statistics.fmean(columns["tokens"]), 3),
               "mean_words": round(statistics.fmean(len(a.split()) for a in answers), 3),
               "eos_rate": round(sum(columns["ended"]) / len(rows), 6),
               "kl_to_reference": round(statistics.fmean(kl), 6)}

    # 5. The generations table and the metrics, each written whole or not at all.
    out = Path(cfg.out) / name / "generations.parquet"
    write_generations(out, columns)
    write_json_atomic(Path(cfg.metrics_dir) / f"eval_{name}.json", metrics)
    shown = ", ".join(f"{k} {v:.3f}" for k, v in judged.items() if not k.endswith("normalized"))
    print(f"evaluate@{name}: {len(rows)} questions; {shown}; KL {metrics['kl_to_reference']:.2f}; "
          f"BLEU {metrics['bleu']:.2f}; {time.perf_counter() - start:.0f}s -> {out}")
    return metrics


@cli
def main(argv: list[str] | None = None) -> None:
    parser = stage_parser(__doc__)
    parser.add_argument("--policy", required=True, help="a key of evaluate.policies")
    args = parser.parse_args(argv)
    params = Params.read(args.params)
    cfg = params.section("evaluate", EvaluateConfig)
    if args.policy not in cfg.policies:
        raise ConfigError(f"{args.params}: evaluate.policies: no policy {args.policy!r} "
                          f"(have {', '.join(sorted(cfg.policies))})")
    with_gold = use_gold(cfg, params.section("data", DataConfig), params.section("synth", SynthConfig))
    run(args.policy, cfg, params.section("prompt", PromptConfig), with_gold)


if __name__ == "__main__":
    main()
