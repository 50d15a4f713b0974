"""GRPO through the real stage: per-answer seeds, the reward rises, TRL's GRPO statistics, the
variants (RLOO, Dr. GRPO, clip-higher, masked truncation), resume after a kill, NaN stops."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from cqa_rlhf.config import ModelConfig, PromptConfig, SampleConfig
from cqa_rlhf.generation import generate, row_seed
from cqa_rlhf.models import build_model
from cqa_rlhf.prompts import PromptFormatter
from cqa_rlhf.tokenizer import load_tokenizer

from conftest import run_stage, run_until_killed
from helpers import TINY_MODEL, tiny_params


@pytest.fixture(scope="module")
def prepared(prepared_session):
    return prepared_session


def _grpo_params(prepared: Path, inputs: Path, out: Path, **grpo) -> dict:
    params = tiny_params(prepared)
    params["grpo"] = {
        "data": str(prepared / "prepared"), "sft_dir": str(inputs / "sft"), "reward_model": str(inputs / "rm"),
        "out": str(out / "grpo"), "metrics": str(out / "grpo.json"), "live_dir": str(out / "live"),
        "checkpoint_dir": str(out / "ckpt"), "iterations": 6, "rollout_batch_size": 4, "num_generations": 4,
        "mini_batch_size": 8, "micro_batch_size": 4, "optim": {"lr": 2e-3, "weight_decay": 0.0, "warmup_frac": 0.0},
        "max_prompt_length": 48, "max_length": 96, "sample": {"max_new_tokens": 16, "batch_size": 16},
        "eval_every": 2, "eval_prompts": 16, "samples_every": 2, "trainer": {"log_every_n_steps": 1}, **grpo}
    return params


def _curve(out: Path, name: str) -> list[float]:
    rows = (out / "live" / "plots" / "metrics" / f"{name}.tsv").read_text().splitlines()[1:]
    return [float(r.split("\t")[1]) for r in rows]


def test_an_answer_with_its_own_seed_does_not_depend_on_its_batch(prepared):
    """Per-answer seeds (Gumbel-max sampling): the same answer alone, in another batch, or in
    another order -- what makes GRPO's rollouts the same on any number of processes."""
    tok = load_tokenizer(prepared / "tok")
    torch.manual_seed(0)
    lm = build_model(ModelConfig(config=TINY_MODEL), tok, "causal").eval()
    fmt = PromptFormatter(PromptConfig(), tok)
    qs = ["How do I sort a git branch?", "Why is the sky blue?", "What is a monad?", "How do I sort a git branch?"]
    seeds = [row_seed(7, q, i) for i, q in enumerate(qs)]
    sample = SampleConfig(max_new_tokens=12, batch_size=4)
    together = generate(lm, fmt, qs, sample, 0, 32, row_seeds=seeds)
    alone = [generate(lm, fmt, [q], sample, 123, 32, row_seeds=[s])[0] for q, s in zip(qs, seeds)]
    reversed_ = generate(lm, fmt, qs[::-1], sample, 5, 32, row_seeds=seeds[::-1])[::-1]
    assert [g.response_ids for g in together] == [g.response_ids for g in alone] == [g.response_ids for g in reversed_]
    assert together[0].response_ids != together[3].response_ids  # same question, another index: another draw
    with pytest.raises(Exception, match="top_k 0 and top_p 1"):
        generate(lm, fmt, qs[:1], SampleConfig(top_k=5), 0, 32, row_seeds=seeds[:1])


