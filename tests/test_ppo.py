"""PPO: log-probs under padding, masks after EOS, tiny runs through the real stage, resume, NaN stops."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, pipeline

from cqa_rlhf.batches import ListDataset, PromptCollator
from cqa_rlhf.config import ModelConfig, PPOConfig, PromptConfig, SampleConfig, TrainerConfig
from cqa_rlhf.generation import generate
from cqa_rlhf.models import build_model, build_policy, load_frozen
from cqa_rlhf.online import DivergedError
from cqa_rlhf.ppo import PPOModule
from cqa_rlhf.rollout import RolloutEngine, build_sequences, policy_outputs, sequence_logprobs
from cqa_rlhf.prompts import PromptFormatter
from cqa_rlhf.tokenizer import load_tokenizer

from conftest import run_stage, run_until_killed
from helpers import TINY_MODEL, tiny_params


@pytest.fixture(scope="module")
def prepared(prepared_session):
    """This module trains on the session's tiny site, the one `rlhf_inputs` was trained on."""
    return prepared_session


@pytest.fixture(scope="module")
def tok(prepared):
    return load_tokenizer(prepared / "tok")


def test_left_padding_gives_the_same_logprobs_and_values_as_no_padding(tok):
    torch.manual_seed(0)
    policy = build_model(ModelConfig(config=TINY_MODEL), tok, "value").eval()
    torch.nn.init.normal_(policy.v_head.weight)  # a non-zero head, so values are informative
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12, 13, 14]]
    responses = [[20, 21, 22, tok.eos_token_id], [23, 24]]
    batch = build_sequences(prompts, responses, tok.pad_token_id)
    assert batch.mask.tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert batch.attention_mask[0, :4].tolist() == [0, 0, 0, 0]  # prompt 0 is left-padded
    with torch.no_grad():
        _, logp_b, val_b = policy_outputs(policy, batch, temperature=0.7)
        ref_b = sequence_logprobs(policy.lm, batch, temperature=0.7)
        for i in range(2):
            alone = build_sequences([prompts[i]], [responses[i]], tok.pad_token_id)
            assert alone.attention_mask.all()  # no padding at all
            _, logp_a, val_a = policy_outputs(policy, alone, temperature=0.7)
            n = len(responses[i])
            assert logp_b[i, :n].tolist() == pytest.approx(logp_a[0].tolist(), abs=1e-5)
            assert val_b[i, :n].tolist() == pytest.approx(val_a[0].tolist(), abs=1e-5)
            assert ref_b[i, :n].tolist() == pytest.approx(logp_a[0].tolist(), abs=1e-5)


def test_generation_stops_at_eos_and_masks_what_follows(tok):
    """A policy whose every next token is EOS once a marker token is seen: responses end at the
    first EOS and the rollout mask is zero after it, whatever the batch's longest answer."""
    torch.manual_seed(0)
    lm = build_model(ModelConfig(config=TINY_MODEL), tok, "causal").eval()
    with torch.no_grad():  # hidden state = ln_f.bias = e_0 everywhere; logits = that row of lm_head
        lm.transformer.ln_f.weight.zero_()
        lm.transformer.ln_f.bias.zero_()
        lm.transformer.ln_f.bias[0] = 1.0
        lm.lm_head.weight.zero_()
        lm.lm_head.weight[tok.eos_token_id, 0] = 50.0  # EOS has all the mass
    fmt = PromptFormatter(PromptConfig(), tok)
    gens = generate(lm, fmt, ["How do I sort a git branch?", "Why?"], SampleConfig(max_new_tokens=8), 0, 32)
    assert all(g.response_ids == [tok.eos_token_id] and g.ended and g.text == "" for g in gens)
    seq = build_sequences([[1, 2], [3]], [[40, 41, tok.eos_token_id], [tok.eos_token_id]], tok.pad_token_id)
    assert seq.mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert seq.response[1].tolist() == [tok.eos_token_id, tok.pad_token_id, tok.pad_token_id]


