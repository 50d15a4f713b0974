"""Every output dvc.yaml declares for an online stage exists after a run at the smallest valid
params (one iteration, fewer than samples_every and eval_every): else `dvc exp run -S
ppo.iterations=1` fails with "output ... does not exist" after a stage that ended normally."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from conftest import run_stage
from helpers import tiny_params

ROOT = Path(__file__).resolve().parents[1]
OWN = {"ppo": {"mini_batch_size": 4, "micro_batch_size": 4, "ppo_epochs": 1},
       "grpo": {"num_generations": 2, "mini_batch_size": 4, "micro_batch_size": 4},
       "online_dpo": {"num_generations": 2, "mini_batch_size": 2, "micro_batch_size": 2}}


def declared_outputs(stage: str, params: dict) -> list[Path]:
    """The stage's outs, metrics and plots in dvc.yaml, with ${section.key} from ``params``."""
    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"][stage]
    paths = [next(iter(o)) if isinstance(o, dict) else o for key in ("outs", "metrics", "plots") for o in spec.get(key, [])]

    def resolve(match: re.Match) -> str:
        section, key = match.group(1).split(".", 1)
        return str(params[section][key])

    return [Path(re.sub(r"\$\{([^}]+)\}", resolve, p)) for p in paths]


@pytest.mark.parametrize("stage", sorted(OWN))
def test_every_declared_output_exists_after_one_iteration(tmp_path, prepared_session, rlhf_inputs, stage):
    params = tiny_params(prepared_session)
    params[stage] = {
        "data": str(prepared_session / "prepared"), "sft_dir": str(rlhf_inputs / "sft"),
        "reward_model": str(rlhf_inputs / "rm"), "out": str(tmp_path / "out"), "metrics": str(tmp_path / "m.json"),
        "live_dir": str(tmp_path / "live"), "checkpoint_dir": str(tmp_path / "ckpt"), "iterations": 1,
        "rollout_batch_size": 4, "samples_every": 10, "eval_every": 10, "eval_prompts": 4, "max_prompt_length": 48,
        "max_length": 96, "sample": {"max_new_tokens": 8, "batch_size": 8}, **OWN[stage]}
    proc = run_stage(stage, params, tmp_path)
    assert proc.returncode == 0, proc.stderr
    outputs = declared_outputs(stage, params)
    assert len(outputs) >= 4  # model, timing, samples, metrics, plots
    missing = [str(p) for p in outputs if not p.exists()]
    assert not missing, missing
    assert sorted(p.name for p in (tmp_path / "live" / "samples").iterdir()) == ["iteration_0000.csv"]  # the SFT point
