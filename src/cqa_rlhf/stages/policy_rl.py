"""The body of an online-RL stage whose policy is the causal LM itself, with no critic (GRPO,
online DPO): one function, so a method is its module and a few lines of stage."""

from __future__ import annotations

import time
from pathlib import Path

from cqa_rlhf.config import OnlineRLConfig
from cqa_rlhf.models import build_model, disable_dropout, merge_lora, num_layers, reference_for
from cqa_rlhf.online import OnlineRLModule, load_inputs, rollout_engine, run_fingerprint, summary, train
from cqa_rlhf.stages.common import Shared
from cqa_rlhf.training import apply_freeze, publish


def run(stage: str, module_class: type[OnlineRLModule], cfg: OnlineRLConfig, shared: Shared) -> dict:
    """Stage ``stage`` trains ``module_class`` from ``cfg.sft_dir`` against ``cfg.reward_model``;
    exports ``cfg.out`` and writes ``cfg.metrics`` (rank 0); returns the metrics."""
    start, resolved = time.perf_counter(), shared.resolved(stage, cfg)

    # 1. Inputs: trainer settings, tokenizer, training prompts and the held-out prompts.
    inputs = load_inputs(stage, cfg, shared.trainer_for(cfg.trainer), shared.prompt, shared.tokenizer.out)

    # 2. Models: the policy (the SFT model, dropout off: ratios and log-probs compare forward
    #    passes); the rollout engine with the frozen reference and reward model.
    policy = disable_dropout(build_model(shared.model, inputs.tok, "causal", init_from=cfg.sft_dir,
                                         lora=shared.model.lora.applies(stage)))
    freeze = apply_freeze(policy, cfg.freeze, num_layers(policy))
    ref = reference_for(policy, cfg.sft_dir, inputs.tok, shared.model.dtype)  # LoRA: the policy, adapters off
    engine, norm = rollout_engine(stage, cfg, inputs, shared.prompt, shared.model.dtype, ref)

    # 3. Fit, resuming from last.ckpt only if it was made with these params, inputs and code.
    module = module_class(policy, engine, cfg, run_fingerprint(resolved, cfg, shared.tokenizer.out), norm,
                          Path(cfg.live_dir) / "samples")
    trainer, metrics = train(module, inputs, freeze["trainable"])

    # 4. Export the policy (LoRA merged); metrics; the wall time.
    seconds = time.perf_counter() - start
    publish(trainer, merge_lora(policy), inputs.tok, cfg.out, resolved, cfg.metrics, metrics,
            summary(module, metrics, seconds), timing=(cfg.live_dir, seconds))
    return metrics
