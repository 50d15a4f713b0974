"""Stage `ppo`: RLHF of the SFT policy against a reward model with PPO
(params: prompt, model, trainer, ppo; inputs: the prompt tables, tokenizer, SFT policy, reward model)."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import lightning as L
import torch
from safetensors.torch import save_file
from torch.utils.data import DataLoader

from cqa_rlhf.batches import LengthGroupedBatchSampler, ListDataset, PromptCollator, ResumableDataLoader
from cqa_rlhf.config import ModelConfig, PPOConfig, PromptConfig, TokenizerConfig, TrainerConfig, parse_section, read_params
from cqa_rlhf.data.tables import read_table
from cqa_rlhf.errors import ConfigError, DataError, cli

# Strategies under which a process holds only a shard of the weights (PPO refuses them).
SHARDED_STRATEGIES = ("fsdp", "deepspeed_stage_3")
from cqa_rlhf.io import write_json_atomic
from cqa_rlhf.models import CausalLMWithValueHead, build_policy, load_frozen
from cqa_rlhf.ppo import PPOModule, eval_means
from cqa_rlhf.prompts import PromptFormatter
from cqa_rlhf.reward import normalization
from cqa_rlhf.stages.common import stage_args
from cqa_rlhf.tokenizer import load_tokenizer
from cqa_rlhf.training import apply_freeze, export_pretrained, fingerprint, load_best_weights, prepare_run


def evaluate(module: PPOModule, questions: list[str], batch_size: int) -> dict[str, float]:
    """The held-out evaluation outside the fit loop (the SFT policy before training, the final
    policy after it): the same batches and seeds as the validation loop."""
    sums = {k: torch.zeros((), dtype=torch.float64) for k in ("score", "score_normalized", "kl", "length", "eos", "n")}
    for i, start in enumerate(range(0, len(questions), batch_size)):
        module.evaluate_batch(questions[start: start + batch_size], i, sums)
    return eval_means(sums)


def save_value_head(policy: torch.nn.Module):
    """Writes the value head (or the separate critic) beside the exported policy."""
    def write(out: Path) -> None:
        if isinstance(policy, CausalLMWithValueHead):
            save_file({k: v.detach().contiguous() for k, v in policy.v_head.state_dict().items()},
                      out / "value_head.safetensors")
        else:
            policy.critic.rm.save_pretrained(out / "critic")
    return write


@cli
def main() -> None:
    args = stage_args(__doc__)
    params = read_params(args.params)
    prompt = parse_section(params, "prompt", PromptConfig, args.params)
    model_cfg = parse_section(params, "model", ModelConfig, args.params)
    tok_cfg = parse_section(params, "tokenizer", TokenizerConfig, args.params)
    shared = parse_section(params, "trainer", TrainerConfig, args.params)
    cfg = parse_section(params, "ppo", PPOConfig, args.params)
    resolved = {name: section.model_dump(mode="json") for name, section in
                (("prompt", prompt), ("model", model_cfg), ("trainer", shared), ("ppo", cfg))}
    start = time.perf_counter()
    strategy = cfg.trainer.apply(shared).strategy
    if strategy.startswith(SHARDED_STRATEGIES):
        raise ConfigError(f"{args.params}: trainer.strategy {strategy!r} shards the policy's weights, and PPO samples "
                          "rollouts from the policy outside the wrapped forward; use ddp (see the README's memory table)")
    for path in (cfg.sft_dir, cfg.reward_model):
        if not (Path(path) / "config.json").is_file():
            raise DataError(f"{path}: not an exported model directory (no config.json)")

    # 1. Data: training prompts, and the held-out prompts of the evaluation.
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    tok = load_tokenizer(tok_cfg.out)
    fmt = PromptFormatter(prompt, tok)
    data = Path(cfg.data)
    train_rows = read_table(data / "train" / "prompts").to_pylist()
    eval_questions = [r["question"] for r in read_table(data / "val" / "prompts").to_pylist()][: cfg.eval_prompts]
    if len(train_rows) < cfg.rollout_batch_size or not eval_questions:
        raise DataError(f"{data}: {len(train_rows)} training prompts and {len(eval_questions)} held-out prompts; "
                        f"PPO needs at least ppo.rollout_batch_size={cfg.rollout_batch_size} and 1")

    # 2. Models: the policy (SFT + value head or critic), the frozen reference and reward model.
    policy = build_policy(model_cfg, tok, cfg.sft_dir, cfg.critic, cfg.reward_model)
    freeze = apply_freeze(policy.lm, cfg.freeze, policy.lm.config.num_layers)
    ref = load_frozen(cfg.sft_dir, tok, "causal", model_cfg.dtype)
    rm = load_frozen(cfg.reward_model, tok, "reward", model_cfg.dtype)
    try:
        norm = normalization(rm)
    except ValueError:
        raise ConfigError(f"ppo.reward_model: {cfg.reward_model} has no cqa_score_mean/std in its config.json "
                          "(export it with the reward stage)") from None

    # 3. Fit, resuming from last.ckpt only if it was made with these params, inputs and code.
    inputs = [data / "train" / "prompts", data / "val" / "prompts", tok_cfg.out, cfg.sft_dir, cfg.reward_model]
    #    With W processes each rolls out its share of every global batch of prompts
    #    (rollout_batch_size per process); every process runs the held-out evaluation.
    fp = fingerprint(resolved, inputs)
    trainer, ckpt = prepare_run(shared, cfg.harness(), cfg.live_dir, cfg.checkpoint_dir, fp, "ppo",
                                curve_step=lambda saved: saved["cqa_ppo"]["iteration"])  # curves' x: iterations
    samples_dir = Path(cfg.live_dir) / "samples"
    if ckpt is None and trainer.is_global_zero:
        shutil.rmtree(samples_dir, ignore_errors=True)
    module = PPOModule(policy, ref, rm, fmt, cfg, cfg.harness(), fp, norm, samples_dir)
    sft_eval = evaluate(module, eval_questions, cfg.sample.batch_size)  # iteration 0: the SFT policy
    lengths = [len(fmt.encode_prompt(r["question"], cfg.max_prompt_length)) for r in train_rows]
    sampler = LengthGroupedBatchSampler(lengths, cfg.rollout_batch_size, cfg.seed,
                                        rank=trainer.global_rank, world_size=trainer.world_size, drop_last=True)
    if len(sampler) == 0:
        raise DataError(f"{data}: {len(train_rows)} training prompts; {trainer.world_size} processes need at least "
                        f"ppo.rollout_batch_size x {trainer.world_size} = {cfg.rollout_batch_size * trainer.world_size}")
    train = ResumableDataLoader(ListDataset(train_rows), sampler, PromptCollator(), module.completed_in_epoch)
    held_out = DataLoader(ListDataset([{"question": q} for q in eval_questions]), batch_size=cfg.sample.batch_size,
                          collate_fn=PromptCollator())
    trainer.fit(module, train, held_out, ckpt_path=ckpt, weights_only=True)  # DivergedError: exit 2

    # 4. Final and best held-out figures; export the chosen policy with its value head.
    last = module.eval_history[-1] if module.eval_history and module.eval_history[-1]["iteration"] == module.iteration \
        else {"iteration": module.iteration, **evaluate(module, eval_questions, cfg.sample.batch_size)}
    best = max(module.eval_history or [last], key=lambda e: e["score"])
    if cfg.export == "best":
        load_best_weights(policy, cfg.checkpoint_dir)
    if trainer.is_global_zero:
        export_pretrained(policy.lm, tok, cfg.out, resolved, extra=save_value_head(policy))
        write_json_atomic(cfg.metrics, {
            "sft": sft_eval, "final": last, "best": best, "exported": cfg.export,
            "iterations": module.iteration, "steps": trainer.global_step, "kl_target": cfg.kl.target,
            "beta_final": round(module.kl_ctl.beta, 6), "trainable_params": freeze["trainable"],
        })
        print(f"ppo: held-out score {sft_eval['score']:.3f} (SFT) -> {last['score']:.3f}, KL {last['kl']:.2f} nats, "
              f"EOS rate {last['eos_rate']:.2f}, {module.iteration} iterations, "
              f"{time.perf_counter() - start:.0f}s -> {cfg.out}")


if __name__ == "__main__":
    main()
