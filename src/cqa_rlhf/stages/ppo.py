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
from cqa_rlhf.config import PPOConfig
from cqa_rlhf.data.tables import read_table
from cqa_rlhf.errors import DataError, cli
from cqa_rlhf.models import CausalLMWithValueHead, build_policy, exported_dir, merge_lora, num_layers, reference_for
from cqa_rlhf.ppo import PPOModule
from cqa_rlhf.prompts import PromptFormatter
from cqa_rlhf.reward import load_judge
from cqa_rlhf.rollout import RolloutEngine
from cqa_rlhf.stages.common import Params, Shared, stage_args
from cqa_rlhf.tokenizer import load_tokenizer
from cqa_rlhf.training import apply_freeze, fingerprint, load_best_weights, prepare_run, publish, refuse_sharded


def load_prompts(cfg: PPOConfig) -> tuple[list[dict], list[str]]:
    """Training prompt rows, and the held-out questions of the evaluation."""
    data = Path(cfg.data)
    train_rows = read_table(data / "train" / "prompts").to_pylist()
    eval_questions = [r["question"] for r in read_table(data / "val" / "prompts").to_pylist()][: cfg.eval_prompts]
    if len(train_rows) < cfg.rollout_batch_size or not eval_questions:
        raise DataError(f"{data}: {len(train_rows)} training prompts and {len(eval_questions)} held-out prompts; "
                        f"PPO needs at least ppo.rollout_batch_size={cfg.rollout_batch_size} and 1")
    return train_rows, eval_questions


def fit(module: PPOModule, trainer: L.Trainer, ckpt: Path | None, train_rows: list[dict],
        eval_questions: list[str], fmt: PromptFormatter) -> None:
    """With W processes each rolls out its share of every global batch of prompts
    (rollout_batch_size per process); every process runs the held-out evaluation."""
    cfg = module.cfg
    lengths = [len(fmt.encode_prompt(r["question"], cfg.max_prompt_length)) for r in train_rows]
    sampler = LengthGroupedBatchSampler(lengths, cfg.rollout_batch_size, cfg.seed,
                                        rank=trainer.global_rank, world_size=trainer.world_size, drop_last=True)
    if len(sampler) == 0:
        raise DataError(f"{cfg.data}: {len(train_rows)} training prompts; {trainer.world_size} processes need at "
                        f"least ppo.rollout_batch_size x {trainer.world_size} = {cfg.rollout_batch_size * trainer.world_size}")
    train = ResumableDataLoader(ListDataset(train_rows), sampler, PromptCollator(), module.completed_in_epoch)
    held_out = DataLoader(ListDataset([{"question": q} for q in eval_questions]), batch_size=cfg.sample.batch_size,
                          collate_fn=PromptCollator())
    trainer.fit(module, train, held_out, ckpt_path=ckpt, weights_only=True)  # DivergedError: exit 2


def save_value_head(policy: torch.nn.Module):
    """Writes the value head (or the separate critic) beside the exported policy."""
    def write(out: Path) -> None:
        if isinstance(policy, CausalLMWithValueHead):
            save_file({k: v.detach().contiguous() for k, v in policy.v_head.state_dict().items()},
                      out / "value_head.safetensors")
        else:
            policy.critic.rm.save_pretrained(out / "critic")
    return write


def run(cfg: PPOConfig, shared: Shared) -> dict:
    """PPO from ``cfg.sft_dir`` against ``cfg.reward_model``; exports ``cfg.out`` and writes
    ``cfg.metrics`` (rank 0); returns the metrics."""
    start, resolved = time.perf_counter(), shared.resolved("ppo", cfg)
    trainer_cfg = shared.trainer_for(cfg.trainer)
    refuse_sharded(trainer_cfg, "ppo", "samples rollouts from the policy outside the wrapped forward")
    exported_dir(cfg.sft_dir, "ppo.sft_dir")
    exported_dir(cfg.reward_model, "ppo.reward_model")

    # 1. Data: training prompts, and the held-out prompts of the evaluation.
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    tok = load_tokenizer(shared.tokenizer.out)
    fmt = PromptFormatter(shared.prompt, tok)
    train_rows, eval_questions = load_prompts(cfg)

    # 2. Models: the policy (SFT + value head or critic); the rollout engine with the frozen
    #    reference and reward model.
    policy = build_policy(shared.model, tok, cfg.sft_dir, cfg.critic, cfg.reward_model,
                          lora=shared.model.lora.applies("ppo"))
    freeze = apply_freeze(policy.lm, cfg.freeze, num_layers(policy.lm))
    ref = reference_for(policy, cfg.sft_dir, tok, shared.model.dtype)  # LoRA: the policy, adapters off
    judge = load_judge(cfg.reward_model, "ppo.reward_model", shared.prompt, tok, shared.model.dtype)
    engine = RolloutEngine(fmt, cfg.sample, cfg.max_prompt_length, cfg.max_length, cfg.micro_batch_size,
                           ref, judge.model, judge.retokenize)

    # 3. Fit, resuming from last.ckpt only if it was made with these params, inputs and code.
    data = Path(cfg.data)
    fp = fingerprint(resolved, [data / "train" / "prompts", data / "val" / "prompts", shared.tokenizer.out,
                                cfg.sft_dir, cfg.reward_model])
    samples_dir = Path(cfg.live_dir) / "samples"
    module = PPOModule(policy, engine, cfg, fp, judge.norm, samples_dir)
    trainer, ckpt = prepare_run(trainer_cfg, module, cfg.live_dir, cfg.checkpoint_dir, fp, "ppo")
    if ckpt is None and trainer.is_global_zero:
        shutil.rmtree(samples_dir, ignore_errors=True)
    sft_eval = module.evaluate_prompts(eval_questions)  # iteration 0: the SFT policy
    fit(module, trainer, ckpt, train_rows, eval_questions, fmt)

    # 4. Final and best held-out figures; export the chosen policy with its value head.
    metrics = final_metrics(module, sft_eval, eval_questions, trainer.global_step, freeze["trainable"])
    if cfg.export == "best":
        load_best_weights(policy, cfg.checkpoint_dir)
    last = metrics["final"]
    policy = merge_lora(policy)
    publish(trainer, policy.lm, tok, cfg.out, resolved, cfg.metrics, metrics,
            f"ppo: held-out score {sft_eval['score']:.3f} (SFT) -> {last['score']:.3f}, KL {last['kl']:.2f} nats, "
            f"EOS rate {last['eos_rate']:.2f}, {module.iteration} iterations, "
            f"{time.perf_counter() - start:.0f}s -> {cfg.out}", extra=save_value_head(policy))
    return metrics


def final_metrics(module: PPOModule, sft_eval: dict, eval_questions: list[str], steps: int, trainable: int) -> dict:
    """The SFT policy's, the final and the best held-out figures, and the run's counts."""
    history = module.eval_history
    last = history[-1] if history and history[-1]["iteration"] == module.iteration \
        else {"iteration": module.iteration, **module.evaluate_prompts(eval_questions)}
    best = max(history or [last], key=lambda e: e["score"])
    return {"sft": sft_eval, "final": last, "best": best, "exported": module.cfg.export,
            "iterations": module.iteration, "steps": steps, "kl_target": module.cfg.kl.target,
            "beta_final": round(module.kl_ctl.beta, 6), "trainable_params": trainable}


@cli
def main(argv: list[str] | None = None) -> None:
    params = Params.read(stage_args(__doc__, argv).params)
    run(params.section("ppo", PPOConfig), params.shared())


if __name__ == "__main__":
    main()
