"""Stage `sft`: supervised fine-tuning of the policy on accepted / top-voted answers
(params: prompt, model, trainer, sft; inputs: the prepared `sft` tables and the tokenizer)."""

from __future__ import annotations

import time
from pathlib import Path

import lightning as L

from cqa_rlhf.batches import CausalLMCollator, LengthGroupedBatchSampler, ListDataset, ResumableDataLoader
from cqa_rlhf.config import (
    ModelConfig,
    PromptConfig,
    SFTConfig,
    TokenizerConfig,
    TrainerConfig,
    parse_section,
    read_params,
)
from cqa_rlhf.data.tables import read_table
from cqa_rlhf.errors import cli
from cqa_rlhf.generation import generate
from cqa_rlhf.io import write_json_atomic
from cqa_rlhf.models import build_model
from cqa_rlhf.prompts import PromptFormatter
from cqa_rlhf.sft import SFTModule, encode_sft, eval_loader, evaluate_loss
from cqa_rlhf.stages.common import stage_args
from cqa_rlhf.tokenizer import load_tokenizer
from cqa_rlhf.training import apply_freeze, export_pretrained, fingerprint, load_best_weights, prepare_run


@cli
def main() -> None:
    args = stage_args(__doc__)
    params = read_params(args.params)
    prompt = parse_section(params, "prompt", PromptConfig, args.params)
    model_cfg = parse_section(params, "model", ModelConfig, args.params)
    tok_cfg = parse_section(params, "tokenizer", TokenizerConfig, args.params)
    shared = parse_section(params, "trainer", TrainerConfig, args.params)
    cfg = parse_section(params, "sft", SFTConfig, args.params)
    resolved = {name: section.model_dump(mode="json") for name, section in
                (("prompt", prompt), ("model", model_cfg), ("trainer", shared), ("sft", cfg))}
    start = time.perf_counter()

    # 1. Data: the sft tables, encoded once with the shared template.
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    tok = load_tokenizer(tok_cfg.out)
    fmt = PromptFormatter(prompt, tok)
    data = Path(cfg.data)
    train_items = encode_sft(read_table(data / "train" / "sft").to_pylist(), fmt, cfg.max_length)
    val_rows = read_table(data / "val" / "sft").to_pylist()
    val_items = encode_sft(val_rows, fmt, cfg.max_length)
    val = eval_loader(val_items, cfg.eval_batch_size, tok.pad_token_id)

    # 2. Model, and the untrained model's perplexity on the same data for reference.
    model = build_model(model_cfg, tok, "causal")
    freeze = apply_freeze(model, cfg.freeze, model.config.num_layers)
    untrained = evaluate_loss(model, val)

    # 3. Fit, resuming from last.ckpt only if it was made with these params and data.
    fp = fingerprint(resolved, [data / "train" / "sft", data / "val" / "sft", tok_cfg.out])
    #    With W processes each takes its share of every global batch (batch_size * W items)
    #    and of the validation batches.
    module = SFTModule(model, cfg, fp)
    trainer, ckpt = prepare_run(shared, cfg, cfg.live_dir, cfg.checkpoint_dir, fp, "sft")
    rank, world = trainer.global_rank, trainer.world_size
    sampler = LengthGroupedBatchSampler([len(x["input_ids"]) for x in train_items], cfg.batch_size, cfg.seed,
                                        rank=rank, world_size=world)
    train = ResumableDataLoader(ListDataset(train_items), sampler, CausalLMCollator(tok.pad_token_id),
                                module.completed_in_epoch)
    val_share = eval_loader(val_items, cfg.eval_batch_size, tok.pad_token_id, rank, world)
    trainer.fit(module, train, val_share, ckpt_path=ckpt, weights_only=True)

    # 4. Best checkpoint -> a fresh model -> exported model, metrics and a sample check.
    model = build_model(model_cfg, tok, "causal")
    best = load_best_weights(model, cfg.checkpoint_dir)
    final = evaluate_loss(model, val)
    gens = generate(model, fmt, [r["question"] for r in val_rows[: cfg.sample.n]], cfg.sample, cfg.seed,
                    max_prompt_len=max(8, cfg.max_length - cfg.sample.max_new_tokens))
    if trainer.is_global_zero:
        export_pretrained(model, tok, cfg.out, resolved)
        write_json_atomic(cfg.metrics, {
            "val_loss": round(final["loss"], 6),
            "val_perplexity": round(final["perplexity"], 4),
            "untrained_val_perplexity": round(untrained["perplexity"], 4),
            "val_tokens": final["tokens"],
            "best_checkpoint": best.name,
            "steps": trainer.global_step,
            "trainable_params": freeze["trainable"],
            "frozen_params": freeze["frozen"],
            "sample_eos_rate": round(sum(g.ended for g in gens) / max(len(gens), 1), 4),
            "sample_mean_tokens": round(sum(len(g.response_ids) for g in gens) / max(len(gens), 1), 2),
        })
        print(f"sft: val perplexity {final['perplexity']:.2f} (untrained {untrained['perplexity']:.1f}), "
              f"EOS rate {sum(g.ended for g in gens)}/{len(gens)}, {trainer.global_step} steps, "
              f"{time.perf_counter() - start:.0f}s -> {cfg.out}")


if __name__ == "__main__":
    main()
