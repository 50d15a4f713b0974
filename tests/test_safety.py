"""Safe loading and safe exports: crafted pickles are refused without running their code, and an
export that fails half-way leaves the previous export in place."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch
from transformers import GPTNeoConfig

from cqa_rlhf.config import ModelConfig
from cqa_rlhf.models import build_model, load_frozen
from cqa_rlhf.tokenizer import load_tokenizer
from cqa_rlhf.training import export_pretrained, load_best_weights

from helpers import TINY_MODEL


class _Payload:
    """Unpickling this runs ``os.system`` (what a malicious checkpoint would do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _malicious(path: Path, marker: Path) -> Path:
    with open(path, "wb") as f:
        pickle.dump({"state_dict": {"w": torch.zeros(1)}, "boom": _Payload(marker)}, f)
    return path


def test_a_crafted_checkpoint_is_refused_without_running_its_code(tmp_path):
    marker = tmp_path / "pwned"
    (tmp_path / "ckpt").mkdir()
    _malicious(tmp_path / "ckpt" / "best.ckpt", marker)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        load_best_weights(torch.nn.Linear(1, 1), tmp_path / "ckpt")
    assert not marker.exists()
    # the same file unpickled without weights_only would have run the payload: the test is real
    with open(tmp_path / "ckpt" / "best.ckpt", "rb") as f:
        pickle.load(f)
    assert marker.exists()


def test_a_pickled_model_file_is_never_loaded(tmp_path, prepared):
    """A model directory holding only a pickled pytorch_model.bin is refused: safetensors only."""
    tok = load_tokenizer(prepared / "tok")
    marker = tmp_path / "pwned"
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    GPTNeoConfig(vocab_size=len(tok), **TINY_MODEL).save_pretrained(model_dir)
    _malicious(model_dir / "pytorch_model.bin", marker)
    for kind in ("causal", "reward"):
        with pytest.raises(OSError, match="safetensors"):
            build_model(ModelConfig(), tok, kind, init_from=model_dir)
    with pytest.raises(OSError):
        load_frozen(model_dir, tok, "causal")
    assert not marker.exists()


def test_a_failed_export_leaves_the_previous_one_intact(tmp_path, prepared):
    tok = load_tokenizer(prepared / "tok")
    torch.manual_seed(0)
    out = tmp_path / "models" / "sft"
    export_pretrained(build_model(ModelConfig(config=TINY_MODEL), tok, "causal"), tok, out, {"run": 1})
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def crash(staging: Path) -> None:  # the process dies (or the disk fills) while writing
        raise OSError(28, "No space left on device")

    torch.manual_seed(1)
    with pytest.raises(OSError, match="No space left"):
        export_pretrained(build_model(ModelConfig(config=TINY_MODEL), tok, "causal"), tok, out, {"run": 2},
                          extra=crash)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in out.parent.iterdir() if not p.name.startswith(".")) == ["sft"]
