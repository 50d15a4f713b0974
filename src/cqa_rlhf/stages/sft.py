"""Stage `sft`: supervised fine-tuning of the policy on accepted / top-voted answers
(params: prompt, model, trainer, sft; inputs: the prepared `sft` tables and the tokenizer)."""

from __future__ import annotations

import time
from pathlib import Path

import lightning as L

from cqa_rlhf.batches import CausalLMCollator, LengthGroupedBatchSampler, ListDataset, ResumableDataLoader
from cqa_rlhf.config import SFTConfig
from cqa_rlhf.data.tables import read_table
from cqa_rlhf.errors import cli
from cqa_rlhf.generation import generate
from cqa_rlhf.models import build_model, merge_lora, num_layers
from cqa_rlhf.prompts import PromptFormatter
from cqa_rlhf.sft import SFTModule, encode_sft, eval_loader, evaluate_loss
from cqa_rlhf.stages.common import Params, Shared, stage_args
from cqa_rlhf.tokenizer import load_tokenizer
from cqa_rlhf.training import apply_freeze, fingerprint, load_best_weights, prepare_run, publish


def load_items(cfg: SFTConfig, fmt: PromptFormatter) -> tuple[list[dict], list[dict], list[dict]]:
    """Encoded training items, the validation rows and their encoded items (the shared template)."""
    data = Path(cfg.data)
    train_items = encode_sft(read_table(data / "train" / "sft").to_pylist(), fmt, cfg.max_length)
    val_rows = read_table(data / "val" / "sft").to_pylist()
    return train_items, val_rows, encode_sft(val_rows, fmt, cfg.max_length)


def sample_check(model, fmt: PromptFormatter, val_rows: list[dict], cfg: SFTConfig) -> dict:
    """Answers sampled to the first validation questions: do they stop (EOS), and how long are they."""
    gens = generate(model, fmt, [r["question"] for r in val_rows[: cfg.sample.n]], cfg.sample, cfg.seed,
                    max_prompt_len=max(8, cfg.max_length - cfg.sample.max_new_tokens))
    n = max(len(gens), 1)
    return {"ended": sum(g.ended for g in gens), "n": len(gens),
            "sample_eos_rate": round(sum(g.ended for g in gens) / n, 4),
            "sample_mean_tokens": round(sum(len(g.response_ids) for g in gens) / n, 2)}


def run(cfg: SFTConfig, shared: Shared) -> dict:
    """Fine-tune, export ``cfg.out`` and write ``cfg.metrics`` (rank 0); returns the metrics."""
    start, resolved = time.perf_counter(), shared.resolved("sft", cfg)

    # 1. Data: the sft tables, encoded once with the shared template.
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    tok = load_tokenizer(shared.tokenizer.out)
    fmt = PromptFormatter(shared.prompt, tok)
    train_items, val_rows, val_items = load_items(cfg, fmt)
    val = eval_loader(val_items, cfg.eval_batch_size, tok.pad_token_id)

    # 2. Model, and the untrained model's perplexity on the same data for reference.
    lora = shared.model.lora.applies("sft")
    model = build_model(shared.model, tok, "causal", lora=lora)
    freeze = apply_freeze(model, cfg.freeze, num_layers(model))
    untrained = evaluate_loss(model, val)

    # 3. Fit, resuming from last.ckpt only if it was made with these params and data. With W
    #    processes each takes its share of every global batch (batch_size * W items) and of the
    #    validation batches.
    data = Path(cfg.data)
    fp = fingerprint(resolved, [data / "train" / "sft", data / "val" / "sft", shared.tokenizer.out])
    module = SFTModule(model, cfg, fp)
    trainer, ckpt = prepare_run(shared.trainer_for(cfg.trainer), module, cfg.live_dir, cfg.checkpoint_dir, fp, "sft")
    sampler = LengthGroupedBatchSampler([len(x["input_ids"]) for x in train_items], cfg.batch_size, cfg.seed,
                                        rank=trainer.global_rank, world_size=trainer.world_size)
    train = ResumableDataLoader(ListDataset(train_items), sampler, CausalLMCollator(tok.pad_token_id),
                                module.completed_in_epoch)
    val_share = eval_loader(val_items, cfg.eval_batch_size, tok.pad_token_id, trainer.global_rank, trainer.world_size)
    trainer.fit(module, train, val_share, ckpt_path=ckpt, weights_only=True)

    # 4. Best checkpoint -> a fresh model (LoRA merged) -> exported model, metrics, sample check.
    model = build_model(shared.model, tok, "causal", lora=lora)
    best, model = load_best_weights(model, cfg.checkpoint_dir), merge_lora(model)
    final = evaluate_loss(model, val)
    check = sample_check(model, fmt, val_rows, cfg)
    metrics = {
        "val_loss": round(final["loss"], 6), "val_perplexity": round(final["perplexity"], 4),
        "untrained_val_perplexity": round(untrained["perplexity"], 4), "val_tokens": final["tokens"],
        "best_checkpoint": best.name, "steps": trainer.global_step, "trainable_params": freeze["trainable"],
        "frozen_params": freeze["frozen"], "sample_eos_rate": check["sample_eos_rate"],
        "sample_mean_tokens": check["sample_mean_tokens"],
    }
    seconds = time.perf_counter() - start
    publish(trainer, model, tok, cfg.out, resolved, cfg.metrics, metrics,
            f"sft: val perplexity {final['perplexity']:.2f} (untrained {untrained['perplexity']:.1f}), "
            f"EOS rate {check['ended']}/{check['n']}, {trainer.global_step} steps, {seconds:.0f}s -> {cfg.out}",
            timing=(cfg.live_dir, seconds))
    return metrics


@cli
def main(argv: list[str] | None = None) -> None:
    params = Params.read(stage_args(__doc__, argv).params)
    run(params.section("sft", SFTConfig), params.shared())


if __name__ == "__main__":
    main()
