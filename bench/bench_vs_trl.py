"""This project against Hugging Face TRL, and both against a bare PyTorch loop, on identical work.

For each supervised stage (sft; reward: Bradley-Terry on pairs; dpo) and each model config
(``default``: params.yaml's GPT-Neo; ``d256``: the same with hidden size 256, intermediate 1024),
three sides train the same model for the same steps:
- ``ours``: the stage's own module on the shared harness (prepare_run: the Lightning Trainer,
  DVCLive curves, checkpointing, the resumable length-grouped loader), as `dvc repro` runs it;
- ``trl``: TRL's trainer (SFTTrainer, RewardTrainer, DPOTrainer with precomputed reference
  log-probs, as ours does) fed a pre-tokenised dataset in exactly our batch order (a sequential
  sampler over rows laid out batch by batch);
- ``bare``: the same batches through forward, backward, gradient clipping, AdamW and the linear
  schedule, with nothing else: the ceiling.
Identical inputs: the pipeline's prepared tables and tokenizer (run `dvc repro data tokenizer`
first), one saved initial model per config that every side loads, batch size, AdamW (lr, betas,
eps, weight decay 0 so parameter grouping cannot differ), linear decay with no warmup, gradient
clip 1.0, fp32, the numeric pin of the stages (cqa_rlhf is imported first in every process).
Each run is its own process; repeats are interleaved (ours, trl, bare, ours, ...), and the dense
matmul rate is measured before and after each run so a machine that slowed down shows.

Counting: a forward pre-hook on the model records the time and the non-pad tokens of every
forward made with gradients (the training forwards: one per step on every side). A step's time is
the gap between consecutive training forwards; the first ``--warmup`` steps and the last are not
timed. Reported per stage: median step time, non-pad tokens/s and the ratios ours/trl,
ours/bare; and the per-step losses of the three sides, which must agree (same maths).

Online RL (grpo, ppo) runs from the pipeline's trained SFT policy and Bradley-Terry reward model
(run `dvc repro reward` first), default config only, 64 answers of at most 96 new tokens an
iteration: GRPO 8 prompts x 8 answers (TRL's GRPOTrainer: steps_per_generation 2, loss_type dapo,
beta 0.04); PPO 64 prompts, 2 epochs x 2 minibatches, a separate critic from the reward model and
a fixed KL coefficient (TRL 1.12's trl.experimental.ppo.PPOTrainer, pip-installed --no-deps into
a temporary folder put on PYTHONPATH for that run only: later TRL removed it). Each side samples
its own answers, so the rate compared is answers (samples) per second; the bare loop samples with
``generate``. Iteration times: from the start of sampling to the end of the last update; the
first iteration is not timed.

TRL is an optional extra: ``pip install -c requirements.lock -e '.[bench]'``.

Usage: python bench/bench_vs_trl.py [--stages sft,reward,dpo,grpo,ppo] [--configs default,d256]
       [--steps 40] [--iterations 6] [--repeats 2] [--out bench/vs_trl.json]
CQA_NUMERICS=free (set before the command) runs every side on the libraries' fastest paths.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cqa_rlhf  # noqa: F401  first: it pins the numeric code paths before torch loads
import torch
import yaml
from machine import cpu_model

ROOT = Path(__file__).resolve().parents[1]
D256 = {"hidden_size": 256, "num_layers": 4, "num_heads": 4, "intermediate_size": 1024}
KIND = {"sft": "causal", "reward": "reward", "dpo": "causal"}
LR = {"sft": 1e-3, "reward": 5e-4, "dpo": 2e-5}
BATCH = {"sft": 16, "reward": 16, "dpo": 8}  # the default params' batch sizes (reward, dpo: pairs)


# ---------------------------------------------------------------------------------------------
# The common inputs: items, their batch order, the initial model
# ---------------------------------------------------------------------------------------------
def formatter():
    from cqa_rlhf.config import PromptConfig
    from cqa_rlhf.prompts import PromptFormatter
    from cqa_rlhf.tokenizer import load_tokenizer

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    tok = load_tokenizer(ROOT / params["tokenizer"]["out"])
    return PromptFormatter(PromptConfig(**params["prompt"]), tok), params


def stage_items(stage: str, fmt) -> list[dict]:
    from cqa_rlhf.data.tables import read_table
    from cqa_rlhf.dpo import encode_preferences
    from cqa_rlhf.reward import encode_pairs
    from cqa_rlhf.sft import encode_sft

    data = ROOT / "data" / "prepared" / "train"
    if stage == "sft":
        return encode_sft(read_table(data / "sft").to_pylist(), fmt, 256)
    rows = read_table(data / "pairs").to_pylist()
    if stage == "reward":
        return encode_pairs(rows, fmt, 256)
    items = encode_preferences(rows, fmt, 256)
    return [x for x in items if prompt_len(x["chosen_labels"]) == prompt_len(x["rejected_labels"])]


def prompt_len(labels: list[int]) -> int:
    return next(i for i, t in enumerate(labels) if t != -100)


def lengths(stage: str, items: list[dict]) -> list[int]:
    from cqa_rlhf.batches import pair_lengths

    return [len(x["input_ids"]) for x in items] if stage == "sft" else pair_lengths(items)


def sampler(stage: str, items: list[dict]):
    from cqa_rlhf.batches import LengthGroupedBatchSampler

    return LengthGroupedBatchSampler(lengths(stage, items), BATCH[stage], 0)


def initial_model(config: str, kind: str, work: Path, fmt, params: dict) -> Path:
    """One saved initial model per (config, kind): every side loads the same weights."""
    from cqa_rlhf.config import ModelConfig
    from cqa_rlhf.models import build_model

    out = work / f"init-{config}-{kind}"
    if not out.exists():
        torch.manual_seed(0)
        model_cfg = {**params["model"]["config"], **(D256 if config == "d256" else {})}
        build_model(ModelConfig(config=model_cfg), fmt.tok, kind).save_pretrained(out)
    return out


# ---------------------------------------------------------------------------------------------
# Counting: training forwards, their tokens, the losses
# ---------------------------------------------------------------------------------------------
class Clock:
    """Time and non-pad tokens of every forward with gradients (one per training step)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.times: list[float] = []
        self.tokens: list[int] = []
        self.losses: list[float] = []
        model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs) -> None:
        if torch.is_grad_enabled() and module.training:
            self.times.append(time.perf_counter())
            self.tokens.append(int(kwargs["attention_mask"].sum()))

    def result(self, warmup: int) -> dict:
        gaps = [b - a for a, b in zip(self.times, self.times[1:])][warmup:]
        tokens = self.tokens[warmup:-1]
        return {"steps": len(self.times), "median_step_s": statistics.median(gaps),
                "tokens_per_s": sum(tokens) / sum(gaps), "losses": self.losses}


