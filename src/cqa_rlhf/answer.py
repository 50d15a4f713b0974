"""Answer a question with any exported policy (models/base, models/sft, models/ppo, ...).

    python -m cqa_rlhf.answer --model models/ppo "How do I merge a git branch?"

The prompt template is the one the policy was trained with (the resolved params exported beside
its weights), and sampling follows ``evaluate.sample`` in ``--params`` (params.yaml), so the
answer is drawn as the evaluation draws it; flags override single sampling settings.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pydantic import ValidationError

from cqa_rlhf.config import EvaluateConfig, PromptConfig, parse_section, read_params, seeded
from cqa_rlhf.errors import ConfigError, DataError, cli
from cqa_rlhf.generation import generate
from cqa_rlhf.models import exported_dir, load_frozen
from cqa_rlhf.prompts import PromptFormatter
from cqa_rlhf.tokenizer import load_tokenizer


def load_prompt(model_dir: Path, params: dict, params_path: str) -> PromptConfig:
    """The template exported beside the policy; else the one in ``params``."""
    exported = model_dir / "params.yaml"
    if exported.is_file():
        saved = read_params(exported)
        if "prompt" in saved:
            return parse_section(saved, "prompt", PromptConfig, exported)
    return parse_section(params, "prompt", PromptConfig, params_path)


@cli
def main(argv: list[str] | None = None) -> None:
    prog = sys.argv[0] if sys.argv[0].startswith("cqa-rlhf") else "python -m cqa_rlhf.answer"
    ap = argparse.ArgumentParser(prog=prog, description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("question")
    ap.add_argument("--model", required=True, help="an exported policy directory (save_pretrained)")
    ap.add_argument("--params", default="params.yaml", help="sampling: its evaluate.sample (default: params.yaml)")
    ap.add_argument("--seed", type=int, default=None, help="default: the params file's seed")
    ap.add_argument("--max-new-tokens", type=int)
    ap.add_argument("--temperature", type=float)
    ap.add_argument("--top-k", type=int)
    ap.add_argument("--top-p", type=float)
    args = ap.parse_args(argv)

    question = args.question.strip()
    if not question:
        raise DataError("question is empty")
    model_dir = exported_dir(args.model, "--model")
    params = seeded(read_params(args.params), args.params) if Path(args.params).is_file() else {}
    cfg = parse_section(params, "evaluate", EvaluateConfig, args.params)
    overrides = {k: v for k, v in (("max_new_tokens", args.max_new_tokens), ("temperature", args.temperature),
                                   ("top_k", args.top_k), ("top_p", args.top_p)) if v is not None}
    try:
        sample = cfg.sample.model_validate({**cfg.sample.model_dump(), **overrides})
    except ValidationError as exc:
        err = exc.errors()[0]
        raise ConfigError(f"--{str(err['loc'][0]).replace('_', '-')}: {err['msg']} (got {err['input']!r})") from None

    tok = load_tokenizer(model_dir)
    fmt = PromptFormatter(load_prompt(model_dir, params, args.params), tok)
    try:
        model = load_frozen(model_dir, tok, "causal")
    except (OSError, ValueError) as exc:
        raise DataError(f"{args.model}: cannot load a causal LM: {exc}") from None
    seed = cfg.seed if args.seed is None else args.seed
    [gen] = generate(model, fmt, [question], sample, seed, cfg.max_prompt_length)
    print(gen.text if gen.text else "(empty answer)")


if __name__ == "__main__":
    main()
