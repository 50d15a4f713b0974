"""Stage `reward@<kind>`: a reward model by regression on answer scores or by contrastive
(Bradley-Terry) classification of pairs (params: prompt, model, trainer, reward.<kind>)."""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import lightning as L

from torch.utils.data import DataLoader

from cqa_rlhf.batches import EvalBatchSampler, LengthGroupedBatchSampler, ListDataset, ResumableDataLoader
from cqa_rlhf.config import ModelConfig, PromptConfig, RewardConfig, TokenizerConfig, TrainerConfig, parse_section, read_params
from cqa_rlhf.data.tables import read_table
from cqa_rlhf.errors import cli
from cqa_rlhf.io import write_json_atomic
from cqa_rlhf.models import build_model
from cqa_rlhf.prompts import PromptFormatter
from cqa_rlhf.reward import (
    PairCollator,
    PairwiseModule,
    RegressionModule,
    ScoredCollator,
    encode_pairs,
    encode_scored,
    pair_lengths,
    pair_metrics,
    score,
)
from cqa_rlhf.tokenizer import load_tokenizer
from cqa_rlhf.training import apply_freeze, export_pretrained, fingerprint, load_best_weights, prepare_run


def test_pair_metrics(model, fmt: PromptFormatter, rows: list[dict], cfg) -> dict[str, float]:
    rc = score(model, fmt, [(r["question"], r["chosen"]) for r in rows], cfg.max_length, cfg.score_batch_size)
    rr = score(model, fmt, [(r["question"], r["rejected"]) for r in rows], cfg.max_length, cfg.score_batch_size)
    return pair_metrics(rc, rr, [r["chosen"] for r in rows], [r["rejected"] for r in rows])


def validation_metrics(kind: str, model, fmt: PromptFormatter, data: Path, cfg) -> dict[str, float]:
    """The best model on the validation split, through the scoring API: MAE and sign accuracy of
    scores (regression), or pairwise accuracy (classification)."""
    if kind == "regression":
        rows = read_table(data / "val" / "reward").to_pylist()
        pred = score(model, fmt, [(r["question"], r["answer"]) for r in rows], cfg.max_length, cfg.score_batch_size)
        n = max(len(rows), 1)
        return {"val_mae": round(sum(abs(p - r["score"]) for p, r in zip(pred, rows)) / n, 6),
                "val_sign_accuracy": round(sum((p > 0) == (r["score"] > 0) for p, r in zip(pred, rows)) / n, 6)}
    rows = read_table(data / "val" / "pairs").to_pylist()
    rc = score(model, fmt, [(r["question"], r["chosen"]) for r in rows], cfg.max_length, cfg.score_batch_size)
    rr = score(model, fmt, [(r["question"], r["rejected"]) for r in rows], cfg.max_length, cfg.score_batch_size)
    return {"val_pairwise_accuracy": round(sum(c > r for c, r in zip(rc, rr)) / max(len(rows), 1), 6)}