# --------------------------------------------------------------------------------------------
# The stage, on a tiny SFT policy and reward model
# --------------------------------------------------------------------------------------------
def _ppo_params(prepared: Path, inputs: Path, out: Path, **ppo) -> dict:
    params = tiny_params(prepared)
    params["ppo"] = {
        "data": str(prepared / "prepared"), "sft_dir": str(inputs / "sft"), "reward_model": str(inputs / "rm"),
        "out": str(out / "ppo"), "metrics": str(out / "ppo.json"), "live_dir": str(out / "live"),
        "checkpoint_dir": str(out / "ckpt"), "iterations": 8, "rollout_batch_size": 16, "mini_batch_size": 8,
        "micro_batch_size": 4, "ppo_epochs": 2, "optim": {"lr": 2e-3, "weight_decay": 0.0, "warmup_frac": 0.0}, "max_prompt_length": 48, "max_length": 96,
        "sample": {"max_new_tokens": 16, "batch_size": 16}, "eval_every": 4, "eval_prompts": 16, "samples_every": 4,
        "kl": {"beta": 0.02}, "trainer": {"log_every_n_steps": 1}, **ppo}
    return params


def test_tiny_ppo_raises_the_reward_and_exports_a_causal_lm(tmp_path, whole_answers):
    params = _ppo_params(whole_answers, whole_answers, tmp_path, sample={"max_new_tokens": 48, "batch_size": 16})
    proc = run_stage("ppo", params, tmp_path)
    assert proc.returncode == 0, proc.stderr
    m = json.loads((tmp_path / "ppo.json").read_text())
    assert m["iterations"] == 8 and m["steps"] == 8 * 2 * 2  # ppo_epochs x minibatches per iteration
    assert m["sft"]["eos_rate"] > 0.3, m  # a good share of the answers end: the reward model judges those
    # Same prompts, same seeds; in units of the RM's score std on the SFT training answers.
    assert m["final"]["score_normalized"] > m["sft"]["score_normalized"] + 0.2, m
    assert m["sft"]["kl"] == 0.0 and m["final"]["kl"] > 0.0
    assert m["best"]["score"] >= m["final"]["score"]
    # TRL's metric names, one row per iteration (x = iteration)
    curves = tmp_path / "live" / "plots" / "metrics"
    for name in ("objective/kl", "objective/scores", "objective/rlhf_reward", "objective/non_score_reward",
                 "policy/entropy_avg", "policy/approxkl_avg", "policy/clipfrac_avg", "loss/policy_avg",
                 "loss/value_avg", "val/clipfrac_avg", "rollout/response_length", "rollout/eos_rate", "objective/beta"):
        rows = (curves / f"{name}.tsv").read_text().splitlines()
        assert [r.split("\t")[0] for r in rows[1:]] == [str(i) for i in range(1, 9)], name
    assert [r.split("\t")[0] for r in (curves / "eval/score.tsv").read_text().splitlines()[1:]] == ["4", "8"]
    import pandas as pd
    samples = pd.read_csv(tmp_path / "live" / "samples" / "iteration_0008.csv")
    assert list(samples.columns) == ["question", "answer", "score", "ended", "kl"] and len(samples) > 0
    # the policy alone loads as a causal LM; the value head is beside it
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "ppo")
    assert model.config.pad_token_id != model.config.eos_token_id
    head = load_file(tmp_path / "ppo" / "value_head.safetensors")
    assert head["weight"].shape == (1, TINY_MODEL["hidden_size"]) and head["weight"].abs().sum() > 0
    assert yaml.safe_load((tmp_path / "ppo" / "params.yaml").read_text())["ppo"]["iterations"] == 8
    gen = pipeline("text-generation", model=str(tmp_path / "ppo"))
    assert gen("Question: How do I sort a git branch?\nAnswer:", max_new_tokens=5)[0]["generated_text"]


def test_separate_critic_and_fixed_kl(tmp_path, prepared, rlhf_inputs):
    params = _ppo_params(prepared, rlhf_inputs, tmp_path, iterations=2, eval_every=2, critic="separate",
                         kl={"beta": 0.05, "adaptive": False, "estimator": "k3"})
    proc = run_stage("ppo", params, tmp_path)
    assert proc.returncode == 0, proc.stderr
    m = json.loads((tmp_path / "ppo.json").read_text())
    assert m["beta_final"] == 0.05
    assert (tmp_path / "ppo" / "critic" / "config.json").is_file()
    beta = (tmp_path / "live/plots/metrics/objective/beta.tsv").read_text().splitlines()[1:]
    assert [float(r.split("\t")[1]) for r in beta] == pytest.approx([0.05, 0.05])


