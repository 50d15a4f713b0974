"""Stage `dpo`: offline preference optimisation (DPO, IPO, conservative DPO) of the SFT policy on
the `pairs` tables, the frozen SFT policy as reference (params: prompt, model, trainer, dpo;
inputs: the pairs tables, tokenizer, SFT policy)."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import lightning as L
from torch.utils.data import DataLoader

from cqa_rlhf.batches import EvalBatchSampler, LengthGroupedBatchSampler, ListDataset, PairCollator, ResumableDataLoader, pair_lengths
from cqa_rlhf.config import DPOConfig
from cqa_rlhf.data.tables import read_table, training_rows
from cqa_rlhf.dpo import (DPOModule, add_reference_logps, encode_preferences, implicit_reward_pairs, restore_references,
                          saved_references)
from cqa_rlhf.errors import DataError, cli
from cqa_rlhf.io import write_json_atomic
from cqa_rlhf.models import build_model, disable_dropout, exported_dir, merge_lora, num_layers
from cqa_rlhf.prompts import PromptFormatter
from cqa_rlhf.reward import pair_metrics
from cqa_rlhf.stages.common import Params, Shared, stage_args
from cqa_rlhf.tokenizer import load_tokenizer
from cqa_rlhf.training import apply_freeze, fingerprint, load_best_weights, prepare_run, publish


def load_pairs(cfg: DPOConfig, fmt: PromptFormatter) -> dict[str, tuple[list[dict], list[dict]]]:
    """Each split's pairs table: (rows, encoded items); training pairs of ``cfg.train_questions``."""
    out = {}
    for split in ("train", "val", "test"):
        rows = read_table(Path(cfg.data) / split / "pairs").to_pylist()
        if split == "train":
            rows = training_rows(rows, cfg.train_questions)
        if not rows and split != "test":
            raise DataError(f"{cfg.data}/{split}/pairs: no preference pairs for dpo (train_questions: {cfg.train_questions})")
        out[split] = (rows, encode_preferences(rows, fmt, cfg.max_length))
    return out


def fitted_indices(sampler: LengthGroupedBatchSampler, cfg: DPOConfig) -> list[int]:
    """The training items this rank's fit will see: ``max_steps`` x ``accumulate_grad_batches``
    batches (or ``max_epochs`` epochs), so reference log-probs are computed for those only."""
    per_epoch = len(sampler)
    wanted = cfg.max_steps * cfg.accumulate_grad_batches if cfg.max_steps > 0 else per_epoch * cfg.max_epochs
    if cfg.max_epochs > 0:
        wanted = min(wanted, per_epoch * cfg.max_epochs)
    out: list[int] = []
    for epoch in range(math.ceil(wanted / per_epoch)):
        for batch in sampler.batches_of(epoch)[: wanted - epoch * per_epoch]:
            out.extend(batch)
    return out


def validated_indices(sampler: EvalBatchSampler, cfg: DPOConfig) -> list[int]:
    """The validation items this rank's checks will see (Lightning's ``limit_val_batches``: a
    number of batches, or a fraction of them)."""
    limit = cfg.limit_val_batches
    n = limit if isinstance(limit, int) else int(len(sampler) * limit)
    return [i for batch in list(sampler)[:n] for i in batch]


REFERENCE_CACHE = "reference_logps.rank{rank}.json"


def cached_references(ckpt_dir: str, fp: str) -> dict[str, dict]:
    """The reference log-prob files in ``ckpt_dir`` written under fingerprint ``fp``, by name.
    Read before :func:`prepare_run`, which clears a directory that holds no checkpoint yet, so
    that a fit killed before its first checkpoint need not score its pairs again either."""
    found = {}
    for path in sorted(Path(ckpt_dir).glob(REFERENCE_CACHE.format(rank="*"))):
        try:
            saved = json.loads(path.read_text(encoding="utf-8"))
            if saved.get("fingerprint") == fp:
                found[path.name] = saved["splits"]
        except (ValueError, AttributeError, KeyError) as e:  # a damaged cache is recomputed, not trusted
            print(f"dpo: ignoring {path}: not a reference log-prob cache ({type(e).__name__})", file=sys.stderr)
    return found


def add_references(model, items: dict[str, list[dict]], wanted: dict, cfg: DPOConfig, pad_id: int,
                   cached: dict[str, dict], fp: str, rank: int) -> None:
    """The reference log-probs of the ``wanted`` items of each split: from this rank's cache file
    when it holds them (a restarted fit), computed otherwise; saved for the next start."""
    name = REFERENCE_CACHE.format(rank=rank)
    path = Path(cfg.checkpoint_dir) / name
    if name in cached and restore_references(cached[name], items, wanted):
        print(f"dpo: reference log-probs of the pairs from {path}", file=sys.stderr)
    else:
        for split, indices in wanted.items():
            add_reference_logps(model, items[split], indices, cfg.score_batch_size, pad_id)
    write_json_atomic(path, {"fingerprint": fp, "splits": saved_references(items, wanted)})