def matmul_gflops() -> float:
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    a @ b
    start = time.perf_counter()
    for _ in range(10):
        a @ b
    return 2 * 1024**3 * 10 / (time.perf_counter() - start) / 1e9


# ---------------------------------------------------------------------------------------------
# The three sides
# ---------------------------------------------------------------------------------------------
def our_config(stage: str, steps: int, work: Path):
    from cqa_rlhf.config import ClassificationConfig, DPOConfig, OptimConfig, SFTConfig

    optim = OptimConfig(lr=LR[stage], weight_decay=0.0, betas=[0.9, 0.95], warmup_frac=0.0, gradient_clip_val=1.0)
    common = dict(max_steps=steps, max_epochs=-1, batch_size=BATCH[stage], val_check_interval=10**6,
                  limit_val_batches=0, optim=optim, live_dir=str(work / "live"), checkpoint_dir=str(work / "ckpt"))
    if stage == "sft":
        return SFTConfig(**common)
    if stage == "reward":
        return ClassificationConfig(use_margin=True, margin_scale=1.0, center_coef=0.01, **common)
    return DPOConfig(beta=0.1, **common)


def reference_logps(model, items: list[dict], batches: list[list[int]], pad_id: int) -> float:
    """DPO: the reference (= initial) log-probs of the pairs the fit sees, once; returns seconds."""
    from cqa_rlhf.dpo import add_reference_logps

    start = time.perf_counter()
    add_reference_logps(model, items, [i for b in batches for i in b], 64, pad_id)
    return time.perf_counter() - start


