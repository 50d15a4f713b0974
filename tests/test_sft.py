"""Tokenizer, prompt encoding, model factory, the shared harness and the SFT stage."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer, GPTNeoConfig, GPTNeoForCausalLM, pipeline

from cqa_rlhf.config import FreezeConfig, ModelConfig, PromptConfig, TokenizerConfig
from cqa_rlhf.models import CausalLMWithValueHead, build_model
from cqa_rlhf.prompts import IGNORE_INDEX, PromptFormatter
from cqa_rlhf.tokenizer import load_tokenizer, train_bpe
from cqa_rlhf.training import apply_freeze, param_groups

from conftest import run_stage, run_until_killed
from helpers import TINY_MODEL, tiny_params

def _sft(work: Path, prepared: Path, name: str = "params.yaml", **sft) -> subprocess.CompletedProcess:
    params = tiny_params(prepared, **sft)
    for key in ("out", "metrics", "live_dir", "checkpoint_dir"):
        params["sft"][key] = str(work / Path(params["sft"][key]).name) if key != "metrics" else str(work / "sft.json")
    return run_stage("sft", params, work, name)


# --- prompt encoding -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tok(prepared):
    return load_tokenizer(prepared / "tok")


def test_tokenizer_has_distinct_pad_and_eos(tok):
    assert tok.eos_token == "<|endoftext|>" and tok.pad_token == "<|pad|>"
    assert tok.pad_token_id != tok.eos_token_id
    assert tok.decode(tok("How do I sort a git branch?")["input_ids"]) == "How do I sort a git branch?"


def test_bpe_training_is_deterministic(tmp_path):
    texts = ["How do I sort a list?", "Use the sort command.", "Why does it fail?"] * 20
    a = train_bpe(iter(texts), TokenizerConfig(vocab_size=300), 64)
    b = train_bpe(iter(texts), TokenizerConfig(vocab_size=300), 64)
    a.save_pretrained(tmp_path / "a")
    b.save_pretrained(tmp_path / "b")
    assert (tmp_path / "a/tokenizer.json").read_bytes() == (tmp_path / "b/tokenizer.json").read_bytes()


def test_label_masking_exact_positions(tok):
    fmt = PromptFormatter(PromptConfig(), tok)
    e = fmt.encode("Why does my git branch crash?", "Because the git branch is never closed.", 200)
    prompt_ids = tok(fmt.prompt("Why does my git branch crash?"), add_special_tokens=False)["input_ids"]
    answer_ids = tok(" Because the git branch is never closed.", add_special_tokens=False)["input_ids"]
    # The pieces tokenize as the whole prompt does, and as prompt + answer does.
    assert e.input_ids[: e.prompt_len] == prompt_ids
    assert e.input_ids == prompt_ids + answer_ids + [tok.eos_token_id]
    assert tok(fmt.prompt("Why does my git branch crash?") + " Because the git branch is never closed.",
               add_special_tokens=False)["input_ids"] == prompt_ids + answer_ids
    assert e.labels == [IGNORE_INDEX] * len(prompt_ids) + answer_ids + [tok.eos_token_id]
    assert not e.truncated_answer


def test_truncation_cuts_question_first_then_answer(tok):
    fmt = PromptFormatter(PromptConfig(), tok)
    q, ans = "How do I merge a sql table? " * 6, "Run the merge command on the sql table."
    full = fmt.encode(q, ans, 1000)
    fixed = len(fmt._prefix_ids) + len(fmt._suffix_ids)
    n_answer = len(full.input_ids) - full.prompt_len
    e = fmt.encode(q, ans, fixed + 5 + n_answer)  # room for 5 question tokens
    assert e.input_ids[e.prompt_len:] == full.input_ids[full.prompt_len:]  # answer + EOS intact
    assert e.prompt_len == fixed + 5 and e.input_ids[-1] == tok.eos_token_id
    assert e.input_ids[: len(fmt._prefix_ids) + 5] == full.input_ids[: len(fmt._prefix_ids) + 5]  # question start kept
    e = fmt.encode(q, ans, fixed + 3)  # no room even for the whole answer
    assert e.truncated_answer and len(e.input_ids) == fixed + 3
    assert e.prompt_len == fixed and tok.eos_token_id not in e.input_ids  # a cut answer gets no EOS
    assert e.labels.count(IGNORE_INDEX) == fixed


def test_pad_equal_to_eos_is_refused(tok):
    tok2 = AutoTokenizer.from_pretrained(tok.name_or_path)
    tok2.pad_token = tok2.eos_token
    with pytest.raises(ValueError, match="pad token must differ"):
        PromptFormatter(PromptConfig(), tok2)


# --- model factory and harness pieces --------------------------------------------------------
def test_factory_variants(tok):
    cfg = ModelConfig(config=TINY_MODEL)
    lm = build_model(cfg, tok, "causal")
    assert lm.config.pad_token_id == tok.pad_token_id and lm.config.vocab_size == len(tok)
    rm = build_model(cfg, tok, "reward")
    assert rm.config.num_labels == 1 and rm.config.pad_token_id == tok.pad_token_id
    vm = build_model(cfg, tok, "value")
    assert isinstance(vm, CausalLMWithValueHead) and torch.all(vm.v_head.weight == 0)
    ids = torch.tensor([[5, 6, 7]])
    logits, values = vm(ids, torch.ones_like(ids))
    assert logits.shape == (1, 3, len(tok)) and values.shape == (1, 3) and torch.all(values == 0)


@pytest.mark.parametrize("kind", ["causal", "reward"])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(tok, kind):
    from cqa_rlhf.reward import reward_forward
    from cqa_rlhf.sft import token_loss_sums

    ids = torch.tensor([[5, 6, 7, 8, 9], [10, 11, 12, tok.pad_token_id, tok.pad_token_id]])
    batch = {"input_ids": ids, "attention_mask": (ids != tok.pad_token_id).long(), "labels": ids.clone()}
    results = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = build_model(ModelConfig(config=TINY_MODEL, gradient_checkpointing=checkpointing), tok, kind).train()
        assert model.is_activation_checkpointing == checkpointing
        if kind == "causal":
            loss = token_loss_sums(model, batch)[0]
        else:
            loss = reward_forward(model, batch["input_ids"], batch["attention_mask"]).pow(2).sum()
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (plain, g0), (ckpt, g1) = results
    assert torch.allclose(plain, ckpt) and g0.keys() == g1.keys() and len(g0) > 10
    assert all(torch.allclose(g0[n], g1[n], atol=1e-6) for n in g0)


def test_pretrained_path_through_a_local_directory(tmp_path, tok):
    """The hub code path (`from_pretrained(name)`) exercised offline with a save_pretrained dir."""
    src = GPTNeoForCausalLM(GPTNeoConfig(vocab_size=len(tok), **TINY_MODEL))
    src.save_pretrained(tmp_path / "neo")
    tok.save_pretrained(tmp_path / "neo")
    cfg = ModelConfig(name=str(tmp_path / "neo"))
    lm = build_model(cfg, tok, "causal")
    assert torch.equal(lm.transformer.h[0].mlp.c_fc.weight, src.transformer.h[0].mlp.c_fc.weight)
    rm = build_model(cfg, tok, "reward")  # backbone from the LM, a fresh scalar head
    assert torch.equal(rm.transformer.h[1].attn.attention.q_proj.weight, src.transformer.h[1].attn.attention.q_proj.weight)
    assert rm.score.weight.std() > 0


def test_pretrained_tokenizer_gets_a_distinct_pad(tmp_path, tok):
    from cqa_rlhf.tokenizer import pretrained_tokenizer
    t = AutoTokenizer.from_pretrained(tok.name_or_path)
    t.pad_token = t.eos_token  # like GPT-Neo's own tokenizer: no pad, or pad = EOS
    t.save_pretrained(tmp_path / "neo")
    out = pretrained_tokenizer(ModelConfig(name=str(tmp_path / "neo")), TokenizerConfig())
    assert out.pad_token == "<|pad|>" and out.pad_token_id != out.eos_token_id


def test_freeze_options_leave_exactly_the_intended_params(tok):
    model = build_model(ModelConfig(config=TINY_MODEL), tok, "causal")
    apply_freeze(model, FreezeConfig(freeze_emb=True, freeze_attn=True, layers_not_to_freeze=[-1]), 2)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {"transformer.wte.weight", "transformer.wpe.weight",
                      *(f"transformer.h.0.attn.attention.{p}" for p in
                        ("k_proj.weight", "v_proj.weight", "q_proj.weight", "out_proj.weight", "out_proj.bias"))}
    assert "transformer.h.1.attn.attention.q_proj.weight" in trainable  # layer -1 kept trainable
    assert "transformer.h.0.mlp.c_fc.weight" in trainable and "transformer.ln_f.weight" in trainable
    first = frozen
    # Another config on a fresh model freezes exactly its own categories ...
    fresh = build_model(ModelConfig(config=TINY_MODEL), tok, "causal")
    apply_freeze(fresh, FreezeConfig(freeze_ln=True, freeze_ff=True), 2)
    frozen = {n for n, p in fresh.named_parameters() if not p.requires_grad}
    assert frozen == {n for n, _ in fresh.named_parameters() if ".ln_" in n or ".mlp." in n}
    # ... and on top of the first it never unfreezes (LoRA's frozen base weights stay frozen).
    apply_freeze(model, FreezeConfig(freeze_ln=True, freeze_ff=True), 2)
    assert {n for n, p in model.named_parameters() if not p.requires_grad} == first | frozen
    rm = build_model(ModelConfig(config=TINY_MODEL), tok, "reward")
    apply_freeze(rm, FreezeConfig(freeze_other=True), 2)
    assert {n for n, p in rm.named_parameters() if not p.requires_grad} == {"score.weight"}


def test_no_weight_decay_on_biases_and_layernorms(tok):
    model = build_model(ModelConfig(config=TINY_MODEL), tok, "causal")
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(not names[id(p)].endswith("bias") and ".ln_" not in names[id(p)] for p in decay["params"])
    assert {names[id(p)] for p in no_decay["params"]} == {n for n, _ in model.named_parameters()
                                                           if n.endswith("bias") or ".ln_" in n}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0


# --- the SFT stage -----------------------------------------------------------------------------
def test_tiny_sft_run_lowers_loss_and_exports_a_loadable_model(tmp_path, prepared):
    proc = _sft(tmp_path, prepared)
    assert proc.returncode == 0, proc.stderr
    m = json.loads((tmp_path / "sft.json").read_text())
    assert m["val_perplexity"] < m["untrained_val_perplexity"] / 2
    assert m["steps"] == 30
    out = tmp_path / "sft"
    assert (out / "model.safetensors").is_file() and not list(out.glob("*.bin"))
    saved = yaml.safe_load((out / "params.yaml").read_text())
    assert saved["sft"]["max_steps"] == 30 and saved["model"]["config"]["hidden_size"] == 32
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert model.config.pad_token_id == tokenizer.pad_token_id != tokenizer.eos_token_id
    gen = pipeline("text-generation", model=str(out))
    text = gen("Question: How do I sort a git branch?\nAnswer:", max_new_tokens=10, do_sample=False)
    assert text[0]["generated_text"].startswith("Question: How do I sort a git branch?\nAnswer:")
    # DVCLive curves for `dvc plots`, without touching any dvc.yaml.
    assert (tmp_path / "live" / "plots" / "metrics" / "train" / "loss.tsv").is_file()  # DVCLive nests on "_"
    assert (tmp_path / "live" / "plots" / "metrics" / "val" / "loss.tsv").is_file()
    assert not (tmp_path / "dvc.yaml").exists()


def test_a_width_the_heads_do_not_divide_is_a_one_line_params_error(tmp_path, prepared):
    params = tiny_params(prepared)
    params["model"]["config"] = {**TINY_MODEL, "hidden_size": 130, "num_heads": 4}
    params["sft"].update(out=str(tmp_path / "sft"), metrics=str(tmp_path / "sft.json"), live_dir=str(tmp_path / "live"),
                         checkpoint_dir=str(tmp_path / "ckpt"))
    proc = run_stage("sft", params, tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: model.config: ") and "divisible by num_heads" in lines[0], proc.stderr
    assert not (tmp_path / "sft").exists() and not (tmp_path / "sft.json").exists()


def test_same_params_twice_give_identical_metrics(tmp_path, prepared):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    assert _sft(tmp_path / "a", prepared, max_steps=12).returncode == 0
    assert _sft(tmp_path / "b", prepared, max_steps=12).returncode == 0
    assert (tmp_path / "a/sft.json").read_bytes() == (tmp_path / "b/sft.json").read_bytes()
    assert (tmp_path / "a/sft/model.safetensors").read_bytes() == (tmp_path / "b/sft/model.safetensors").read_bytes()


@pytest.mark.long  # outside CI (it would pass 20 minutes): python -m pytest -m long
def test_killed_run_resumes_and_matches_an_uninterrupted_run(tmp_path, prepared):
    full, cut = tmp_path / "full", tmp_path / "cut"
    full.mkdir()
    cut.mkdir()
    args = dict(max_steps=40, val_check_interval=10)
    assert _sft(full, prepared, **args).returncode == 0

    params = tiny_params(prepared, **args)
    for key, name in (("out", "sft"), ("live_dir", "live"), ("checkpoint_dir", "ckpt")):
        params["sft"][key] = str(cut / name)
    params["sft"]["metrics"] = str(cut / "sft.json")
    run_until_killed("sft", params, cut, ready=(cut / "ckpt" / "last.ckpt").exists)
    assert not (cut / "sft.json").exists(), "the run finished before it could be interrupted"
    step = torch.load(cut / "ckpt" / "last.ckpt", weights_only=True)["global_step"]
    assert 10 <= step < 40

    resumed = run_stage("sft", params, cut)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stderr
    assert (cut / "sft.json").read_bytes() == (full / "sft.json").read_bytes()
    curve = Path("plots/metrics/val/loss.tsv")
    assert (cut / "live" / curve).read_text() == (full / "live" / curve).read_text()  # no gap, no repeats


def test_changed_params_do_not_resume(tmp_path, prepared):
    assert _sft(tmp_path, prepared, max_steps=10).returncode == 0
    again = _sft(tmp_path, prepared, max_steps=12)
    assert again.returncode == 0
    assert "not resuming" in again.stderr and "resuming from" not in again.stderr
    assert json.loads((tmp_path / "sft.json").read_text())["steps"] == 12


def test_code_change_does_not_resume(tmp_path, prepared):
    """A checkpoint made by other code is not resumed (dvc reruns the stage when code changes)."""
    import cqa_rlhf.training as training
    from cqa_rlhf.training import fingerprint

    assert any(p.name == "training.py" for p in training.code_files())
    base = fingerprint({"a": 1}, [prepared / "tok"])
    assert fingerprint({"a": 1}, [prepared / "tok"]) == base
    assert fingerprint({"a": 2}, [prepared / "tok"]) != base
    assert fingerprint({"a": 1}, [prepared / "prepared" / "val" / "sft"]) != base


def test_trim_live_curves(tmp_path):
    from cqa_rlhf.training import trim_live_curves
    f = tmp_path / "plots" / "metrics" / "train" / "loss.tsv"
    f.parent.mkdir(parents=True)
    f.write_text("step\tloss\n4\t2.0\n9\t1.5\n14\t1.2\n1")  # a half-written last line
    trim_live_curves(tmp_path, 10)
    assert f.read_text() == "step\tloss\n4\t2.0\n9\t1.5\n"


def test_sft_stage_trains_a_pretrained_gpt_neo_named_in_params(tmp_path, prepared, tok):
    """`model.name` = a local save_pretrained directory: the same code path as a hub id."""
    neo = tmp_path / "neo"
    base = AutoTokenizer.from_pretrained(tok.name_or_path)
    base.pad_token = base.eos_token  # GPT-Neo's own tokenizer has no separate pad token
    base.save_pretrained(neo)
    GPTNeoForCausalLM(GPTNeoConfig(vocab_size=len(tok) - 1, **TINY_MODEL)).save_pretrained(neo)
    params = tiny_params(prepared, max_steps=10, out=str(tmp_path / "sft"), metrics=str(tmp_path / "sft.json"),
                         live_dir=str(tmp_path / "live"), checkpoint_dir=str(tmp_path / "ckpt"))
    params["model"] = {"name": str(neo)}
    params["tokenizer"]["out"] = str(tmp_path / "tok")
    for stage in ("tokenizer", "sft"):
        proc = run_stage(stage, params, tmp_path)
        assert proc.returncode == 0, proc.stderr
    t = AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert t.pad_token == "<|pad|>" and t.pad_token_id != t.eos_token_id
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "sft")
    assert model.get_input_embeddings().num_embeddings >= len(t)  # resized for the added pad token
    m = json.loads((tmp_path / "sft.json").read_text())
    assert m["val_perplexity"] < m["untrained_val_perplexity"]
