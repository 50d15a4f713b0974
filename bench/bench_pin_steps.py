"""Step times of the default model shape, for the numeric pin's cost at the level of one step:
an SFT training step (forward, backward, AdamW; batch 16 x 200 tokens) and PPO-style sampling
(60 new tokens for 8 prompts, one token at a time). Median of 10 steps after 2 warm-up steps.

Run it once per setting, on a quiet machine:

    CQA_NUMERICS=free python bench/bench_pin_steps.py
    CQA_NUMERICS=pinned python bench/bench_pin_steps.py
"""

from __future__ import annotations

import statistics
import time

import cqa_rlhf  # noqa: F401  first: it pins the numeric code paths before torch loads (CQA_NUMERICS)
import torch
from transformers import GPTNeoConfig, GPTNeoForCausalLM

from cqa_rlhf import numerics


def main() -> None:
    torch.manual_seed(0)
    cfg = GPTNeoConfig(vocab_size=2048, hidden_size=128, num_layers=4, num_heads=4, intermediate_size=512,
                       max_position_embeddings=256, attention_types=[[["global", "local"], 2]], window_size=128)
    model = GPTNeoForCausalLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), 1e-3)
    x = torch.randint(0, 2048, (16, 200))
    steps = []
    for _ in range(12):
        t = time.perf_counter()
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
        steps.append(time.perf_counter() - t)
    model.eval()
    with torch.no_grad():
        t = time.perf_counter()
        ids = x[:8, :20]
        for _ in range(60):
            ids = torch.cat([ids, model(input_ids=ids).logits[:, -1:].argmax(-1)], 1)
        sample = time.perf_counter() - t
    print(f"{numerics.state()}: SFT step {statistics.median(steps[2:]) * 1000:.0f} ms, "
          f"sampling 60 tokens x 8 prompts {sample * 1000:.0f} ms")


if __name__ == "__main__":
    main()
