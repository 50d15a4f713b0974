"""Stage `evaluate@<policy>`: answer the test questions with one policy and score the answers
(params: prompt, evaluate, data.source, synth.out). Writes metrics/eval_<policy>.json and a
generations table (question, reference, generated, every score) that pandas opens."""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from cqa_rlhf.config import DataConfig, EvaluateConfig, PromptConfig, SynthConfig, parse_section, read_params
from cqa_rlhf.data.synthetic import gold
from cqa_rlhf.data.tables import read_table
from cqa_rlhf.errors import DataError, cli
from cqa_rlhf.evaluation import bleu, rouge
from cqa_rlhf.generation import generate
from cqa_rlhf.io import write_json_atomic
from cqa_rlhf.models import load_frozen
from cqa_rlhf.ppo import kl_to_reference
from cqa_rlhf.prompts import PromptFormatter
from cqa_rlhf.reward import normalization, score
from cqa_rlhf.tokenizer import load_tokenizer


def exported(path: str, what: str) -> Path:
    p = Path(path)
    if not (p / "config.json").is_file():
        raise DataError(f"{path}: {what} is not an exported model directory (no config.json)")
    return p


def use_gold(cfg: EvaluateConfig, data: DataConfig, synth: SynthConfig) -> bool:
    """Gold quality exists only for the embedded synthetic site."""
    if cfg.gold != "auto":
        return cfg.gold == "on"
    return Path(data.source).resolve() == Path(synth.out).resolve()


@cli
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--policy", required=True)
    args = ap.parse_args()
    params = read_params(args.params)
    prompt = parse_section(params, "prompt", PromptConfig, args.params)
    cfg = parse_section(params, "evaluate", EvaluateConfig, args.params)
    with_gold = use_gold(cfg, parse_section(params, "data", DataConfig, args.params),
                         parse_section(params, "synth", SynthConfig, args.params))
    if args.policy not in cfg.policies:
        raise DataError(f"{args.params}: evaluate.policies: no policy {args.policy!r} "
                        f"(have {', '.join(sorted(cfg.policies))})")
    start = time.perf_counter()

    # 1. Questions and reference answers of the test split.
    rows = read_table(Path(cfg.data) / "test" / "sft").to_pylist()[: cfg.max_questions]
    if not rows:
        raise DataError(f"{cfg.data}/test/sft: no test questions")
    questions, references = [r["question"] for r in rows], [r["answer"] for r in rows]

    # 2. One sampled answer per question (same seed for every policy).
    policy_dir = exported(cfg.policies[args.policy], f"evaluate.policies.{args.policy}")
    tok = load_tokenizer(policy_dir)
    fmt = PromptFormatter(prompt, tok)
    policy = load_frozen(policy_dir, tok, "causal")
    gens = generate(policy, fmt, questions, cfg.sample, cfg.seed, cfg.max_prompt_length)
    answers = [g.text for g in gens]

    # 3. Judges: every reward model through the scoring API, and gold where it exists.
    columns: dict[str, list] = {"question": questions, "reference": references, "generated": answers,
                                "ended": [g.ended for g in gens], "tokens": [len(g.response_ids) for g in gens]}
    metrics: dict[str, float | int | str] = {"questions": len(rows), "policy": args.policy}
    for name, path in sorted(cfg.reward_models.items()):
        rm_dir = exported(path, f"evaluate.reward_models.{name}")
        rm_tok = load_tokenizer(rm_dir)
        rm = load_frozen(rm_dir, rm_tok, "reward")
        mean, std = normalization(rm)
        s = score(rm, PromptFormatter(prompt, rm_tok), list(zip(questions, answers)), cfg.max_length,
                  cfg.score_batch_size)
        columns[f"score_{name}"] = s
        metrics[f"score_{name}"] = round(statistics.fmean(s), 6)
        metrics[f"score_{name}_normalized"] = round((statistics.fmean(s) - mean) / std, 6)
    if with_gold:
        columns["gold"] = [gold(q, a) for q, a in zip(questions, answers)]
        metrics["gold"] = round(statistics.fmean(columns["gold"]), 6)
        metrics["gold_reference"] = round(statistics.fmean(gold(q, r) for q, r in zip(questions, references)), 6)

    # 4. Reference overlap, length, EOS, and KL to the reference policy on the policy's own samples.
    ref_dir = exported(cfg.reference, "evaluate.reference")
    kl = kl_to_reference(policy, load_frozen(ref_dir, tok, "causal"), fmt, gens, cfg.max_prompt_length,
                         cfg.sample.temperature, cfg.sample.batch_size)
    columns["kl"] = kl
    metrics.update({"bleu": round(bleu(answers, references), 4),
                    **{k: round(v, 6) for k, v in rouge(answers, references).items()},
                    "mean_tokens": round(statistics.fmean(columns["tokens"]), 3),
                    "mean_words": round(statistics.fmean(len(a.split()) for a in answers), 3),
                    "eos_rate": round(sum(columns["ended"]) / len(rows), 6),
                    "kl_to_reference": round(statistics.fmean(kl), 6)})

    # 5. The generations table and the metrics, each written whole or not at all.
    out = Path(cfg.out) / args.policy / "generations.parquet"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    pq.write_table(pa.table(columns), tmp)
    tmp.replace(out)
    write_json_atomic(Path(cfg.metrics_dir) / f"eval_{args.policy}.json", metrics)
    judges = ", ".join(f"{k} {v:.3f}" for k, v in metrics.items() if k.startswith(("score_", "gold"))
                       and not k.endswith("normalized"))
    print(f"evaluate@{args.policy}: {len(rows)} questions; {judges}; KL {metrics['kl_to_reference']:.2f}; "
          f"BLEU {metrics['bleu']:.2f}; {time.perf_counter() - start:.0f}s -> {out}")


if __name__ == "__main__":
    main()