@pytest.mark.slow  # over 30 s: CI runs it (the fast suite stays under 10 minutes)
def test_killed_ppo_resumes_and_matches_an_uninterrupted_run(tmp_path, prepared, rlhf_inputs):
    full, cut = tmp_path / "full", tmp_path / "cut"
    full.mkdir()
    cut.mkdir()
    args = dict(iterations=6, eval_every=2, samples_every=2)
    assert run_stage("ppo", _ppo_params(prepared, rlhf_inputs, full, **args), full).returncode == 0

    params = _ppo_params(prepared, rlhf_inputs, cut, **args)
    # Kill once an iteration past the first checkpoint (iteration 2) has been logged, so the
    # resumed run must drop that row and train the iteration again.
    kl_curve = cut / "live" / "plots" / "metrics" / "objective" / "kl.tsv"
    run_until_killed("ppo", params, cut, settle=0.0, ready=lambda: (
        (cut / "ckpt" / "last.ckpt").exists() and kl_curve.exists() and len(kl_curve.read_text().splitlines()) >= 4))
    assert not (cut / "ppo.json").exists(), "the run finished before it could be interrupted"
    saved = torch.load(cut / "ckpt" / "last.ckpt", weights_only=True)
    logged = len(kl_curve.read_text().splitlines()) - 1
    assert 2 <= saved["cqa_online"]["iteration"] < logged < 6, (saved["cqa_online"]["iteration"], logged)

    resumed = run_stage("ppo", params, cut)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stderr
    assert (cut / "ppo.json").read_bytes() == (full / "ppo.json").read_bytes()
    assert (cut / "ppo" / "model.safetensors").read_bytes() == (full / "ppo" / "model.safetensors").read_bytes()
    for curve in ("objective/kl.tsv", "objective/beta.tsv", "eval/score.tsv"):
        path = Path("live/plots/metrics") / curve
        assert (cut / path).read_text() == (full / path).read_text(), curve  # no gap, no repeats


