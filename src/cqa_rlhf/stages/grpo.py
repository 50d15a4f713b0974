"""Stage `grpo`: critic-free online RL of the SFT policy against a reward model (GRPO, Dr. GRPO,
RLOO) (params: prompt, model, trainer, grpo; inputs: the prompt tables, tokenizer, SFT policy,
reward model)."""

from __future__ import annotations

from cqa_rlhf.config import GRPOConfig
from cqa_rlhf.errors import cli
from cqa_rlhf.grpo import GRPOModule
from cqa_rlhf.stages import policy_rl
from cqa_rlhf.stages.common import Params, Shared, stage_args


def run(cfg: GRPOConfig, shared: Shared) -> dict:
    """GRPO from ``cfg.sft_dir`` against ``cfg.reward_model``; exports ``cfg.out`` and writes
    ``cfg.metrics`` (rank 0); returns the metrics."""
    return policy_rl.run("grpo", GRPOModule, cfg, shared)


@cli
def main(argv: list[str] | None = None) -> None:
    params = Params.read(stage_args(__doc__, argv).params)
    run(params.section("grpo", GRPOConfig), params.shared())


if __name__ == "__main__":
    main()