@cli
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--kind", choices=["regression", "classification"], required=True)
    args = ap.parse_args()
    params = read_params(args.params)
    prompt = parse_section(params, "prompt", PromptConfig, args.params)
    model_cfg = parse_section(params, "model", ModelConfig, args.params)
    tok_cfg = parse_section(params, "tokenizer", TokenizerConfig, args.params)
    shared = parse_section(params, "trainer", TrainerConfig, args.params)
    cfg = getattr(parse_section(params, "reward", RewardConfig, args.params), args.kind)
    resolved = {"prompt": prompt.model_dump(mode="json"), "model": model_cfg.model_dump(mode="json"),
                "trainer": shared.model_dump(mode="json"), "reward": {args.kind: cfg.model_dump(mode="json")}}
    start = time.perf_counter()

    # 1. Data: scored answers (regression) or preference pairs (classification).
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    tok = load_tokenizer(tok_cfg.out)
    fmt = PromptFormatter(prompt, tok)
    data = Path(cfg.data)
    if args.kind == "regression":
        table, encode, collate, lengths = "reward", encode_scored, ScoredCollator(tok.pad_token_id), None
    else:
        table, encode, collate, lengths = "pairs", encode_pairs, PairCollator(tok.pad_token_id), pair_lengths
    train_items = encode(read_table(data / "train" / table).to_pylist(), fmt, cfg.max_length)
    val_items = encode(read_table(data / "val" / table).to_pylist(), fmt, cfg.max_length)
    length_of = lengths or (lambda items: [len(x["input_ids"]) for x in items])

    # 2. Model: the SFT policy's backbone (InstructGPT) or model.name/config, with a scalar head.
    init_from = cfg.sft_dir if cfg.init == "sft" else None
    model = build_model(model_cfg, tok, "reward", init_from=init_from)
    freeze = apply_freeze(model, cfg.freeze, model.config.num_layers)
    test = read_table(data / "test" / "pairs").to_pylist()
    untrained = test_pair_metrics(model, fmt, test, cfg)["pairwise_accuracy"]

    # 3. Fit through the shared harness (resumes only with the same params, data and code).
    inputs = [data / s / table for s in ("train", "val")] + [tok_cfg.out] + ([cfg.sft_dir] if init_from else [])
    fp = fingerprint(resolved, inputs)
    #    With W processes each takes its share of every global batch and of the validation batches.
    module = (RegressionModule if args.kind == "regression" else PairwiseModule)(model, cfg, fp)
    trainer, ckpt = prepare_run(shared, cfg, cfg.live_dir, cfg.checkpoint_dir, fp, f"reward@{args.kind}")
    rank, world = trainer.global_rank, trainer.world_size
    sampler = LengthGroupedBatchSampler(length_of(train_items), cfg.batch_size, cfg.seed, rank=rank, world_size=world)
    train = ResumableDataLoader(ListDataset(train_items), sampler, collate, module.completed_in_epoch)
    val = DataLoader(ListDataset(val_items), batch_sampler=EvalBatchSampler(
        len(val_items), cfg.eval_batch_size, length_of(val_items), rank, world), collate_fn=collate)
    trainer.fit(module, train, val, ckpt_path=ckpt, weights_only=True)
    model = build_model(model_cfg, tok, "reward", init_from=init_from)  # fresh, then the best weights
    load_best_weights(model, cfg.checkpoint_dir)

    # 4. Held-out pairs, beside the length baseline; normalisation on the SFT training answers.
    metrics = {**test_pair_metrics(model, fmt, test, cfg), "untrained_pairwise_accuracy": untrained}
    val_metrics = validation_metrics(args.kind, model, fmt, data, cfg)
    sft_rows = read_table(data / "train" / "sft").to_pylist()
    ref = score(model, fmt, [(r["question"], r["answer"]) for r in sft_rows], cfg.max_length, cfg.score_batch_size)
    mean, std = statistics.fmean(ref), statistics.pstdev(ref)
    model.config.cqa_score_mean = round(mean, 6)  # PPO normalises rewards as (score - mean) / std
    model.config.cqa_score_std = round(max(std, 1e-6), 6)
    if trainer.is_global_zero:
        export_pretrained(model, tok, cfg.out, resolved)
        write_json_atomic(cfg.metrics, {**metrics, **val_metrics,
                                        "score_mean_sft_train": round(mean, 6), "score_std_sft_train": round(std, 6),
                                        "steps": trainer.global_step, "trainable_params": freeze["trainable"]})
        print(f"reward@{args.kind}: test pairwise accuracy {metrics['pairwise_accuracy']:.3f} "
              f"(length baseline {metrics['length_baseline_accuracy']:.3f}, {metrics['pairs']} pairs), "
              f"{trainer.global_step} steps, {time.perf_counter() - start:.0f}s -> {cfg.out}")


if __name__ == "__main__":
    main()