def run_ours(stage: str, model_dir: Path, items: list[dict], steps: int, work: Path, fmt) -> tuple[Clock, float]:
    import lightning as L
    from torch.utils.data import DataLoader

    from cqa_rlhf.batches import CausalLMCollator, ListDataset, PairCollator, ResumableDataLoader
    from cqa_rlhf.config import ModelConfig, TrainerConfig
    from cqa_rlhf.dpo import DPOModule
    from cqa_rlhf.models import build_model
    from cqa_rlhf.reward import PairwiseModule
    from cqa_rlhf.sft import SFTModule
    from cqa_rlhf.training import prepare_run

    class Losses(L.Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            clock.losses.append(float(outputs["loss"]))

    cfg, pad = our_config(stage, steps, work), fmt.tok.pad_token_id
    model = build_model(ModelConfig(), fmt.tok, KIND[stage], init_from=model_dir)
    clock, prep = Clock(model), 0.0
    smp = sampler(stage, items)
    if stage == "dpo":
        prep = reference_logps(model, items, smp.batches_of(0)[:steps], pad)
    module = {"sft": SFTModule, "reward": PairwiseModule, "dpo": DPOModule}[stage](model, cfg, "bench")
    trainer, _ = prepare_run(TrainerConfig(log_every_n_steps=1), module, cfg.live_dir, cfg.checkpoint_dir, "bench",
                             stage, callbacks=[Losses()])
    collate = CausalLMCollator(pad) if stage == "sft" else PairCollator(pad)
    train = ResumableDataLoader(ListDataset(items), smp, collate, module.completed_in_epoch)
    trainer.fit(module, train, DataLoader(ListDataset(items[:2]), batch_size=2, collate_fn=collate))
    return clock, prep


def trl_rows(stage: str, items: list[dict], batches: list[list[int]]) -> list[dict]:
    """Our items in our batch order, in the columns TRL's trainers take pre-tokenised."""
    rows = []
    for i in (i for b in batches for i in b):
        x = items[i]
        if stage == "sft":
            rows.append({"input_ids": x["input_ids"], "labels": x["labels"]})
        elif stage == "reward":
            rows.append({"chosen_ids": x["chosen"], "rejected_ids": x["rejected"], "margin": x["margin"]})
        else:
            p = prompt_len(x["chosen_labels"])
            rows.append({"prompt_ids": x["chosen"][:p], "chosen_ids": x["chosen"][p:], "rejected_ids": x["rejected"][p:]})
    return rows


def run_trl(stage: str, model_dir: Path, items: list[dict], steps: int, work: Path, fmt) -> tuple[Clock, float]:
    import trl
    from datasets import Dataset
    from torch.utils.data import SequentialSampler
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    batches = sampler(stage, items).batches_of(0)[:steps]
    auto = AutoModelForSequenceClassification if stage == "reward" else AutoModelForCausalLM
    model = auto.from_pretrained(model_dir)
    clock = Clock(model)
    trainer_cls, config_cls = {"sft": (trl.SFTTrainer, trl.SFTConfig), "reward": (trl.RewardTrainer, trl.RewardConfig),
                               "dpo": (trl.DPOTrainer, trl.DPOConfig)}[stage]

    class InOrder(trainer_cls):
        def _get_train_sampler(self, dataset=None):
            return SequentialSampler(dataset if dataset is not None else self.train_dataset)

        def _prepare_dataset(self, dataset, *args, **kwargs):
            # DPO: TRL 1.16 tokenises text columns only; ours are already its collator's columns
            return dataset if stage == "dpo" else super()._prepare_dataset(dataset, *args, **kwargs)

        def compute_loss(self, *args, **kwargs):
            out = super().compute_loss(*args, **kwargs)
            clock.losses.append(float((out[0] if isinstance(out, tuple) else out).detach()))
            return out

    extra = {"sft": {"max_length": None}, "reward": {"center_rewards_coefficient": 0.01, "max_length": None},
             "dpo": {"beta": 0.1, "loss_type": ["sigmoid"], "max_length": None, "precompute_ref_log_probs": True,
                     "precompute_ref_batch_size": 64}}[stage]
    args = config_cls(output_dir=str(work / "trl"), per_device_train_batch_size=BATCH[stage], max_steps=steps,
                      learning_rate=LR[stage], lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0,
                      adam_beta1=0.9, adam_beta2=0.95, max_grad_norm=1.0, logging_steps=1, save_strategy="no",
                      eval_strategy="no", report_to="none", use_cpu=True, bf16=False, fp16=False, seed=0,
                      dataloader_num_workers=0, disable_tqdm=True, **extra)
    trainer = InOrder(model=model, args=args, train_dataset=Dataset.from_list(trl_rows(stage, items, batches)),
                      processing_class=fmt.tok)
    start = time.perf_counter()
    trainer.train()
    first = clock.times[0] if clock.times else time.perf_counter()
    return clock, (first - start) if stage == "dpo" else 0.0


def bare_loss(stage: str, model, batch: dict) -> torch.Tensor:
    from cqa_rlhf.dpo import pair_logps
    from cqa_rlhf.losses import center_penalty, pairwise_loss
    from cqa_rlhf.preference_math import dpo_loss, preference_logits
    from cqa_rlhf.reward import reward_forward
    from cqa_rlhf.sft import token_loss_sums

    if stage == "sft":
        s, n = token_loss_sums(model, batch)
        return s / n.clamp(min=1)
    if stage == "reward":
        r = reward_forward(model, batch["input_ids"], batch["attention_mask"])
        b = r.shape[0] // 2
        return pairwise_loss(r[:b], r[b:], batch["margin"]) + 0.01 * center_penalty(r[:b], r[b:])
    logps, _ = pair_logps(model, batch)
    b = logps.shape[0] // 2
    return dpo_loss(preference_logits(logps[:b], logps[b:], batch["ref_chosen"], batch["ref_rejected"]), 0.1).mean()


def run_bare(stage: str, model_dir: Path, items: list[dict], steps: int, work: Path, fmt) -> tuple[Clock, float]:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, get_linear_schedule_with_warmup

    from cqa_rlhf.batches import CausalLMCollator, PairCollator

    pad = fmt.tok.pad_token_id
    batches = sampler(stage, items).batches_of(0)[:steps]
    model = (AutoModelForSequenceClassification if stage == "reward" else AutoModelForCausalLM).from_pretrained(model_dir)
    prep = reference_logps(model, items, batches, pad) if stage == "dpo" else 0.0
    clock, collate = Clock(model), CausalLMCollator(pad) if stage == "sft" else PairCollator(pad)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=LR[stage], betas=(0.9, 0.95), weight_decay=0.0)
    sched = get_linear_schedule_with_warmup(opt, 0, steps)
    for b in batches:
        loss = bare_loss(stage, model, collate([items[i] for i in b]))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        clock.losses.append(float(loss.detach()))
    return clock, prep


