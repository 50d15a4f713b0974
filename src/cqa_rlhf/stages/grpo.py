"""Stage `grpo`: critic-free online RL of the SFT policy against a reward model (GRPO, Dr. GRPO,
RLOO) (params: prompt, model, trainer, grpo; inputs: the prompt tables, tokenizer, SFT policy,
reward model)."""

from __future__ import annotations

import time
from pathlib import Path

from cqa_rlhf.config import GRPOConfig
from cqa_rlhf.errors import cli
from cqa_rlhf.grpo import GRPOModule
from cqa_rlhf.models import build_model, disable_dropout, merge_lora, num_layers, reference_for
from cqa_rlhf.online import load_inputs, rollout_engine, run_fingerprint, summary, train
from cqa_rlhf.stages.common import Params, Shared, stage_args
from cqa_rlhf.training import apply_freeze, publish


def run(cfg: GRPOConfig, shared: Shared) -> dict:
    """GRPO from ``cfg.sft_dir`` against ``cfg.reward_model``; exports ``cfg.out`` and writes
    ``cfg.metrics`` (rank 0); returns the metrics."""
    start, resolved = time.perf_counter(), shared.resolved("grpo", cfg)

    # 1. Inputs: trainer settings, tokenizer, training prompts and the held-out prompts.
    inputs = load_inputs("grpo", cfg, shared.trainer_for(cfg.trainer), shared.prompt, shared.tokenizer.out)

    # 2. Models: the policy (the SFT model, dropout off: ratios compare forward passes); the
    #    rollout engine with the frozen reference and reward model.
    policy = disable_dropout(build_model(shared.model, inputs.tok, "causal", init_from=cfg.sft_dir,
                                         lora=shared.model.lora.applies("grpo")))
    freeze = apply_freeze(policy, cfg.freeze, num_layers(policy))
    ref = reference_for(policy, cfg.sft_dir, inputs.tok, shared.model.dtype)  # LoRA: the policy, adapters off
    engine, norm = rollout_engine("grpo", cfg, inputs, shared.prompt, shared.model.dtype, ref)

    # 3. Fit, resuming from last.ckpt only if it was made with these params, inputs and code.
    module = GRPOModule(policy, engine, cfg, run_fingerprint(resolved, cfg, shared.tokenizer.out), norm,
                        Path(cfg.live_dir) / "samples")
    trainer, metrics = train(module, inputs, freeze["trainable"])

    # 4. Export the policy (LoRA merged); metrics; the wall time.
    seconds = time.perf_counter() - start
    publish(trainer, merge_lora(policy), inputs.tok, cfg.out, resolved, cfg.metrics, metrics,
            summary(module, metrics, seconds), timing=(cfg.live_dir, seconds))
    return metrics


@cli
def main(argv: list[str] | None = None) -> None:
    params = Params.read(stage_args(__doc__, argv).params)
    run(params.section("grpo", GRPOConfig), params.shared())


if __name__ == "__main__":
    main()
