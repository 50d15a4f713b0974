"""DPO through the real stage on the tiny SFT policy: the reference is the SFT model, the loss
variants, TRL's statistics, the held-out figures, the export, resume after a kill, bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from cqa_rlhf.config import DPOConfig, PromptConfig
from cqa_rlhf.data.tables import read_table
from cqa_rlhf.dpo import add_reference_logps, encode_preferences, implicit_reward_pairs, restore_references, saved_references
from cqa_rlhf.models import load_frozen
from cqa_rlhf.prompts import PromptFormatter
from cqa_rlhf.stages.dpo import cached_references
from cqa_rlhf.tokenizer import load_tokenizer

from conftest import run_stage, run_until_killed
from helpers import tiny_params


@pytest.fixture(scope="module")
def prepared(prepared_session):
    return prepared_session


def _dpo_params(prepared: Path, inputs: Path, out: Path, **dpo) -> dict:
    params = tiny_params(prepared)
    params["dpo"] = {
        "data": str(prepared / "prepared"), "sft_dir": str(inputs / "sft"), "out": str(out / "dpo"),
        "metrics": str(out / "dpo.json"), "live_dir": str(out / "live"), "checkpoint_dir": str(out / "ckpt"),
        "batch_size": 8, "eval_batch_size": 16, "score_batch_size": 16, "max_length": 96, "max_epochs": -1,
        "max_steps": 16, "val_check_interval": 8, "optim": {"lr": 2e-3, "weight_decay": 0.0, "warmup_frac": 0.0},
        "trainer": {"log_every_n_steps": 1}, **dpo}
    return params


def _curve(out: Path, name: str) -> list[float]:
    rows = (out / "live" / "plots" / "metrics" / f"{name}.tsv").read_text().splitlines()[1:]
    return [float(r.split("\t")[1]) for r in rows]


def _implicit_preference(prepared: Path, sft_dir: Path, dpo_dir: Path) -> tuple[float, float]:
    """Accuracy and mean margin of the implicit reward beta (log pi - log pi_sft) on the training pairs."""
    rows = read_table(prepared / "prepared" / "train" / "pairs").to_pylist()
    tok = load_tokenizer(prepared / "tok")
    items = encode_preferences(rows, PromptFormatter(PromptConfig(), tok), 96)
    add_reference_logps(load_frozen(sft_dir, tok, "causal"), items, range(len(items)), 64, tok.pad_token_id)
    chosen, rejected = implicit_reward_pairs(load_frozen(dpo_dir, tok, "causal"), items, DPOConfig(beta=0.1),
                                             tok.pad_token_id)
    n = len(rows)
    return sum(c > r for c, r in zip(chosen, rejected)) / n, sum(c - r for c, r in zip(chosen, rejected)) / n


def test_dpo_on_half_a_trains_on_half_a_pairs_and_keeps_every_val_and_test_pair(prepared):
    from cqa_rlhf.data.tables import question_half
    from cqa_rlhf.stages.dpo import load_pairs

    fmt = PromptFormatter(PromptConfig(), load_tokenizer(prepared / "tok"))
    cfg = DPOConfig(data=str(prepared / "prepared"), max_length=96, train_questions="half_a")
    half, every = load_pairs(cfg, fmt), load_pairs(cfg.model_copy(update={"train_questions": "all"}), fmt)
    assert {question_half(r["question_id"]) for r in half["train"][0]} == {"half_a"}
    assert 0 < len(half["train"][0]) < len(every["train"][0]) and len(half["train"][1]) == len(half["train"][0])
    assert half["val"][0] == every["val"][0] and half["test"][0] == every["test"][0]


def test_dpo_starts_at_log_2_learns_the_pairs_and_exports_a_causal_lm(tmp_path, prepared, rlhf_inputs):
    proc = run_stage("dpo", _dpo_params(prepared, rlhf_inputs, tmp_path), tmp_path)
    assert proc.returncode == 0, proc.stderr
    # The first step's policy is the reference (the SFT model): h = 0, loss = log 2 exactly.
    loss = _curve(tmp_path, "train/loss")
    assert loss[0] == pytest.approx(math.log(2), abs=1e-6) and _curve(tmp_path, "rewards/margins")[0] == 0.0
    # It learned the preference: over every training pair (16 steps saw 128 of them) the implicit
    # reward now ranks the chosen answer first more often than not (at the start: ties, 0 of them).
    accuracy, margin = _implicit_preference(prepared, rlhf_inputs / "sft", tmp_path / "dpo")
    assert accuracy > 0.53 and margin > 0.05, (accuracy, margin)
    for name in ("rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected", "val/accuracy", "val/margin"):
        assert _curve(tmp_path, name), name  # TRL's names
    m = json.loads((tmp_path / "dpo.json").read_text())
    assert m["pairs"] > 0 and 0 <= m["pairwise_accuracy_ci95"]["low"] <= m["pairwise_accuracy"] <= m["pairwise_accuracy_ci95"]["high"]
    assert {"length_baseline_accuracy", "length_baseline_ci95", "accuracy_over_length_ci95", "steps"} <= m.keys()
    assert json.loads((tmp_path / "live" / "timing.json").read_text())["wall_seconds"] > 0
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "dpo")  # a plain causal LM, the params beside it
    assert yaml.safe_load((tmp_path / "dpo" / "params.yaml").read_text())["dpo"]["beta"] == 0.1
    sft = AutoModelForCausalLM.from_pretrained(rlhf_inputs / "sft")
    assert any(not torch.equal(a, b) for a, b in zip(model.state_dict().values(), sft.state_dict().values()))


@pytest.mark.parametrize("variant", [{"loss": "ipo", "beta": 0.5}, {"label_smoothing": 0.2}])
def test_ipo_and_conservative_dpo_start_at_their_formula(tmp_path, prepared, rlhf_inputs, variant):
    params = _dpo_params(prepared, rlhf_inputs, tmp_path, max_steps=2, val_check_interval=2, **variant)
    proc = run_stage("dpo", params, tmp_path)
    assert proc.returncode == 0, proc.stderr
    first = _curve(tmp_path, "train/loss")[0]
    # h = 0 at the first step: IPO (0 - 1/(2 beta))^2 = 1; cDPO -(1-e) log s(0) - e log s(0) = log 2
    assert first == pytest.approx(1.0 if variant.get("loss") == "ipo" else math.log(2), abs=1e-6)


def test_lora_dpo_exports_a_merged_model(tmp_path, prepared, rlhf_inputs):
    params = _dpo_params(prepared, rlhf_inputs, tmp_path, max_steps=4, val_check_interval=4)
    params["model"]["lora"] = {"r": 4, "alpha": 8.0, "dropout": 0.0}
    proc = run_stage("dpo", params, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert _curve(tmp_path, "train/loss")[0] == pytest.approx(math.log(2), abs=1e-6)  # adapters start at 0
    m = json.loads((tmp_path / "dpo.json").read_text())
    assert 0 < m["trainable_params"] < 20_000  # adapters only
    assert not (tmp_path / "dpo" / "adapter_config.json").exists()
    AutoModelForCausalLM.from_pretrained(tmp_path / "dpo")


def _full_then_cut(tmp_path: Path, prepared: Path, rlhf_inputs: Path, **args) -> tuple[Path, Path, dict]:
    """An uninterrupted DPO run in ``full``; ``cut``'s params (the same ``args``) to interrupt."""
    full, cut = tmp_path / "full", tmp_path / "cut"
    full.mkdir()
    cut.mkdir()
    assert run_stage("dpo", _dpo_params(prepared, rlhf_inputs, full, **args), full).returncode == 0
    return full, cut, _dpo_params(prepared, rlhf_inputs, cut, **args)