def loaders(module: DPOModule, trainer: L.Trainer, pairs: dict, cfg: DPOConfig, pad_id: int,
            cached: dict[str, dict], fp: str) -> tuple[ResumableDataLoader, DataLoader]:
    """This rank's training and validation loaders, their pairs (and the test pairs) carrying the
    reference log-probs of the model as it is now (the SFT policy), or of the cache it saved."""
    items = {split: pairs[split][1] for split in ("train", "val", "test")}
    rank, world = trainer.global_rank, trainer.world_size
    sampler = LengthGroupedBatchSampler(pair_lengths(items["train"]), cfg.batch_size, cfg.seed, rank=rank, world_size=world)
    val_sampler = EvalBatchSampler(len(items["val"]), cfg.eval_batch_size, pair_lengths(items["val"]), rank, world)
    wanted = {"train": fitted_indices(sampler, cfg), "val": validated_indices(val_sampler, cfg),
              "test": range(len(items["test"]))}
    add_references(module.model, items, wanted, cfg, pad_id, cached, fp, rank)
    collate = PairCollator(pad_id)
    return (ResumableDataLoader(ListDataset(items["train"]), sampler, collate, module.completed_in_epoch),
            DataLoader(ListDataset(items["val"]), batch_sampler=val_sampler, collate_fn=collate))


def run(cfg: DPOConfig, shared: Shared) -> dict:
    """DPO from ``cfg.sft_dir``; exports ``cfg.out`` and writes ``cfg.metrics`` (rank 0)."""
    start, resolved = time.perf_counter(), shared.resolved("dpo", cfg)
    sft_dir = exported_dir(cfg.sft_dir, "dpo.sft_dir")

    # 1. Data: the pairs tables, encoded with the shared template.
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    tok = load_tokenizer(shared.tokenizer.out)
    pairs = load_pairs(cfg, PromptFormatter(shared.prompt, tok))

    # 2. Model: the SFT policy (dropout off, as TRL: the reference log-probs are dropout-free).
    lora = shared.model.lora.applies("dpo")
    model = disable_dropout(build_model(shared.model, tok, "causal", init_from=sft_dir, lora=lora))
    freeze = apply_freeze(model, cfg.freeze, num_layers(model))

    # 3. The trainer; the reference log-probs of the pairs this rank will see, from the model
    #    before the fit (= SFT: LoRA adapters start at zero; a resumed fit loads its weights only
    #    inside trainer.fit, or the cache a restarted fit saved); then the fit (resumes only with
    #    the same params, data and code).
    data = Path(cfg.data)
    fp = fingerprint(resolved, [data / s / "pairs" for s in ("train", "val")] + [shared.tokenizer.out, sft_dir])
    module, cached = DPOModule(model, cfg, fp), cached_references(cfg.checkpoint_dir, fp)
    trainer, ckpt = prepare_run(shared.trainer_for(cfg.trainer), module, cfg.live_dir, cfg.checkpoint_dir, fp, "dpo")
    train, val = loaders(module, trainer, pairs, cfg, tok.pad_token_id, cached, fp)
    trainer.fit(module, train, val, ckpt_path=ckpt, weights_only=True)

    # 4. Best checkpoint -> a fresh model (LoRA merged); held-out pairs beside the length baseline.
    model = build_model(shared.model, tok, "causal", init_from=sft_dir, lora=lora)
    best = load_best_weights(model, cfg.checkpoint_dir)
    model = merge_lora(model)
    metrics = held_out_metrics(model, *pairs["test"], cfg, tok.pad_token_id)
    metrics.update(best_checkpoint=best.name, steps=trainer.global_step, trainable_params=freeze["trainable"])
    seconds = time.perf_counter() - start
    publish(trainer, model, tok, cfg.out, resolved, cfg.metrics, metrics,
            f"dpo: test preference accuracy {metrics['pairwise_accuracy']:.3f} (length baseline "
            f"{metrics['length_baseline_accuracy']:.3f}, {metrics['pairs']} pairs), {trainer.global_step} steps, "
            f"{seconds:.0f}s -> {cfg.out}", timing=(cfg.live_dir, seconds))
    return metrics


def held_out_metrics(model, rows: list[dict], items: list[dict], cfg: DPOConfig, pad_id: int) -> dict:
    """Preference accuracy of the implicit reward on the test pairs (Wilson CI), beside the length
    baseline (and the paired bootstrap CI of the difference): the reward models' figures."""
    chosen, rejected = implicit_reward_pairs(model, items, cfg, pad_id)
    return pair_metrics(chosen, rejected, [r["chosen"] for r in rows], [r["rejected"] for r in rows])


@cli
def main(argv: list[str] | None = None) -> None:
    params = Params.read(stage_args(__doc__, argv).params)
    run(params.section("dpo", DPOConfig), params.shared())


if __name__ == "__main__":
    main()
