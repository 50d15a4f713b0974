"""Stage `gguf@<name>`: convert one GGUF checkpoint (params: gguf.<name>, pretrained_dir) into a
float32 `save_pretrained` directory with its tokenizer, once: later stages load it in seconds
instead of dequantising the GGUF again. The conversion is verified: the converted model's
logits on `check_prompt` must equal the GGUF-loaded model's."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

from cqa_rlhf.config import GGUFConfig, parse_section
from cqa_rlhf.errors import ConfigError, DataError, cli
from cqa_rlhf.io import replace_dir, resolve_resource, staging_dir, write_json_atomic
from cqa_rlhf.models import load_gguf, logits_gap, plain_copy
from cqa_rlhf.stages.common import entry_args, entry_name


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def run(name: str, cfg: GGUFConfig, pretrained_dir: str) -> dict:
    """Convert ``cfg.file`` into ``cfg.out`` (whole or not at all); returns the record written beside it."""
    start = time.perf_counter()
    out = Path(cfg.out)
    if Path(pretrained_dir).resolve() not in out.resolve().parents:
        raise ConfigError(f"gguf.{name}.out: {cfg.out} is not inside pretrained_dir ({pretrained_dir}), "
                          "the folder the training stages depend on")
    # 1. Load the GGUF (dequantised) and copy its weights into a plain float32 model.
    file = resolve_resource(cfg.file)
    gguf_model, tok = load_gguf(file)
    model = plain_copy(gguf_model)
    # 2. Verify: the same logits on the check prompt, to the last bit.
    ids = tok(cfg.check_prompt, return_tensors="pt")["input_ids"]
    gap = logits_gap(gguf_model, model, ids)
    if gap != 0.0:
        raise DataError(f"{file}: converted model's logits differ from the GGUF-loaded model's by {gap:g}")
    # 3. Save model, tokenizer and the record; swap the folder in.
    record = {"gguf": file.name, "sha256": sha256(file), "check_prompt": cfg.check_prompt,
              "check_tokens": int(ids.shape[1]), "max_abs_logit_diff": gap,
              "architecture": type(model).__name__, "parameters": sum(p.numel() for p in model.parameters())}
    tmp = staging_dir(out)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    write_json_atomic(tmp / "conversion.json", record)
    replace_dir(tmp, out)
    print(f"gguf@{name}: {file.name} -> {out} ({record['architecture']}, {record['parameters']} parameters, "
          f"logits equal on {record['check_tokens']} tokens) in {time.perf_counter() - start:.0f}s")
    return record


@cli
def main(argv: list[str] | None = None) -> None:
    params, name = entry_args(__doc__, "--name", argv, help="the entry of params `gguf` to convert")
    entries = params.data.get("gguf") or {}
    key = f"gguf.{entry_name(name, entries, 'gguf', params.path)}"
    run(name, parse_section({key: entries[name]}, key, GGUFConfig, params.path),
        str(params.data.get("pretrained_dir", "models/pretrained")))


if __name__ == "__main__":
    main()