SIDES = {"ours": run_ours, "trl": run_trl, "bare": run_bare}


# ---------------------------------------------------------------------------------------------
# GRPO: the pipeline's SFT policy and Bradley-Terry reward model (run `dvc repro reward` first);
# per iteration 8 prompts x 8 answers of at most 96 tokens, 2 updates of 32 answers, beta 0.04
# ---------------------------------------------------------------------------------------------
G, PROMPTS, MINI, NEW = 8, 8, 32, 96


class IterationClock:
    """Start and end of each iteration (generate, score, update) and the answer tokens it made."""

    def __init__(self) -> None:
        self.starts: list[float] = []
        self.ends: list[float] = []
        self.tokens: list[int] = []
        self.losses: list[float] = []

    def result(self, warmup: int) -> dict:
        spans = [e - s for s, e in zip(self.starts, self.ends)][warmup:]
        tokens = self.tokens[warmup:len(self.ends)]
        return {"steps": len(self.ends), "median_step_s": statistics.median(spans),
                "tokens_per_s": sum(tokens) / sum(spans), "samples_per_s": G * PROMPTS * len(spans) / sum(spans),
                "losses": self.losses}


def train_questions(n: int) -> list[str]:
    """The first ``n`` training prompts: every online-RL side asks the same questions."""
    from cqa_rlhf.data.tables import read_table

    rows = read_table(ROOT / "data" / "prepared" / "train" / "prompts").to_pylist()
    return [r["question"] for r in rows[:n]]


def timed(module_cls, clock: IterationClock, length_key: str, loss_key: str | None):
    """``module_cls`` (an online-RL module) with each iteration's span, answer tokens and loss on ``clock``."""

    class Timed(module_cls):
        def on_train_batch_start(self, batch, batch_idx):
            clock.starts.append(time.perf_counter())

        def on_train_batch_end(self, outputs, batch, batch_idx):
            clock.ends.append(time.perf_counter())

        def log_iteration(self, values, n):
            clock.tokens.append(int(values[length_key] * n) if length_key in values else 0)
            if loss_key is not None:
                clock.losses.append(float(values[loss_key]))
            super().log_iteration(values, n)

    return Timed


def online_config(section: str, cfg_cls, iterations: int, work: Path, **update):
    """The stage's params with a short run, almost no held-out evaluation and outputs in ``work``."""
    from cqa_rlhf.stages.common import Params

    params = Params.read(str(ROOT / "params.yaml"))
    cfg = params.section(section, cfg_cls).model_copy(update={
        "iterations": iterations, "eval_every": 10**6, "eval_prompts": 8, "samples_every": 10**6,
        "out": str(work / "out"), "live_dir": str(work / "live"), "checkpoint_dir": str(work / "ckpt"), **update})
    return cfg, params.shared()


def run_ours_grpo(iterations: int, work: Path, fmt) -> tuple[IterationClock, float]:
    """The grpo stage's own steps (stages/grpo.py), its module timed per iteration."""
    from cqa_rlhf.config import GRPOConfig
    from cqa_rlhf.grpo import GRPOModule
    from cqa_rlhf.models import build_model, disable_dropout, reference_for
    from cqa_rlhf.online import load_inputs, rollout_engine, train

    clock = IterationClock()
    cfg, shared = online_config("grpo", GRPOConfig, iterations, work)
    inputs = load_inputs("grpo", cfg, shared.trainer_for(cfg.trainer), shared.prompt, shared.tokenizer.out)
    policy = disable_dropout(build_model(shared.model, inputs.tok, "causal", init_from=cfg.sft_dir))
    engine, norm = rollout_engine("grpo", cfg, inputs, shared.prompt, shared.model.dtype,
                                  reference_for(policy, cfg.sft_dir, inputs.tok, shared.model.dtype))
    train(timed(GRPOModule, clock, "completions/mean_length", "loss")(policy, engine, cfg, "bench", norm, None),
          inputs, 0)
    return clock, 0.0


