"""Benchmark LoRA against full fine-tuning on GPT-Neo-125M's shape: step time and peak memory.

Each variant runs in its own process (peak RSS is per process): GPT-Neo-125M's config with random
weights (vocab 50257, 12 blocks, d 768), built by the project's factory (`build_model`, with
`lora=True` for the adapters), one batch of 8 x 256 tokens, AdamW over the trainable parameters;
one warm-up step, then the median of `--steps` timed steps (forward + backward + optimizer step).
Variants: full fine-tuning; LoRA r=16 on every linear layer of every block; LoRA r=16 on the last
4 blocks only (the gradient then stops at block 8: the backward pass skips the blocks below).

Usage: python bench/bench_lora.py [--steps 3] [--variant NAME] [--device cuda]
(no --variant: all, one process each; on cuda in bf16 autocast, peak = torch.cuda.max_memory_allocated)
CQA_NUMERICS (pinned by default, or free) applies as in the stages: the package is imported first.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import cqa_rlhf  # noqa: F401  first: it pins the numeric code paths before torch loads (CQA_NUMERICS)
import torch
from machine import cpu_model

VARIANTS = {"full": None, "lora-all": [], "lora-last4": [-4, -3, -2, -1]}
NEO_125M = {"hidden_size": 768, "num_layers": 12, "num_heads": 12, "intermediate_size": 3072,
            "max_position_embeddings": 2048, "attention_types": [[["global", "local"], 6]], "window_size": 256}


def run_variant(name: str, steps: int, device: str = "cpu") -> dict:
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models

    from cqa_rlhf.config import LoraConfig, ModelConfig
    from cqa_rlhf.models import build_model

    vocab = {f"t{i}": i for i in range(50257)}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t2")),
                                  eos_token="t0", pad_token="t1")
    layers = VARIANTS[name]
    cfg = ModelConfig(config=NEO_125M, lora=LoraConfig(r=16, alpha=32.0, dropout=0.0, layers=layers or []))
    torch.manual_seed(0)
    model = build_model(cfg, tok, "causal", lora=layers is not None).train().to(device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-4)
    ids = torch.randint(3, 50257, (8, 256), device=device)
    times = []
    for step in range(steps + 1):
        start = time.perf_counter()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        if step:
            times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"variant": name, "trainable_params": sum(p.numel() for p in trainable),
            "total_params": sum(p.numel() for p in model.parameters()),
            "step_s_median": round(statistics.median(times), 2), "step_s": [round(t, 2) for t in times],
            "device": device, "peak_mb": round(peak)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--variant", choices=sorted(VARIANTS))
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = ap.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args.variant, args.steps, args.device)))
        return
    cpu = cpu_model()
    print(f"# {time.strftime('%Y-%m-%d')} {cpu}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"numerics {cqa_rlhf.numerics.state()['mode']}")
    for name in VARIANTS:
        out = subprocess.run([sys.executable, __file__, "--variant", name, "--steps", str(args.steps),
                              "--device", args.device],
                             capture_output=True, text=True, check=True).stdout
        print(out.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
