"""Sampling answers: transformers' ``generate`` against the project's decoding loop, whose batch
shrinks as answers end (cqa_rlhf.generation.decode), on the pipeline's SFT policy.

Both draw the same tokens (checked here on every repeat, and in tests/test_generation.py): under
a torch seed (``generate``'s multinomial sampling) and with per-answer seeds (Gumbel-max, as GRPO
samples; ``generate`` then runs greedy decoding over a logits processor adding the same noise).
Interleaved repeats; the median wall time of each.

Usage: python bench/bench_decode.py [--prompts 64] [--new-tokens 96] [--repeats 5]   (after `dvc repro sft`)
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import cqa_rlhf  # noqa: F401  first: it pins the numeric code paths before torch loads
import torch
import yaml
from transformers import AutoModelForCausalLM, LogitsProcessor, LogitsProcessorList

from cqa_rlhf.batches import pad_rows
from cqa_rlhf.config import PromptConfig, SampleConfig
from cqa_rlhf.data.tables import read_table
from cqa_rlhf.generation import decode, row_seed, step_noise
from cqa_rlhf.prompts import PromptFormatter
from cqa_rlhf.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]


class Gumbel(LogitsProcessor):
    def __init__(self, seeds: list[int]) -> None:
        self.seeds, self.step = seeds, 0

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.step += 1
        return scores.float() + step_noise(self.seeds, self.step - 1, scores.shape[-1])


def with_generate(model, ids, mask, sample: SampleConfig, tok, seeds: list[int] | None) -> list[list[int]]:
    how = (dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0) if seeds is None else
           dict(do_sample=False, num_beams=1, temperature=None, top_k=None, top_p=None,
                logits_processor=LogitsProcessorList([Gumbel(seeds)])))
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=sample.max_new_tokens,
                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, **how)
    rows = out[:, ids.shape[1]:].tolist()
    return [r[: r.index(tok.eos_token_id) + 1] if tok.eos_token_id in r else r for r in rows]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=96)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    tok = load_tokenizer(ROOT / params["tokenizer"]["out"])
    fmt = PromptFormatter(PromptConfig(**params["prompt"]), tok)
    model = AutoModelForCausalLM.from_pretrained(ROOT / params["sft"]["out"]).eval()
    qs = [r["question"] for r in read_table(ROOT / "data/prepared/train/prompts").to_pylist()[: args.prompts]]
    ids, mask = pad_rows([fmt.encode_prompt(q, 128) for q in qs], tok.pad_token_id, "left")
    sample = SampleConfig(max_new_tokens=args.new_tokens)
    times: dict[tuple[str, str], list[float]] = {}
    for repeat in range(args.repeats):
        for mode in ("torch seed", "per-answer seeds"):
            seeds = None if mode == "torch seed" else [row_seed(repeat, q, 0) for q in qs]
            answers = {}
            for side, fn in (("generate", lambda: with_generate(model, ids, mask, sample, tok, seeds)),
                             ("decode", lambda: decode(model, ids, mask, sample, tok.eos_token_id, seeds))):
                torch.manual_seed(repeat)
                start = time.perf_counter()
                with torch.no_grad():
                    answers[side] = fn()
                times.setdefault((mode, side), []).append(time.perf_counter() - start)
            assert answers["generate"] == answers["decode"], f"{mode}: the two samplers drew different tokens"
            tokens = sum(map(len, answers["decode"]))
            print(f"repeat {repeat} {mode}: generate {times[(mode, 'generate')][-1]:.3f} s, decode "
                  f"{times[(mode, 'decode')][-1]:.3f} s, {tokens} answer tokens (same tokens)", flush=True)
    print(f"\n{args.prompts} prompts, at most {args.new_tokens} new tokens, {args.repeats} interleaved repeats, "
          f"{cqa_rlhf.numerics.state()}")
    print("| sampling | generate (s, median) | decode (s, median) | speed-up |\n|---|---|---|---|")
    for mode in ("torch seed", "per-answer seeds"):
        a, b = statistics.median(times[(mode, "generate")]), statistics.median(times[(mode, "decode")])
        print(f"| {mode} | {a:.3f} | {b:.3f} | {a / b:.2f}× |")


if __name__ == "__main__":
    main()