def test_reward_model_without_normalisation_is_refused(tmp_path, prepared, rlhf_inputs):
    rm = tmp_path / "rm"
    shutil.copytree(rlhf_inputs / "rm", rm)
    cfg = json.loads((rm / "config.json").read_text())
    del cfg["cqa_score_mean"], cfg["cqa_score_std"]
    (rm / "config.json").write_text(json.dumps(cfg))
    proc = run_stage("ppo", _ppo_params(prepared, rlhf_inputs, tmp_path, reward_model=str(rm)), tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ppo.reward_model:") and "cqa_score_mean" in proc.stderr
    assert not (tmp_path / "ppo.json").exists() and not (tmp_path / "ppo").exists()


def test_nan_reward_stops_the_stage_with_one_line(tmp_path, prepared, rlhf_inputs):
    rm = tmp_path / "rm"
    shutil.copytree(rlhf_inputs / "rm", rm)
    weights = load_file(rm / "model.safetensors")
    weights["score.weight"] = torch.full_like(weights["score.weight"], float("nan"))
    save_file(weights, rm / "model.safetensors", metadata={"format": "pt"})
    proc = run_stage("ppo", _ppo_params(prepared, rlhf_inputs, tmp_path, reward_model=str(rm)), tmp_path)
    assert proc.returncode == 2, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ppo: iteration 1: scores is not finite"), last
    assert not (tmp_path / "ppo.json").exists() and not (tmp_path / "ppo").exists()


def test_divergence_mid_run_keeps_the_last_good_checkpoint(tmp_path, prepared, rlhf_inputs):
    """A real Trainer runs 2 iterations and checkpoints; then the reward model breaks (NaN
    weights) and the resumed run stops at iteration 3, naming it, with last.ckpt untouched."""
    from cqa_rlhf.batches import LengthGroupedBatchSampler, ResumableDataLoader
    from cqa_rlhf.data.tables import read_table
    from cqa_rlhf.reward import normalization
    from cqa_rlhf.training import build_trainer
    from torch.utils.data import DataLoader

    tok = load_tokenizer(prepared / "tok")
    fmt = PromptFormatter(PromptConfig(), tok)
    rows = read_table(prepared / "prepared" / "train" / "prompts").to_pylist()

    def fit(iterations: int, resume: Path | None, rm) -> PPOModule:
        cfg = PPOConfig.model_validate(_ppo_params(prepared, rlhf_inputs, tmp_path, iterations=iterations,
                                                   eval_every=2)["ppo"])
        policy = build_policy(ModelConfig(), tok, cfg.sft_dir, "shared", cfg.reward_model)
        ref = load_frozen(cfg.sft_dir, tok, "causal")
        engine = RolloutEngine(fmt, cfg.sample, cfg.max_prompt_length, cfg.max_length, cfg.micro_batch_size, ref, rm)
        module = PPOModule(policy, engine, cfg, "fp", normalization(rm))
        trainer = build_trainer(TrainerConfig(), module.loop(), tmp_path / "ckpt")
        sampler = LengthGroupedBatchSampler([len(r["question"]) for r in rows], cfg.rollout_batch_size, 0, drop_last=True)
        train = ResumableDataLoader(ListDataset(rows), sampler, PromptCollator(), module.completed_in_epoch)
        val = DataLoader(ListDataset(rows[:8]), batch_size=8, collate_fn=PromptCollator())
        trainer.fit(module, train, val, ckpt_path=resume, weights_only=True)
        return module

    rm = load_frozen(rlhf_inputs / "rm", tok, "reward")
    assert fit(2, None, rm).iteration == 2
    last = tmp_path / "ckpt" / "last.ckpt"
    before = last.read_bytes()
    with torch.no_grad():
        rm.score.weight.fill_(float("nan"))
    with pytest.raises(DivergedError, match=r"iteration 3: scores is not finite"):
        fit(4, last, rm)
    assert last.read_bytes() == before
    assert torch.load(last, weights_only=True)["cqa_online"]["iteration"] == 2


def test_reward_model_scores_exactly_the_sampled_ids(prepared, rlhf_inputs, tok):
    """The rollout engine scores the prompt and response ids the policy saw and sampled: one by
    one, unpadded, the reward model gives the same scores. Scoring the decoded text instead
    (re-tokenised, EOS appended) gives other scores for answers that did not stop."""
    from cqa_rlhf.data.tables import read_table
    from cqa_rlhf.reward import reward_forward, score
    from cqa_rlhf.rollout import score_generations

    fmt = PromptFormatter(PromptConfig(), tok)
    policy = load_frozen(rlhf_inputs / "sft", tok, "causal")
    rm = load_frozen(rlhf_inputs / "rm", tok, "reward")
    engine = RolloutEngine(fmt, SampleConfig(max_new_tokens=12, batch_size=8), 48, 96, 4, policy, rm)
    questions = [r["question"] for r in read_table(prepared / "prepared" / "train" / "prompts").to_pylist()[:8]]
    rollout = engine.rollout(policy, questions, seed=3)
    with torch.no_grad():
        alone = [float(reward_forward(rm, torch.tensor([g.prompt_ids + g.response_ids]),
                                      torch.ones(1, len(g.prompt_ids) + len(g.response_ids), dtype=torch.long)))
                 for g in rollout.gens]
    assert rollout.raw_scores.tolist() == pytest.approx(alone, abs=1e-5)
    assert [g.prompt_ids for g in rollout.gens] == [fmt.encode_prompt(q, 48) for q in questions]
    text = score(rm, fmt, [(g.question, g.text) for g in rollout.gens], 96)
    assert score_generations(rm, rollout.gens, tok.pad_token_id, 96, 8, retokenize=fmt) == text
    unfinished = [i for i, g in enumerate(rollout.gens) if not g.ended]
    assert unfinished and all(abs(text[i] - alone[i]) > 1e-4 for i in unfinished)


def test_same_vocabulary(tok, tmp_path):
    from cqa_rlhf.tokenizer import same_vocabulary

    tok.save_pretrained(tmp_path / "t")
    other = load_tokenizer(tmp_path / "t")
    assert same_vocabulary(tok, other)
    other.add_tokens(["<|extra|>"])
    assert not same_vocabulary(tok, other)
