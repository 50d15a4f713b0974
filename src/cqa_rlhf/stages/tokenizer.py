"""Stage `tokenizer`: the pretrained model's tokenizer, or a byte-level BPE trained on the
training split (params: model, tokenizer, data.out)."""

from __future__ import annotations

from pathlib import Path

from cqa_rlhf.config import DataConfig, ModelConfig, TokenizerConfig
from cqa_rlhf.data.tables import read_table
from cqa_rlhf.errors import cli
from cqa_rlhf.io import replace_dir, staging_dir
from cqa_rlhf.stages.common import Params, stage_args
from cqa_rlhf.tokenizer import pretrained_tokenizer, train_bpe


def training_texts(prepared: Path):
    """Questions and answers of the training split, in table order (deterministic)."""
    for row in read_table(prepared / "train" / "prompts").column("question").to_pylist():
        yield row
    for table in ("sft", "reward"):
        yield from read_table(prepared / "train" / table).column("answer").to_pylist()


def run(model: ModelConfig, cfg: TokenizerConfig, data: DataConfig) -> dict:
    """Write the tokenizer to ``cfg.out``, whole or not at all; returns its size."""
    if model.name is not None:
        tok = pretrained_tokenizer(model, cfg)
    else:
        max_pos = int(model.config.get("max_position_embeddings", 2048))
        tok = train_bpe(training_texts(Path(data.out)), cfg, model_max_length=max_pos)
    out = Path(cfg.out)
    tmp = staging_dir(out)
    tok.save_pretrained(tmp)
    replace_dir(tmp, out)
    print(f"tokenizer: {len(tok)} tokens, eos={tok.eos_token!r} pad={tok.pad_token!r} -> {out}")
    return {"tokens": len(tok)}


@cli
def main(argv: list[str] | None = None) -> None:
    params = Params.read(stage_args(__doc__, argv).params)
    run(params.section("model", ModelConfig), params.section("tokenizer", TokenizerConfig),
        params.section("data", DataConfig))


if __name__ == "__main__":
    main()
