"""The lean decoding loop (rows leave the batch as they end) draws exactly the tokens that
transformers' ``generate`` draws: under a torch seed (multinomial sampling, generate's own), and
with per-answer seeds (the same Gumbel-max sampler as a logits processor in generate), for every
model family, while rows end at different steps."""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Sequence

import pytest
import torch
from transformers import AutoModelForCausalLM, LogitsProcessor, LogitsProcessorList

from cqa_rlhf.batches import pad_rows
from cqa_rlhf.config import ModelConfig, PromptConfig, SampleConfig
from cqa_rlhf.generation import NOISE_CHUNK, decode, generate, gumbel_noise, row_seed, step_noise
from cqa_rlhf.models import build_model
from cqa_rlhf.prompts import PromptFormatter
from cqa_rlhf.tokenizer import load_tokenizer

from helpers import TINY_MODEL
from test_models import family_config

QUESTIONS = ["How do I sort a git branch?", "Why is the sky blue?", "What is a monad?", "Is tea better than coffee?",
             "How do I undo a commit?", "Why do cats purr?", "What is a closure in Python and why use one?",
             "How big is the sun?"]


@pytest.fixture(scope="module")
def prepared(prepared_session):
    return prepared_session


class GumbelProcessor(LogitsProcessor):
    """The reference: the same noise (seed, step) added inside ``generate`` under greedy decoding,
    every row running to the longest answer."""

    def __init__(self, seeds: Sequence[int], temperature: float) -> None:
        self.seeds, self.temperature, self.step = list(seeds), temperature, 0

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        noise = step_noise(self.seeds, self.step, scores.shape[-1])
        self.step += 1
        return scores.float() / self.temperature + noise


def reference(model, prompts: list[list[int]], seeds: list[int] | None, sample: SampleConfig, eos: int, pad: int,
              torch_seed: int = 0) -> list[list[int]]:
    """``generate``'s answers: multinomial sampling under ``torch_seed`` (``seeds`` None) or greedy
    decoding over the Gumbel-max scores of ``seeds``."""
    ids, mask = pad_rows(prompts, pad, "left")
    how = (dict(do_sample=True, temperature=sample.temperature, top_k=0, top_p=1.0) if seeds is None else
           dict(do_sample=False, num_beams=1, temperature=None, top_k=None, top_p=None,
                logits_processor=LogitsProcessorList([GumbelProcessor(seeds, sample.temperature)])))
    torch.manual_seed(torch_seed)
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=sample.max_new_tokens, pad_token_id=pad,
                         eos_token_id=eos, **how)
    rows = out[:, ids.shape[1]:].tolist()
    return [r[: r.index(eos) + 1] if eos in r else r for r in rows]


@pytest.mark.parametrize("per_answer_seeds", [False, True])
def test_answers_equal_generate_as_answers_end(whole_answers, per_answer_seeds):
    """A trained tiny policy ends its answers at different steps, so rows leave the batch."""
    tok = load_tokenizer(whole_answers / "tok")
    model = AutoModelForCausalLM.from_pretrained(whole_answers / "sft").eval()
    fmt = PromptFormatter(PromptConfig(), tok)
    qs = QUESTIONS * 2
    seeds = [row_seed(3, q, i) for i, q in enumerate(qs)] if per_answer_seeds else None
    sample = SampleConfig(max_new_tokens=48, batch_size=16, temperature=0.9)
    ours = generate(model, fmt, qs, sample, 5, 48, row_seeds=seeds)  # generate seeds torch with 5
    prompts = [fmt.encode_prompt(q, 48) for q in qs]
    expected = reference(model, prompts, seeds, sample, tok.eos_token_id, tok.pad_token_id, torch_seed=5)
    assert [g.response_ids for g in ours] == expected
    lengths = [len(g.response_ids) for g in ours]
    assert sum(g.ended for g in ours) >= 4 and len(set(lengths)) >= 4  # rows did leave the batch, at different steps


@pytest.mark.parametrize("per_answer_seeds", [False, True])
@pytest.mark.parametrize("family", ["gpt_neo", "gpt2", "gpt_neox", "llama"])
def test_answers_equal_generate_for_every_family(family, per_answer_seeds, prepared):
    """Random tiny models of each family: the KV cache, positions under left padding and rows
    leaving the batch work alike. A random model rarely samples its EOS, so the end token is
    one it samples often, at different steps in different rows."""
    tok = load_tokenizer(prepared / "tok")
    torch.manual_seed(0)
    if family == "gpt_neo":
        model = build_model(ModelConfig(config=TINY_MODEL), tok, "causal").eval()
    else:
        model = AutoModelForCausalLM.from_config(family_config(family, len(tok))).eval()
    fmt = PromptFormatter(PromptConfig(), tok)
    prompts = [fmt.encode_prompt(q, 32) for q in QUESTIONS]
    seeds = [row_seed(11, q, 0) for q in QUESTIONS] if per_answer_seeds else None
    ids, mask = pad_rows(prompts, tok.pad_token_id, "left")
    sample = SampleConfig(max_new_tokens=24, temperature=1.0)
    torch.manual_seed(1)
    first = decode(model, ids, mask, sample, -1, seeds)  # no end: every row runs 24 steps
    assert first == reference(model, prompts, seeds, sample, eos=len(tok) + 7, pad=tok.pad_token_id, torch_seed=1)
    end = Counter(t for row in first for t in set(row)).most_common(1)[0][0]
    torch.manual_seed(1)
    ours = decode(model, ids, mask, sample, end, seeds)
    assert ours == reference(model, prompts, seeds, sample, eos=end, pad=tok.pad_token_id, torch_seed=1)
    assert len({len(r) for r in ours}) >= 3  # rows ended at different steps


def test_gumbel_noise_keeps_its_recorded_draws():
    # Recorded before the rows were batched and the logarithm went in place: the same bits.
    assert gumbel_noise(4, 7).tolist() == [-0.243088036775589, -0.2590863108634949, 1.9078967571258545,
                                           0.8662023544311523]
    for vocab, digest in ((864, "2158a215d8956f6090362c87ce95df0581d8ceac68a07f5e12815bb3ba2f7c6a"),
                          (30000, "ca0adba9bd8308890867ae82d5ab13595457be0944830e691581b97dfff01090")):
        noise = step_noise(list(range(11, 18)), 5, vocab)
        assert hashlib.sha256(noise.numpy().tobytes()).hexdigest() == digest, vocab


@pytest.mark.parametrize("vocab", [864, NOISE_CHUNK // 3, NOISE_CHUNK + 1])  # 75, 3 and 1 rows a pass
def test_step_noise_rows_are_their_own_streams_however_they_are_grouped(vocab):
    seeds = [3, 1 << 40, 99, 7, 2 ** 62, 5, 11]
    noise = step_noise(seeds, 4, vocab)
    assert noise.shape == (7, vocab) and noise.dtype == torch.float32
    for i, s in enumerate(seeds):
        assert torch.equal(noise[i], gumbel_noise(vocab, (s + 4 * 0x9E3779B97F4A7C15) % 2 ** 63)), i
    assert torch.equal(step_noise(seeds[2:5], 4, vocab), noise[2:5])

