"""Stage `ppo`: RLHF of the SFT policy against a reward model with PPO
(params: prompt, model, trainer, ppo; inputs: the prompt tables, tokenizer, SFT policy, reward model)."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from cqa_rlhf.config import PPOConfig
from cqa_rlhf.errors import cli
from cqa_rlhf.models import CausalLMWithValueHead, build_policy, merge_lora, num_layers, reference_for
from cqa_rlhf.online import load_inputs, rollout_engine, run_fingerprint, summary, train
from cqa_rlhf.ppo import PPOModule
from cqa_rlhf.stages.common import Params, Shared, stage_args
from cqa_rlhf.training import apply_freeze, publish


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

    # 1. Inputs: trainer settings, tokenizer, training prompts and the held-out prompts.
    inputs = load_inputs("ppo", cfg, shared.trainer_for(cfg.trainer), shared.prompt, shared.tokenizer.out)

    # 2. Models: the policy (SFT + value head or critic); the rollout engine with the frozen
    #    reference and reward model.
    policy = build_policy(shared.model, inputs.tok, cfg.sft_dir, cfg.critic, cfg.reward_model,
                          lora=shared.model.lora.applies("ppo"))
    freeze = apply_freeze(policy.lm, cfg.freeze, num_layers(policy.lm))
    ref = reference_for(policy.lm, cfg.sft_dir, inputs.tok, shared.model.dtype)  # LoRA: the policy, adapters off
    engine, norm = rollout_engine("ppo", cfg, inputs, shared.prompt, shared.model.dtype, ref)

    # 3. Fit, resuming from last.ckpt only if it was made with these params, inputs and code.
    fp = run_fingerprint(resolved, cfg, shared.tokenizer.out)
    module = PPOModule(policy, engine, cfg, fp, norm, Path(cfg.live_dir) / "samples")
    trainer, metrics = train(module, inputs, freeze["trainable"])

    # 4. Export the policy (LoRA merged) with its value head; metrics; the wall time.
    metrics.update(kl_target=cfg.kl.target, beta_final=round(module.kl_ctl.beta, 6))
    policy = merge_lora(policy)
    seconds = time.perf_counter() - start
    publish(trainer, policy.lm, inputs.tok, cfg.out, resolved, cfg.metrics, metrics, summary(module, metrics, seconds),
            extra=save_value_head(policy), timing=(cfg.live_dir, seconds))
    return metrics


@cli
def main(argv: list[str] | None = None) -> None:
    params = Params.read(stage_args(__doc__, argv).params)
    run(params.section("ppo", PPOConfig), params.shared())


if __name__ == "__main__":
    main()
