"""Stage `online_dpo`: DPO on pairs the policy answers itself, labelled by a reward model (best
and worst of K answers to a prompt), against the frozen SFT reference (params: prompt, model,
trainer, online_dpo; inputs: the prompt tables, tokenizer, SFT policy, reward model)."""

from __future__ import annotations

from cqa_rlhf.config import OnlineDPOConfig
from cqa_rlhf.errors import cli
from cqa_rlhf.online_dpo import OnlineDPOModule
from cqa_rlhf.stages import policy_rl
from cqa_rlhf.stages.common import Params, Shared, stage_args


def run(cfg: OnlineDPOConfig, shared: Shared) -> dict:
    """Online DPO from ``cfg.sft_dir`` against ``cfg.reward_model``; exports ``cfg.out`` and
    writes ``cfg.metrics`` (rank 0); returns the metrics."""
    return policy_rl.run("online_dpo", OnlineDPOModule, cfg, shared)


@cli
def main(argv: list[str] | None = None) -> None:
    params = Params.read(stage_args(__doc__, argv).params)
    run(params.section("online_dpo", OnlineDPOConfig), params.shared())


if __name__ == "__main__":
    main()