def _same_outputs(cut: Path, full: Path) -> None:
    assert (cut / "dpo.json").read_bytes() == (full / "dpo.json").read_bytes()
    assert (cut / "dpo" / "model.safetensors").read_bytes() == (full / "dpo" / "model.safetensors").read_bytes()


@pytest.mark.long  # outside CI (it would pass 20 minutes): python -m pytest -m long
def test_killed_dpo_resumes_and_matches_an_uninterrupted_run(tmp_path, prepared, rlhf_inputs):
    full, cut, params = _full_then_cut(tmp_path, prepared, rlhf_inputs, max_steps=24, val_check_interval=6)
    run_until_killed("dpo", params, cut, ready=(cut / "ckpt" / "last.ckpt").exists)
    assert not (cut / "dpo.json").exists(), "the run finished before it could be interrupted"
    assert 6 <= torch.load(cut / "ckpt" / "last.ckpt", weights_only=True)["global_step"] < 24
    resumed = run_stage("dpo", params, cut)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stderr and "reference log-probs of the pairs from" in resumed.stderr
    _same_outputs(cut, full)
    for curve in ("train/loss.tsv", "val/accuracy.tsv", "rewards/margins.tsv"):
        path = Path("live/plots/metrics") / curve
        assert (cut / path).read_text() == (full / path).read_text(), curve  # no gap, no repeats


