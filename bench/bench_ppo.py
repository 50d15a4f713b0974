"""Benchmark PPO iterations: time in generation, scoring (policy/reference log-probs + reward
model) and learning, generated tokens per second and samples per second overall.

Runs the real PPOModule under a real Lightning Trainer (build_trainer) with the `ppo` params of
params.yaml, for two model shapes:
- default: the pipeline's own models (models/sft, models/reward/classification; run `dvc repro`
  first), so response lengths are those of the trained policy;
- GPT-Neo-125M's shape with random weights (vocab 50257; the policy, reference and reward model
  all that size). A random policy rarely emits EOS, so every answer runs to max_new_tokens: the
  worst case for generation.
Phases are timed by wrapping the rollout engine's sampling, PPOModule.rollout and .minibatch_updates; "other" is the rest of the
iteration (advantages, logging, Lightning). The first iteration is a warm-up and is not counted.

Usage: python bench/bench_ppo.py [--iterations 4] [--big-iterations 3] [--big-rollout 16]
       [--accelerator gpu --precision bf16-mixed]   (peak GPU memory is reported on CUDA)
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import cqa_rlhf  # noqa: F401  first: it pins the numeric code paths before torch loads (CQA_NUMERICS)
import lightning as L
import torch
import yaml

from cqa_rlhf.batches import LengthGroupedBatchSampler, ListDataset, PromptCollator, ResumableDataLoader
from cqa_rlhf.config import ModelConfig, PPOConfig, PromptConfig, TrainerConfig
from cqa_rlhf.data.tables import read_table
from cqa_rlhf.models import CausalLMWithValueHead, build_model, build_policy, disable_dropout, load_frozen
from cqa_rlhf.ppo import PPOModule
from cqa_rlhf.prompts import PromptFormatter
from cqa_rlhf.reward import normalization
from cqa_rlhf.rollout import RolloutEngine
from cqa_rlhf.tokenizer import load_tokenizer
from cqa_rlhf.training import build_trainer

ROOT = Path(__file__).resolve().parents[1]
NEO_125M = {"hidden_size": 768, "num_layers": 12, "num_heads": 12, "intermediate_size": 3072,
            "max_position_embeddings": 2048, "attention_types": [[["global", "local"], 6]], "window_size": 256,
            "vocab_size": 50257}


class TimedEngine(RolloutEngine):
    """The rollout engine with its sampling timed (a benchmark wrapper)."""

    row: dict

    def sample(self, lm, questions, seed):
        t0 = time.perf_counter()
        gens, seq = super().sample(lm, questions, seed)
        self.row["generation"] = self.row.get("generation", 0.0) + time.perf_counter() - t0
        self.row["generated_tokens"] = int(seq.mask.sum())
        self.row["samples"] = len(questions)
        return gens, seq


class TimedPPO(PPOModule):
    """PPOModule with each phase timed (a benchmark wrapper; the maths is PPOModule's):
    generation, scoring (the rest of the rollout: log-probs, reference, reward model), learning."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.rows: list[dict] = []

    def _timed(self, key: str, fn, *args):
        t0 = time.perf_counter()
        out = fn(*args)
        self._row[key] = self._row.get(key, 0.0) + time.perf_counter() - t0
        return out

    def rollout(self, questions, seed, with_values=True):
        out = self._timed("rollout", super().rollout, questions, seed, with_values)
        self._row["scoring"] = self._row["rollout"] - self._row["generation"]
        return out

    def minibatch_updates(self, n, mask, backward, it):
        return self._timed("learning", super().minibatch_updates, n, mask, backward, it)

    def on_train_batch_start(self, batch, batch_idx):
        self._row = self.engine.row = {"start": time.perf_counter()}

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self._row["total"] = time.perf_counter() - self._row.pop("start")
        self.rows.append(self._row)


def run(name: str, cfg: PPOConfig, policy, ref, rm, tok, norm, iterations: int, trainer_cfg: TrainerConfig) -> dict:
    fmt = PromptFormatter(PromptConfig(), tok)
    rows = read_table(ROOT / "data/prepared/train/prompts").to_pylist()
    cfg = cfg.model_copy(update={"iterations": iterations, "eval_every": 10 ** 6})
    L.seed_everything(0, verbose=False)
    engine = TimedEngine(fmt, cfg.sample, cfg.max_prompt_length, cfg.max_length, cfg.micro_batch_size, ref, rm)
    module = TimedPPO(policy, engine, cfg, "bench", norm)
    with tempfile.TemporaryDirectory() as tmp:
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        trainer = build_trainer(trainer_cfg, module.loop(), Path(tmp) / "ckpt")
        lengths = [len(fmt.encode_prompt(r["question"], cfg.max_prompt_length)) for r in rows]
        sampler = LengthGroupedBatchSampler(lengths, cfg.rollout_batch_size, 0, drop_last=True)
        train = ResumableDataLoader(ListDataset(rows), sampler, PromptCollator(), module.completed_in_epoch)
        trainer.fit(module, train)
    timed = module.rows[1:]  # the first iteration warms up
    mean = {k: statistics.fmean(r[k] for r in timed) for k in ("generation", "scoring", "learning", "total",
                                                               "generated_tokens", "samples")}
    mean["other"] = mean["total"] - mean["generation"] - mean["scoring"] - mean["learning"]
    params = sum(p.numel() for p in policy.parameters())
    print(f"\n{name}: {params / 1e6:.1f}M trainable params, rollout {cfg.rollout_batch_size}, "
          f"{cfg.ppo_epochs} epochs x {cfg.rollout_batch_size // cfg.mini_batch_size} minibatches, "
          f"max_new_tokens {cfg.sample.max_new_tokens}, {len(timed)} timed iterations")
    print("| phase | s / iteration | share |\n|---|---|---|")
    for k in ("generation", "scoring", "learning", "other", "total"):
        print(f"| {k} | {mean[k]:.2f} | {100 * mean[k] / mean['total']:.0f}% |")
    print(f"generated tokens/s (generation phase): {mean['generated_tokens'] / mean['generation']:.0f}; "
          f"mean answer {mean['generated_tokens'] / mean['samples']:.1f} tokens; "
          f"samples/s overall: {mean['samples'] / mean['total']:.2f}")
    if torch.cuda.is_available():
        print(f"peak GPU memory: {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
    return mean


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--iterations", type=int, default=4)
    ap.add_argument("--big-iterations", type=int, default=3)
    ap.add_argument("--big-rollout", type=int, default=16, help="rollout batch of the 125M shape (CPU time)")
    ap.add_argument("--skip-big", action="store_true")
    ap.add_argument("--accelerator", default="cpu", help="cpu | gpu")
    ap.add_argument("--precision", default="32-true", help="a Lightning precision, e.g. bf16-mixed")
    args = ap.parse_args()
    trainer_cfg = TrainerConfig(accelerator=args.accelerator, precision=args.precision,
                                deterministic=args.accelerator == "cpu")
    print(f"{time.strftime('%Y-%m-%d')}, {platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, {'CUDA ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU'}, "
          f"{args.accelerator} {args.precision}")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    cfg = PPOConfig.model_validate(params["ppo"])
    tok = load_tokenizer(ROOT / params["tokenizer"]["out"])

    rm = load_frozen(ROOT / cfg.reward_model, tok, "reward")
    policy = build_policy(ModelConfig(), tok, ROOT / cfg.sft_dir, cfg.critic, ROOT / cfg.reward_model)
    run("default", cfg, policy, load_frozen(ROOT / cfg.sft_dir, tok, "causal"), rm, tok, normalization(rm),
        args.iterations, trainer_cfg)

    if not args.skip_big:
        big = ModelConfig(config={k: v for k, v in NEO_125M.items() if k != "vocab_size"})
        torch.manual_seed(0)

        def fresh(kind):
            m = build_model(big, tok, kind)
            m.resize_token_embeddings(NEO_125M["vocab_size"])
            return disable_dropout(m)

        ref = fresh("causal").eval().requires_grad_(False)
        rm_big = fresh("reward").eval().requires_grad_(False)
        pol = CausalLMWithValueHead(fresh("causal"))
        b = args.big_rollout
        cfg_big = cfg.model_copy(update={"rollout_batch_size": b, "mini_batch_size": b, "micro_batch_size": min(b, 8)})
        run("GPT-Neo-125M shape", cfg_big, pol, ref, rm_big, tok, (0.0, 1.0), args.big_iterations, trainer_cfg)


if __name__ == "__main__":
    main()
