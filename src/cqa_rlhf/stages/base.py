"""Stage `base`: export the untrained base policy (params: model, base) so the evaluation can
compare it with the trained ones: `model.name` as loaded, or a fresh GPT-Neo from `model.config`."""

from __future__ import annotations

import lightning as L

from cqa_rlhf.config import BaseConfig, ModelConfig, TokenizerConfig
from cqa_rlhf.errors import cli
from cqa_rlhf.models import build_model
from cqa_rlhf.stages.common import Params, stage_args
from cqa_rlhf.tokenizer import load_tokenizer
from cqa_rlhf.training import export_pretrained


def run(cfg: BaseConfig, model_cfg: ModelConfig, tokenizer: TokenizerConfig) -> dict:
    """Export the untrained policy to ``cfg.out``; returns its parameter count."""
    L.seed_everything(cfg.seed, verbose=False)
    tok = load_tokenizer(tokenizer.out)
    model = build_model(model_cfg, tok, "causal")
    export_pretrained(model, tok, cfg.out, {"model": model_cfg.model_dump(mode="json"),
                                            "base": cfg.model_dump(mode="json")})
    n = sum(p.numel() for p in model.parameters())
    print(f"base: {n} parameters -> {cfg.out}")
    return {"parameters": n}


@cli
def main(argv: list[str] | None = None) -> None:
    params = Params.read(stage_args(__doc__, argv).params)
    run(params.section("base", BaseConfig), params.section("model", ModelConfig),
        params.section("tokenizer", TokenizerConfig))


if __name__ == "__main__":
    main()