def test_tiny_grpo_raises_the_reward_and_exports_a_causal_lm(tmp_path, whole_answers):
    params = _grpo_params(whole_answers, whole_answers, tmp_path, iterations=8, rollout_batch_size=8,
                          mini_batch_size=16, micro_batch_size=8, eval_every=4, samples_every=4,
                          sample={"max_new_tokens": 48, "batch_size": 32})
    proc = run_stage("grpo", params, tmp_path)
    assert proc.returncode == 0, proc.stderr
    m = json.loads((tmp_path / "grpo.json").read_text())
    assert m["iterations"] == 8 and m["steps"] == 8 * 2  # 32 answers an iteration, minibatches of 16
    assert m["final"]["score_normalized"] > m["sft"]["score_normalized"] + 0.2, m
    assert m["sft"]["kl"] == 0.0 and m["final"]["kl"] > 0.0
    for name in ("reward", "reward_std", "frac_reward_zero_std", "completions/mean_length", "completions/clipped_ratio",
                 "kl", "entropy", "loss", "clip_ratio/region_mean", "clip_ratio/low_mean", "clip_ratio/high_mean"):
        rows = (tmp_path / "live/plots/metrics" / f"{name}.tsv").read_text().splitlines()
        assert [r.split("\t")[0] for r in rows[1:]] == [str(i) for i in range(1, 9)], name  # TRL's names, x = iteration
    assert _curve(tmp_path, "kl")[-1] > 0
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "grpo")
    assert model.config.pad_token_id != model.config.eos_token_id
    assert not (tmp_path / "grpo" / "value_head.safetensors").exists()  # no critic
    assert json.loads((tmp_path / "live" / "timing.json").read_text())["wall_seconds"] > 0


@pytest.mark.parametrize("variant", [
    {"advantage": "rloo", "scale_rewards": "none"},
    {"scale_rewards": "batch", "epsilon_high": 0.28, "mask_truncated_completions": True, "beta": 0.0},
])
def test_grpo_variants_run(tmp_path, prepared, rlhf_inputs, variant):
    proc = run_stage("grpo", _grpo_params(prepared, rlhf_inputs, tmp_path, iterations=2, **variant), tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert len(_curve(tmp_path, "reward")) == 2


@pytest.mark.long  # outside CI (it would pass 20 minutes): python -m pytest -m long
def test_killed_grpo_resumes_and_matches_an_uninterrupted_run(tmp_path, prepared, rlhf_inputs):
    full, cut = tmp_path / "full", tmp_path / "cut"
    full.mkdir()
    cut.mkdir()
    assert run_stage("grpo", _grpo_params(prepared, rlhf_inputs, full), full).returncode == 0
    params = _grpo_params(prepared, rlhf_inputs, cut)
    curve = cut / "live" / "plots" / "metrics" / "reward.tsv"
    run_until_killed("grpo", params, cut, settle=0.0, ready=lambda: (
        (cut / "ckpt" / "last.ckpt").exists() and curve.exists() and len(curve.read_text().splitlines()) >= 4))
    assert not (cut / "grpo.json").exists(), "the run finished before it could be interrupted"
    assert 2 <= torch.load(cut / "ckpt" / "last.ckpt", weights_only=True)["cqa_online"]["iteration"] < 6
    resumed = run_stage("grpo", params, cut)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stderr
    assert (cut / "grpo.json").read_bytes() == (full / "grpo.json").read_bytes()
    assert (cut / "grpo" / "model.safetensors").read_bytes() == (full / "grpo" / "model.safetensors").read_bytes()
    for name in ("reward.tsv", "kl.tsv", "eval/score.tsv"):
        path = Path("live/plots/metrics") / name
        assert (cut / path).read_text() == (full / path).read_text(), name  # no gap, no repeats


def test_nan_reward_stops_grpo_with_one_line(tmp_path, prepared, rlhf_inputs):
    rm = tmp_path / "rm"
    shutil.copytree(rlhf_inputs / "rm", rm)
    weights = load_file(rm / "model.safetensors")
    weights["score.weight"] = torch.full_like(weights["score.weight"], float("nan"))
    save_file(weights, rm / "model.safetensors", metadata={"format": "pt"})
    proc = run_stage("grpo", _grpo_params(prepared, rlhf_inputs, tmp_path, reward_model=str(rm)), tmp_path)
    assert proc.returncode == 2, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: grpo: iteration 1: scores is not finite"), last
    assert not (tmp_path / "grpo.json").exists() and not (tmp_path / "grpo").exists()