def run_trl_grpo(iterations: int, work: Path, fmt) -> tuple[IterationClock, float]:
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, TrainerCallback

    clock = IterationClock()

    class Steps(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step % 2 == 0:  # a new generation batch: an iteration starts
                clock.starts.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step % 2 == 0:  # its second update done
                clock.ends.append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "completions/mean_length" in logs and state.global_step % 2 == 1:
                clock.tokens.append(int(logs["completions/mean_length"] * G * PROMPTS))
                clock.losses.append(float(logs.get("loss", float("nan"))))

    prompts = [fmt.tok.decode(fmt.encode_prompt(q, 128)) for q in train_questions(PROMPTS * iterations)]
    args = trl.GRPOConfig(output_dir=str(work / "trl"), per_device_train_batch_size=MINI, steps_per_generation=2,
                          num_generations=G, max_completion_length=NEW, temperature=1.0, top_p=1.0, top_k=0,
                          beta=0.04, epsilon=0.2, loss_type="dapo", scale_rewards="group", num_iterations=1,
                          learning_rate=1e-4, lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0,
                          adam_beta1=0.9, adam_beta2=0.95, max_grad_norm=1.0, max_steps=2 * iterations,
                          logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, bf16=False,
                          fp16=False, seed=0, shuffle_dataset=False, disable_tqdm=True, disable_dropout=True)
    trainer = trl.GRPOTrainer(model=AutoModelForCausalLM.from_pretrained(ROOT / "models" / "sft"),
                              reward_funcs=AutoModelForSequenceClassification.from_pretrained(
                                  ROOT / "models" / "reward" / "classification"),
                              args=args, train_dataset=Dataset.from_list([{"prompt": p} for p in prompts]),
                              processing_class=fmt.tok, reward_processing_classes=fmt.tok, callbacks=[Steps()])
    trainer.train()
    return clock, 0.0


def run_bare_grpo(iterations: int, work: Path, fmt) -> tuple[IterationClock, float]:
    """Generate, score (policy, reference, reward model), two clipped-ratio + k3 updates: no framework."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from cqa_rlhf.batches import pad_rows, position_ids
    from cqa_rlhf.group_math import group_advantages
    from cqa_rlhf.ppo_math import kl_per_token, masked_mean, policy_loss

    tok, clock = fmt.tok, IterationClock()
    policy, ref = (AutoModelForCausalLM.from_pretrained(ROOT / "models" / "sft") for _ in range(2))
    rm = AutoModelForSequenceClassification.from_pretrained(ROOT / "models" / "reward" / "classification")
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.0)
    questions = train_questions(PROMPTS * iterations)

    def logps(model, ids, mask, p):  # [B, R] log-probs of the response tokens
        logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask)).logits[:, p - 1:-1]
        return torch.log_softmax(logits.float(), -1).gather(-1, ids[:, p:, None]).squeeze(-1)

    for it in range(iterations):
        clock.starts.append(time.perf_counter())
        qs = [q for q in questions[it * PROMPTS:(it + 1) * PROMPTS] for _ in range(G)]
        ids, mask = pad_rows([fmt.encode_prompt(q, 128) for q in qs], tok.pad_token_id, "left")
        p = ids.shape[1]
        with torch.no_grad():
            policy.eval()
            seqs = policy.generate(input_ids=ids, attention_mask=mask, do_sample=True, max_new_tokens=NEW,
                                   pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, top_k=0)
            resp = seqs[:, p:]
            ended = (resp == tok.eos_token_id).cumsum(1)
            rmask = ((ended == 0) | ((ended == 1) & (resp == tok.eos_token_id))).long()  # up to the first EOS
            full_mask = torch.cat([mask, rmask], 1)
            old, ref_lp = logps(policy, seqs, full_mask, p), logps(ref, seqs, full_mask, p)
            scores = rm(input_ids=seqs, attention_mask=full_mask, position_ids=position_ids(full_mask)).logits[:, 0]
        adv = group_advantages(scores.view(-1, G), "grpo", "group").flatten()
        policy.train()
        for idx in torch.arange(len(qs)).split(MINI):
            lp = logps(policy, seqs[idx], full_mask[idx], p)
            m = rmask[idx].float()
            loss, _ = policy_loss(lp, old[idx], adv[idx, None].expand_as(lp), m, 0.2)
            loss = loss + 0.04 * masked_mean(kl_per_token(lp, ref_lp[idx], "k3"), m)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        clock.tokens.append(int(rmask.sum()))
        clock.losses.append(float(loss.detach()))
        clock.ends.append(time.perf_counter())
    return clock, 0.0


GRPO_SIDES = {"ours": run_ours_grpo, "trl": run_trl_grpo, "bare": run_bare_grpo}


# ---------------------------------------------------------------------------------------------
# PPO: 64 prompts an iteration, 96 new tokens, 2 epochs x 2 minibatches of 32, a separate critic
# initialised from the reward model (what TRL 1.12's PPOTrainer does), fixed KL coefficient 0.1
# ---------------------------------------------------------------------------------------------
ROLLOUT = 64


def run_ours_ppo(iterations: int, work: Path, fmt) -> tuple[IterationClock, float]:
    """The ppo stage's own steps (stages/ppo.py) with ``critic: separate``, timed per iteration."""
    from cqa_rlhf.config import PPOConfig
    from cqa_rlhf.models import build_policy, reference_for
    from cqa_rlhf.online import load_inputs, rollout_engine, train
    from cqa_rlhf.ppo import PPOModule

    clock = IterationClock()
    cfg, shared = online_config("ppo", PPOConfig, iterations, work, critic="separate")
    cfg = cfg.model_copy(update={"kl": cfg.kl.model_copy(update={"adaptive": False})})
    inputs = load_inputs("ppo", cfg, shared.trainer_for(cfg.trainer), shared.prompt, shared.tokenizer.out)
    policy = build_policy(shared.model, inputs.tok, cfg.sft_dir, cfg.critic, cfg.reward_model)
    engine, norm = rollout_engine("ppo", cfg, inputs, shared.prompt, shared.model.dtype,
                                  reference_for(policy.lm, cfg.sft_dir, inputs.tok, shared.model.dtype))
    train(timed(PPOModule, clock, "objective/mean_length", None)(policy, engine, cfg, "bench", norm, None), inputs, 0)
    return clock, 0.0


def run_trl_ppo(iterations: int, work: Path, fmt) -> tuple[IterationClock, float]:
    """TRL 1.12's trl.experimental.ppo.PPOTrainer (removed from later TRL): on PYTHONPATH only here."""
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, TrainerCallback
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    assert trl.__version__ == "1.12.0", trl.__version__
    clock = IterationClock()

    class Steps(TrainerCallback):  # TRL's PPO loop calls on_step_end once per iteration
        def on_train_begin(self, args, state, control, **kwargs):
            clock.ends.append(time.perf_counter())  # a placeholder: where the first iteration starts

        def on_step_end(self, args, state, control, **kwargs):
            clock.starts.append(clock.ends[-1])
            clock.ends.append(time.perf_counter())

    fmt.tok.padding_side = "left"
    # rollout = per_device_train_batch_size x gradient_accumulation_steps = 64, minibatches of 32, micro-batches of 32
    rows = [{"input_ids": fmt.encode_prompt(q, 128)} for q in train_questions(ROLLOUT * iterations)]
    sft, rm = ROOT / "models" / "sft", ROOT / "models" / "reward" / "classification"
    args = PPOConfig(output_dir=str(work / "trl"), per_device_train_batch_size=MINI, gradient_accumulation_steps=2,
                     num_mini_batches=ROLLOUT // MINI, num_ppo_epochs=2, total_episodes=ROLLOUT * iterations,
                     local_rollout_forward_batch_size=MINI, response_length=NEW, stop_token="eos", temperature=1.0,
                     missing_eos_penalty=1.0, kl_coef=0.1, cliprange=0.2, vf_coef=0.1, cliprange_value=0.2,
                     gamma=1.0, lam=0.95, learning_rate=1e-4, lr_scheduler_type="linear", warmup_steps=0,
                     adam_beta1=0.9, adam_beta2=0.95, weight_decay=0.0, max_grad_norm=1.0, num_sample_generations=0,
                     save_strategy="no", report_to="none", use_cpu=True, bf16=False, fp16=False, seed=0,
                     logging_steps=1, disable_tqdm=True)
    trainer = PPOTrainer(args=args, processing_class=fmt.tok, model=AutoModelForCausalLM.from_pretrained(sft),
                         ref_model=AutoModelForCausalLM.from_pretrained(sft),
                         reward_model=AutoModelForSequenceClassification.from_pretrained(rm),
                         value_model=AutoModelForSequenceClassification.from_pretrained(rm),
                         train_dataset=Dataset.from_list(rows), callbacks=[Steps()])
    trainer.train()
    clock.ends.pop(0)
    clock.tokens = [0] * len(clock.ends)
    return clock, 0.0


def run_bare_ppo(iterations: int, work: Path, fmt) -> tuple[IterationClock, float]:
    """Generate; the policy's log-probs, the critic's values, the reference's log-probs and the
    reward model's score; KL-shaped rewards, GAE, whitening; 2 epochs x 2 minibatches of clipped
    policy and value losses: no framework."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from cqa_rlhf.batches import pad_rows, position_ids
    from cqa_rlhf.ppo_math import gae, kl_per_token, masked_whiten, policy_loss, token_rewards, value_loss

    tok, clock = fmt.tok, IterationClock()
    sft, rm_dir = ROOT / "models" / "sft", ROOT / "models" / "reward" / "classification"
    policy, ref = AutoModelForCausalLM.from_pretrained(sft), AutoModelForCausalLM.from_pretrained(sft)
    critic, rm = (AutoModelForSequenceClassification.from_pretrained(rm_dir) for _ in range(2))
    opt = torch.optim.AdamW([*policy.parameters(), *critic.parameters()], lr=1e-4, betas=(0.9, 0.95), weight_decay=0.0)
    questions = train_questions(ROLLOUT * iterations)

    def logps(model, ids, mask, p):  # [B, R]
        logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask)).logits[:, p - 1:-1]
        return torch.log_softmax(logits.float(), -1).gather(-1, ids[:, p:, None]).squeeze(-1)

    def values(ids, mask, p):  # [B, R]: the critic's score head on every position
        hidden = getattr(critic, critic.base_model_prefix)(input_ids=ids, attention_mask=mask,
                                                           position_ids=position_ids(mask)).last_hidden_state
        return critic.score(hidden[:, p - 1:-1]).squeeze(-1)

    for it in range(iterations):
        clock.starts.append(time.perf_counter())
        qs = questions[it * ROLLOUT:(it + 1) * ROLLOUT]
        ids, mask = pad_rows([fmt.encode_prompt(q, 128) for q in qs], tok.pad_token_id, "left")
        p = ids.shape[1]
        with torch.no_grad():
            policy.eval()
            seqs = policy.generate(input_ids=ids, attention_mask=mask, do_sample=True, max_new_tokens=NEW,
                                   pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, top_k=0)
            resp = seqs[:, p:]
            ended = (resp == tok.eos_token_id).cumsum(1)
            rmask = ((ended == 0) | ((ended == 1) & (resp == tok.eos_token_id))).long()
            full = torch.cat([mask, rmask], 1)
            old, ref_lp, old_v = logps(policy, seqs, full, p), logps(ref, seqs, full, p), values(seqs, full, p)
            scores = rm(input_ids=seqs, attention_mask=full, position_ids=position_ids(full)).logits[:, 0]
            scores = scores - 1.0 * (ended[:, -1] == 0).float()  # missing EOS penalty
            m = rmask.float()
            kl = kl_per_token(old, ref_lp, "k1") * m
            adv, returns = gae(token_rewards(scores, kl, m, 0.1), old_v, m, 1.0, 0.95)
            adv = masked_whiten(adv, m)
        policy.train()
        for _ in range(2):
            for idx in torch.randperm(ROLLOUT).split(MINI):
                lp, v = logps(policy, seqs[idx], full[idx], p), values(seqs[idx], full[idx], p)
                pl, _ = policy_loss(lp, old[idx], adv[idx], m[idx], 0.2)
                vl, _ = value_loss(v, old_v[idx], returns[idx], m[idx], 0.2)
                (pl + 0.1 * vl).backward()
                torch.nn.utils.clip_grad_norm_([*policy.parameters(), *critic.parameters()], 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)
        clock.tokens.append(int(rmask.sum()))
        clock.ends.append(time.perf_counter())
    return clock, 0.0


PPO_SIDES = {"ours": run_ours_ppo, "trl": run_trl_ppo, "bare": run_bare_ppo}


# ---------------------------------------------------------------------------------------------
# One run per process; the parent interleaves them and writes the table
# ---------------------------------------------------------------------------------------------
def child(args: argparse.Namespace) -> None:
    fmt, params = formatter()
    work = Path(args.work)
    if args.stage in ("grpo", "ppo"):
        run_dir = Path(tempfile.mkdtemp(dir=work))
        before, start = matmul_gflops(), time.perf_counter()
        sides = GRPO_SIDES if args.stage == "grpo" else PPO_SIDES
        clock, prep = sides[args.side](args.iterations, run_dir, fmt)
        wall = time.perf_counter() - start
        print("RESULT " + json.dumps({**clock.result(1), "prep_s": prep, "wall_s": wall,
                                      "gflops_before": before, "gflops_after": matmul_gflops()}))
        return
    items = stage_items(args.stage, fmt)
    model_dir = initial_model(args.config, KIND[args.stage] if args.stage != "reward" else "reward", work, fmt, params)
    run_dir = Path(tempfile.mkdtemp(dir=work))
    before = matmul_gflops()
    start = time.perf_counter()
    clock, prep = SIDES[args.side](args.stage, model_dir, items, args.steps, run_dir, fmt)
    wall = time.perf_counter() - start
    print("RESULT " + json.dumps({**clock.result(args.warmup), "prep_s": prep, "wall_s": wall,
                                  "gflops_before": before, "gflops_after": matmul_gflops()}))


def launch(side: str, stage: str, config: str, args: argparse.Namespace, work: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", "--side", side, "--stage", stage, "--config", config,
           "--steps", str(args.steps), "--iterations", str(args.iterations), "--warmup", str(args.warmup), "--work", str(work)]
    env = dict(os.environ)
    if side == "trl" and stage == "ppo":  # TRL 1.12, the last with PPOTrainer, for this run only
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(work / "trl112"), env.get("PYTHONPATH")]))
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if proc.returncode or line is None:
        sys.exit(f"{side} {stage} {config} failed:\n{proc.stderr[-3000:]}")
    return json.loads(line[len("RESULT "):])


def loss_gap(a: list[float], b: list[float]) -> float:
    """Largest relative difference of two per-step loss curves."""
    return max(abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, b))


def summarise(runs: dict) -> list[dict]:
    rows = []
    for (stage, config), by_side in runs.items():
        med = {s: statistics.median(r["median_step_s"] for r in rs) for s, rs in by_side.items()}
        online = stage in ("grpo", "ppo")
        rate = "samples_per_s" if online else "tokens_per_s"  # online: answers differ in length by side
        tps = {s: statistics.median(r[rate] for r in rs) for s, rs in by_side.items()}
        first = {s: rs[0]["losses"] for s, rs in by_side.items()}
        rows.append({"stage": stage, "config": config, "rate": rate, "step_s": med, "rates": tps,
                     "tokens_per_s": {s: statistics.median(r["tokens_per_s"] for r in rs) for s, rs in by_side.items()},
                     "vs_trl": tps["ours"] / tps["trl"], "step_vs_trl": med["trl"] / med["ours"],
                     "of_bare": tps["ours"] / tps["bare"], "trl_of_bare": tps["trl"] / tps["bare"],
                     "prep_s": {s: statistics.median(r["prep_s"] for r in rs) for s, rs in by_side.items()},
                     "loss_gap_trl": None if online else loss_gap(first["ours"], first["trl"]),
                     "loss_gap_bare": None if online else loss_gap(first["ours"], first["bare"]),
                     "final_loss": {s: l[-1] for s, l in first.items() if l},
                     "gflops": [min(r["gflops_before"], r["gflops_after"]) for rs in by_side.values() for r in rs]})
    return rows


def table(rows: list[dict]) -> str:
    out = ["| stage | config | rate | ours | TRL | bare | ours ÷ TRL (step-time ratio) | ours ÷ bare "
           "| TRL ÷ bare | loss rel. gap vs TRL / bare |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        t, gap = r["rates"], ("—" if r["loss_gap_trl"] is None
                              else f"{r['loss_gap_trl']:.1e} / {r['loss_gap_bare']:.1e}")
        digits = 1 if r["rate"] == "samples_per_s" else 0
        out.append(f"| {r['stage']} | {r['config']} | {r['rate'].replace('_per_s', '/s')} | {t['ours']:.{digits}f} | "
                   f"{t['trl']:.{digits}f} | {t['bare']:.{digits}f} | {r['vs_trl']:.2f}× ({r['step_vs_trl']:.2f}×) | "
                   f"{r['of_bare']:.0%} | {r['trl_of_bare']:.0%} | {gap} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stages", default="sft,reward,dpo,grpo,ppo")
    ap.add_argument("--configs", default="default,d256")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--iterations", type=int, default=6, help="grpo and ppo iterations (the first is not timed)")
    ap.add_argument("--warmup", type=int, default=3, help="steps not timed at the start")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "bench" / "vs_trl.json"))
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)
    ap.add_argument("--stage", help=argparse.SUPPRESS)
    ap.add_argument("--config", help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    runs: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        if "ppo" in args.stages.split(","):
            subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(Path(tmp) / "trl112"),
                            "trl==1.12.0"], check=True)
        for repeat in range(args.repeats):
            for stage in args.stages.split(","):
                online = stage in ("grpo", "ppo")  # the pipeline's own models: one config
                for config in args.configs.split(",")[: 1 if online else None]:
                    for side in SIDES:
                        r = launch(side, stage, config, args, Path(tmp))
                        runs.setdefault((stage, config), {}).setdefault(side, []).append(r)
                        raw = [{"stage": k[0], "config": k[1], "side": sd, "runs": rs} for k, v in runs.items() for sd, rs in v.items()]
                        Path(args.out).with_suffix(".runs.json").write_text(json.dumps(raw) + "\n")  # kept if a later run fails
                        print(f"repeat {repeat} {stage} {config} {side}: {r['median_step_s']:.3f} s/step, "
                              f"{r['tokens_per_s']:.0f} tok/s, matmul {r['gflops_before']:.0f}/{r['gflops_after']:.0f} "
                              "GFLOP/s", flush=True)
    rows = summarise(runs)
    import trl
    machine = {"cpu": cpu_model(), "cores": os.cpu_count(), "machine": platform.machine(), "torch": torch.__version__,
               "trl": trl.__version__, "threads": torch.get_num_threads(), "numerics": cqa_rlhf.numerics.state(),
               "date": time.strftime("%Y-%m-%d"), "steps": args.steps, "repeats": args.repeats}
    Path(args.out).write_text(json.dumps({"machine": machine, "rows": rows}, indent=1) + "\n")
    print(json.dumps(machine))
    print(table(rows))


if __name__ == "__main__":
    main()
