"""Benchmark SFT training on the shared harness: throughput, padding, FLOP/s, step-time split.

Runs a real Lightning fit (SFTModule + build_trainer + the resumable length-grouped loader) on
the embedded default data, for the default model config and for GPT-Neo-125M's shape (random
weights, vocab 50257). A callback times every step: forward (training_step), backward, optimizer
step, and the rest (data loading, logging, Lightning). FLOPs per token are the usual estimate
6·N (N: parameters in matmuls, the tied LM head once) + 12·layers·d·T for attention; "achieved"
counts all processed tokens (pad included: they cost compute), "useful" only non-pad tokens.
The machine's dense matmul FLOP/s is measured in the same run.

Usage: python bench/bench_sft.py [--steps 60] [--big-steps 6 | --skip-big] [--accelerator gpu --precision bf16-mixed]
CQA_NUMERICS (pinned by default, or free) applies as in the stages: the package is imported first.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import cqa_rlhf  # noqa: F401  first: it pins the numeric code paths before torch loads (CQA_NUMERICS)
import lightning as L
import torch
import yaml

from cqa_rlhf.batches import CausalLMCollator, LengthGroupedBatchSampler, ListDataset, ResumableDataLoader
from cqa_rlhf.config import DataConfig, ModelConfig, PromptConfig, SFTConfig, SynthConfig, TokenizerConfig, TrainerConfig
from cqa_rlhf.data.prepare import prepare
from cqa_rlhf.data.synthetic import write_dump
from cqa_rlhf.data.tables import read_table
from cqa_rlhf.models import build_model
from cqa_rlhf.prompts import PromptFormatter
from cqa_rlhf.sft import SFTModule, encode_sft, eval_loader
from cqa_rlhf.stages.tokenizer import training_texts
from cqa_rlhf.tokenizer import train_bpe
from cqa_rlhf.training import build_trainer

ROOT = Path(__file__).resolve().parents[1]
NEO_125M = {"hidden_size": 768, "num_layers": 12, "num_heads": 12, "intermediate_size": 3072,
            "max_position_embeddings": 2048, "attention_types": [[["global", "local"], 6]], "window_size": 256,
            "vocab_size": 50257}


class StepTimer(L.Callback):
    def __init__(self) -> None:
        self.rows: list[dict] = []
        self._t: dict[str, float] = {}

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        now = time.perf_counter()
        if "start" in self._t:
            self._close(now)
        mask = batch["attention_mask"]
        self._t = {"start": now, "tokens": mask.numel(), "real": int(mask.sum()), "T": mask.shape[1]}

    def on_before_backward(self, trainer, module, loss):
        self._t["fwd_end"] = time.perf_counter()

    def on_after_backward(self, trainer, module):
        self._t["bwd_end"] = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self._t["opt_end"] = time.perf_counter()

    def on_train_end(self, trainer, module):
        pass  # the last step has no following start: it is not counted

    def _close(self, now: float) -> None:
        t = self._t
        self.rows.append({"step": now - t["start"], "fwd": t["fwd_end"] - t["start"],
                          "bwd": t["bwd_end"] - t["fwd_end"], "opt": t["opt_end"] - t["bwd_end"],
                          "tokens": t["tokens"], "real": t["real"], "T": t["T"]})


def matmul_flops(device: str = "cpu") -> float:
    """Dense float32 2048^3 matmul rate on ``device`` (the roofline the table compares with)."""
    a, b = torch.randn(2048, 2048, device=device), torch.randn(2048, 2048, device=device)
    for _ in range(3):
        a @ b
    _sync(device)
    start = time.perf_counter()
    for _ in range(10):
        a @ b
    _sync(device)
    return 2 * 2048**3 * 10 / (time.perf_counter() - start)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def flops_per_token(model, T: float) -> float:
    cfg = model.config
    n = sum(p.numel() for name, p in model.named_parameters() if "wpe" not in name and p.ndim >= 2)
    return 6 * n + 12 * cfg.num_layers * cfg.hidden_size * T


def run(name: str, model_config: dict, work: Path, tok, fmt, steps: int, batch_size: int, max_length: int,
        trainer_cfg: TrainerConfig) -> dict:
    L.seed_everything(0, verbose=False)
    cfg = SFTConfig(max_steps=steps, batch_size=batch_size, max_length=max_length, val_check_interval=10**6,
                    limit_val_batches=0, live_dir=str(work / f"live-{name}"), checkpoint_dir=str(work / f"ckpt-{name}"))
    items = encode_sft(read_table(work / "prepared" / "train" / "sft").to_pylist(), fmt, max_length)
    model = build_model(ModelConfig(config=model_config), tok, "causal")
    module = SFTModule(model, cfg, "bench")
    timer = StepTimer()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    trainer = build_trainer(trainer_cfg, cfg.loop(), cfg.checkpoint_dir, callbacks=[timer])
    loader = ResumableDataLoader(ListDataset(items), LengthGroupedBatchSampler(
        [len(x["input_ids"]) for x in items], batch_size, 0), CausalLMCollator(tok.pad_token_id), module.completed_in_epoch)
    val = eval_loader(items[:8], 8, tok.pad_token_id)
    trainer.fit(module, loader, val)
    rows = timer.rows[2:]  # skip warm-up steps
    step = sum(r["step"] for r in rows)
    fwd, bwd, opt = (sum(r[k] for r in rows) for k in ("fwd", "bwd", "opt"))
    tokens, real = sum(r["tokens"] for r in rows), sum(r["real"] for r in rows)
    mean_T = statistics.mean(r["T"] for r in rows)
    fpt = flops_per_token(model, mean_T / 2)  # causal attention: on average half the context
    lengths = [len(x["input_ids"]) for x in items]
    epoch = LengthGroupedBatchSampler(lengths, batch_size, 0)
    padded = sum(len(b) * max(lengths[i] for i in b) for b in epoch)
    return {"name": name, "epoch_pad_frac": 1 - sum(lengths) / padded, "params_M": sum(p.numel() for p in model.parameters()) / 1e6, "steps": len(rows),
            "step_s": step / len(rows), "real_tok_s": real / step, "pad_frac": 1 - real / tokens,
            "fwd": fwd / step, "bwd": bwd / step, "opt": opt / step, "other": 1 - (fwd + bwd + opt) / step,
            "achieved": fpt * tokens / step, "useful": fpt * real / step,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--big-steps", type=int, default=6)
    ap.add_argument("--skip-big", action="store_true", help="only the default config")
    ap.add_argument("--accelerator", default="cpu", help="cpu | gpu (then the matmul roofline is the GPU's)")
    ap.add_argument("--precision", default="32-true", help="a Lightning precision, e.g. bf16-mixed")
    args = ap.parse_args()
    trainer_cfg = TrainerConfig(accelerator=args.accelerator, precision=args.precision,
                                deterministic=args.accelerator == "cpu")
    device = "cuda" if args.accelerator in ("gpu", "cuda") else "cpu"
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        write_dump(SynthConfig(out=str(work / "raw")))
        prepare(DataConfig(source=str(work / "raw"), out=str(work / "prepared")))
        tok = train_bpe(training_texts(work / "prepared"), TokenizerConfig(**params["tokenizer"]), 2048)
        fmt = PromptFormatter(PromptConfig(**params["prompt"]), tok)
        peak = matmul_flops(device)
        sft = params["sft"]
        results = [run("default", params["model"]["config"], work, tok, fmt, args.steps, sft["batch_size"],
                       sft["max_length"], trainer_cfg)]
        if not args.skip_big:
            results.append(run("gpt-neo-125M shape", NEO_125M, work, tok, fmt, args.big_steps + 2, sft["batch_size"],
                               sft["max_length"], trainer_cfg))
        peak2 = matmul_flops(device)
    card = f", {torch.cuda.get_device_name()}" if device == "cuda" else ""
    print(f"\nmachine: {os.cpu_count()} cores, {platform.machine()}{card}, {args.precision}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; dense fp32 matmul 2048³ on {device}: {peak / 1e9:.0f} GFLOP/s "
          f"(again after: {peak2 / 1e9:.0f})")
    print("| config | params (M) | steps timed | s/step | non-pad tok/s | pad frac (timed / epoch) | fwd | bwd | optim "
          "| other | achieved GFLOP/s (% of matmul) | useful GFLOP/s | peak GPU memory (GiB) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['name']} | {r['params_M']:.1f} | {r['steps']} | {r['step_s']:.3f} | {r['real_tok_s']:.0f} | "
              f"{r['pad_frac']:.3f} / {r['epoch_pad_frac']:.3f} | {r['fwd']:.0%} | {r['bwd']:.0%} | {r['opt']:.0%} | {r['other']:.0%} | "
              f"{r['achieved'] / 1e9:.1f} ({r['achieved'] / peak:.0%}) | {r['useful'] / 1e9:.1f} | {r['peak_gib']:.2f} |")


if __name__ == "__main__":
    sys.exit(main())