def test_bad_dpo_params_are_one_line(tmp_path, prepared, rlhf_inputs):
    params = _dpo_params(prepared, rlhf_inputs, tmp_path, loss="ipo", label_smoothing=0.1)
    proc = run_stage("dpo", params, tmp_path)
    assert proc.returncode == 2 and "label_smoothing applies to loss: sigmoid only" in proc.stderr.strip().splitlines()[-1]
    params = _dpo_params(prepared, rlhf_inputs, tmp_path, sft_dir=str(tmp_path / "nowhere"))
    proc = run_stage("dpo", params, tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == f"error: {tmp_path / 'nowhere'}: dpo.sft_dir is not an exported model directory (no config.json)"
    assert not (tmp_path / "dpo.json").exists() and not (tmp_path / "dpo").exists()


def test_saved_reference_logps_come_back_only_for_the_same_items():
    items = {"train": [{}, {"ref_chosen": -1.5, "ref_rejected": -2.25}, {"ref_chosen": -0.1, "ref_rejected": -3.0}],
             "test": [{"ref_chosen": -7.0, "ref_rejected": -6.5}]}
    wanted = {"train": [2, 1, 2], "test": range(1)}
    saved = json.loads(json.dumps(saved_references(items, wanted)))  # through the cache file's JSON
    assert saved == {"train": [[1, -1.5, -2.25], [2, -0.1, -3.0]], "test": [[0, -7.0, -6.5]]}
    fresh = {"train": [{}, {}, {}], "test": [{}]}
    assert not restore_references(saved, fresh, {"train": [1], "test": [0]}) and fresh["train"][1] == {}
    assert restore_references(saved, fresh, wanted)
    assert fresh["train"][2] == {"ref_chosen": -0.1, "ref_rejected": -3.0} and fresh["train"][0] == {}


@pytest.mark.parametrize("saved", [{"train": [[1, -1.5]], "test": [[0, -7.0, -6.5]]},
                                   {"train": [[1, -1.5, "x"], [2, -0.1, -3.0]], "test": [[0, -7.0, -6.5]]},
                                   {"train": [[1.0, -1.5, -2.25], [2, -0.1, -3.0]], "test": [[0, -7.0, -6.5]]},
                                   {"train": "[[1, -1.5, -2.25]]", "test": []}, [[1, -1.5, -2.25]]])
def test_malformed_saved_reference_logps_are_refused_and_touch_nothing(saved):
    fresh = {"train": [{}, {}, {}], "test": [{}]}
    assert not restore_references(saved, fresh, {"train": [1, 2], "test": range(1)})
    assert fresh == {"train": [{}, {}, {}], "test": [{}]}


@pytest.mark.parametrize("text", ['{"fingerprint": "fp", "splits": {"train": [[0, -1', "\xff\xfe not text",
                                  '[1, 2, 3]', '{"fingerprint": "fp"}'])
def test_a_damaged_reference_cache_file_is_ignored_with_a_note(tmp_path, capsys, text):
    (tmp_path / "reference_logps.rank0.json").write_bytes(text.encode("latin-1"))
    (tmp_path / "reference_logps.rank1.json").write_text(json.dumps({"fingerprint": "fp", "splits": {"test": []}}))
    assert cached_references(str(tmp_path), "fp") == {"reference_logps.rank1.json": {"test": []}}
    note = capsys.readouterr().err.strip()
    assert len(note.splitlines()) == 1
    assert note.startswith(f"dpo: ignoring {tmp_path / 'reference_logps.rank0.json'}: not a reference log-prob cache (")


def test_dpo_killed_before_its_first_checkpoint_takes_its_reference_logps_from_the_cache(tmp_path, prepared, rlhf_inputs):
    args = dict(max_steps=8, val_check_interval=8)
    full, cut, params = _full_then_cut(tmp_path, prepared, rlhf_inputs, **args)
    cache = cut / "ckpt" / "reference_logps.rank0.json"
    run_until_killed("dpo", params, cut, ready=cache.exists, settle=0.0)
    assert not (cut / "ckpt" / "last.ckpt").exists(), "the run checkpointed before it could be interrupted"
    resumed = run_stage("dpo", params, cut)
    assert resumed.returncode == 0, resumed.stderr
    assert f"dpo: reference log-probs of the pairs from {cache}" in resumed.stderr
    _same_outputs(cut, full)
    # Other params (another fingerprint): the cache is not taken, the pairs are scored again.
    other = run_stage("dpo", _dpo_params(prepared, rlhf_inputs, cut, **args, beta=0.2), cut)
    assert other.returncode == 0 and "reference log-probs of the pairs from" not in other.stderr
    # A damaged cache file: a one-line note, the pairs scored again, the uninterrupted run's bytes.
    damaged = tmp_path / "damaged"
    (damaged / "ckpt").mkdir(parents=True)
    (damaged / "ckpt" / cache.name).write_text('{"fingerprint": ')
    again = run_stage("dpo", _dpo_params(prepared, rlhf_inputs, damaged, **args), damaged)
    assert again.returncode == 0, again.stderr
    assert f"dpo: ignoring {damaged / 'ckpt' / cache.name}: not a reference log-prob cache (JSONDecodeError)" in again.stderr
    _same_outputs(damaged, full)
