"""Stage `reward@<kind>`: a reward model by regression on answer scores or by contrastive
(Bradley-Terry) classification of pairs (params: prompt, model, trainer, reward.<kind>)."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import lightning as L
from torch.utils.data import DataLoader

from cqa_rlhf.batches import EvalBatchSampler, LengthGroupedBatchSampler, ListDataset, ResumableDataLoader
from cqa_rlhf.config import RewardConfig, RewardKindConfig
from cqa_rlhf.data.tables import read_table, training_rows
from cqa_rlhf.errors import DataError, cli
from cqa_rlhf.models import build_model, merge_lora, num_layers
from cqa_rlhf.prompts import PromptFormatter
from cqa_rlhf.reward import KINDS, RewardKind, score, test_pair_metrics
from cqa_rlhf.stages.common import Shared, entry_args
from cqa_rlhf.tokenizer import load_tokenizer
from cqa_rlhf.training import apply_freeze, fingerprint, load_best_weights, prepare_run, publish


def fit(kind: RewardKind, module, trainer: L.Trainer, ckpt: Path | None, train_items: list[dict],
        val_items: list[dict], cfg: RewardKindConfig, pad_id: int) -> None:
    """With W processes each takes its share of every global batch and of the validation batches."""
    rank, world = trainer.global_rank, trainer.world_size
    collate = kind.collator(pad_id)
    sampler = LengthGroupedBatchSampler(kind.lengths(train_items), cfg.batch_size, cfg.seed, rank=rank, world_size=world)
    train = ResumableDataLoader(ListDataset(train_items), sampler, collate, module.completed_in_epoch)
    val = DataLoader(ListDataset(val_items), batch_sampler=EvalBatchSampler(
        len(val_items), cfg.eval_batch_size, kind.lengths(val_items), rank, world), collate_fn=collate)
    trainer.fit(module, train, val, ckpt_path=ckpt, weights_only=True)


def normalisation_stats(model, fmt: PromptFormatter, data: Path, cfg: RewardKindConfig) -> tuple[float, float]:
    """Mean and std of the model's scores on the SFT training answers; stored in the exported
    config, PPO normalises rewards as (score - mean) / std."""
    rows = read_table(data / "train" / "sft").to_pylist()[: cfg.norm_answers]
    ref = score(model, fmt, [(r["question"], r["answer"]) for r in rows], cfg.max_length, cfg.score_batch_size)
    mean, std = statistics.fmean(ref), statistics.pstdev(ref)
    model.config.cqa_score_mean = round(mean, 6)
    model.config.cqa_score_std = round(max(std, 1e-6), 6)
    return mean, std


def run(name: str, cfg: RewardKindConfig, shared: Shared) -> dict:
    """Train the ``name`` reward model, export ``cfg.out``, write ``cfg.metrics`` (rank 0)."""
    start, kind = time.perf_counter(), KINDS[name]
    resolved = shared.resolved("reward", {name: cfg.model_dump(mode="json")})

    # 1. Data: scored answers (regression) or preference pairs (classification).
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    tok = load_tokenizer(shared.tokenizer.out)
    fmt = PromptFormatter(shared.prompt, tok)
    data = Path(cfg.data)
    train_rows = training_rows(read_table(data / "train" / kind.table).to_pylist(), cfg.train_questions)
    if not train_rows:
        raise DataError(f"{data}/train/{kind.table}: no rows for reward.{name}.train_questions={cfg.train_questions}")
    train_items = kind.encode(train_rows, fmt, cfg.max_length)
    val_items = kind.encode(read_table(data / "val" / kind.table).to_pylist(), fmt, cfg.max_length)

    # 2. Model: the SFT policy's backbone (InstructGPT) or model.name/config, with a scalar head.
    init_from = cfg.sft_dir if cfg.init == "sft" else None
    lora = shared.model.lora.applies("reward")
    model = build_model(shared.model, tok, "reward", init_from=init_from, lora=lora)
    freeze = apply_freeze(model, cfg.freeze, num_layers(model))
    test = read_table(data / "test" / "pairs").to_pylist()
    untrained = test_pair_metrics(model, fmt, test, cfg)["pairwise_accuracy"]

    # 3. Fit through the shared harness (resumes only with the same params, data and code).
    inputs = [data / s / kind.table for s in ("train", "val")] + [shared.tokenizer.out] + ([cfg.sft_dir] if init_from else [])
    fp = fingerprint(resolved, inputs)
    module = kind.module(model, cfg, fp)
    trainer, ckpt = prepare_run(shared.trainer_for(cfg.trainer), module, cfg.live_dir, cfg.checkpoint_dir, fp,
                                f"reward@{name}")
    fit(kind, module, trainer, ckpt, train_items, val_items, cfg, tok.pad_token_id)
    model = build_model(shared.model, tok, "reward", init_from=init_from, lora=lora)  # fresh, then the best weights
    load_best_weights(model, cfg.checkpoint_dir)
    model = merge_lora(model)

    # 4. Held-out pairs, beside the length baseline; normalisation on the SFT training answers.
    metrics = {**test_pair_metrics(model, fmt, test, cfg), "untrained_pairwise_accuracy": untrained,
               **kind.validation(model, fmt, read_table(data / "val" / kind.table).to_pylist(), cfg)}
    mean, std = normalisation_stats(model, fmt, data, cfg)
    metrics.update({"score_mean_sft_train": round(mean, 6), "score_std_sft_train": round(std, 6),
                    "steps": trainer.global_step, "trainable_params": freeze["trainable"]})
    publish(trainer, model, tok, cfg.out, resolved, cfg.metrics, metrics,
            summary(name, metrics, time.perf_counter() - start, cfg.out))
    return metrics


def summary(name: str, metrics: dict, seconds: float, out: str) -> str:
    """The stage's one line on stdout."""
    return (f"reward@{name}: test pairwise accuracy {metrics['pairwise_accuracy']:.3f} "
            f"(length baseline {metrics['length_baseline_accuracy']:.3f}, {metrics['pairs']} pairs), "
            f"{metrics['steps']} steps, {seconds:.0f}s -> {out}")


@cli
def main(argv: list[str] | None = None) -> None:
    params, kind = entry_args(__doc__, "--kind", argv, choices=sorted(KINDS))
    run(kind, getattr(params.section("reward", RewardConfig), kind), params.shared())


if __name__ == "__main__":
    main()
