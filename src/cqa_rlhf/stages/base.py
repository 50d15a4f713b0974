"""Stage `base`: export the untrained base policy (params: model, base) so the evaluation can
compare it with the trained ones: `model.name` as loaded, or a fresh GPT-Neo from `model.config`."""

from __future__ import annotations

import lightning as L

from cqa_rlhf.config import BaseConfig, ModelConfig, TokenizerConfig, parse_section, read_params
from cqa_rlhf.errors import cli
from cqa_rlhf.models import build_model
from cqa_rlhf.stages.common import stage_args
from cqa_rlhf.tokenizer import load_tokenizer
from cqa_rlhf.training import export_pretrained


@cli
def main() -> None:
    args = stage_args(__doc__)
    params = read_params(args.params)
    model_cfg = parse_section(params, "model", ModelConfig, args.params)
    tok_cfg = parse_section(params, "tokenizer", TokenizerConfig, args.params)
    cfg = parse_section(params, "base", BaseConfig, args.params)
    L.seed_everything(cfg.seed, verbose=False)
    tok = load_tokenizer(tok_cfg.out)
    model = build_model(model_cfg, tok, "causal")
    export_pretrained(model, tok, cfg.out, {"model": model_cfg.model_dump(mode="json"),
                                            "base": cfg.model_dump(mode="json")})
    print(f"base: {sum(p.numel() for p in model.parameters())} parameters -> {cfg.out}")


if __name__ == "__main__":
    main()
