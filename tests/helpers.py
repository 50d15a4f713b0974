"""Small builders for hand-made dumps (tests only)."""

from __future__ import annotations

from pathlib import Path
from xml.sax.saxutils import quoteattr


def write_posts(path: Path, rows: list[dict], crlf: bool = True) -> Path:
    """Write a Posts.xml the way Stack Exchange publishes it: BOM, CRLF, one row per line."""
    nl = "\r\n" if crlf else "\n"
    lines = ['\ufeff<?xml version="1.0" encoding="utf-8"?>', "<posts>"]
    for row in rows:
        attrs = " ".join(
            f"{k}={quoteattr(str(v), {chr(10): '&#xA;', chr(13): '&#xD;'})}" for k, v in row.items() if v is not None
        )
        lines.append(f"  <row {attrs} />")
    lines.append("</posts>")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes((nl.join(lines) + nl).encode("utf-8"))
    return path


def q(id: int, title: str, body: str = "<p>body of the question</p>", accepted: int | None = None, score: int = 0):
    return {"Id": id, "PostTypeId": 1, "AcceptedAnswerId": accepted, "Score": score, "Title": title, "Body": body}


def a(id: int, parent: int, body: str, score: int):
    return {"Id": id, "PostTypeId": 2, "ParentId": parent, "Score": score, "Body": body}


TINY_MODEL = {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "intermediate_size": 64,
              "max_position_embeddings": 128, "attention_types": [[["global", "local"], 1]], "window_size": 64}


def tiny_params(work: Path, **sft) -> dict:
    """Params for a fast run of synth -> data -> tokenizer -> sft under ``work``."""
    return {
        "synth": {"out": str(work / "raw"), "n_questions": 150, "seed": 3},
        "data": {"source": str(work / "raw"), "out": str(work / "prepared"), "metrics": str(work / "m" / "data.json")},
        "prompt": {"template": "Question: {question}\nAnswer:"},
        "model": {"name": None, "config": TINY_MODEL},
        "tokenizer": {"out": str(work / "tok"), "vocab_size": 400},
        "trainer": {"accelerator": "cpu", "devices": 1, "log_every_n_steps": 5},
        "sft": {"data": str(work / "prepared"), "out": str(work / "sft"), "metrics": str(work / "m" / "sft.json"),
                "live_dir": str(work / "live"), "checkpoint_dir": str(work / "ckpt"), "batch_size": 8,
                "max_length": 96, "max_epochs": -1, "max_steps": 30, "val_check_interval": 10, "optim": {"lr": 3e-3},
                "sample": {"n": 8, "max_new_tokens": 24, "batch_size": 8}, **sft},
    }


def cpu_flags() -> str:
    """The CPU's flags (/proc/cpuinfo), space-padded so that `" avx2 " in cpu_flags()` works."""
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    return " " + text.replace("\n", " ") + " "


# Two code paths through the very variables the numeric pin overrides: the CPU's best ATen kernels
# with MKL's automatic dispatch on 3 threads, against ATen's generic kernels, another MKL branch
# and one thread (what an older CPU or another core count would run). CQA_THREADS is the pin's own
# count. Under the pin both give the golden bits (test_golden); free, they differ (test_numerics).
CODE_PATHS = {
    "best": {"ATEN_CPU_CAPABILITY": "avx512" if " avx512f " in cpu_flags() else "avx2",
             "MKL_CBWR": "AUTO", "OMP_NUM_THREADS": "3", "MKL_NUM_THREADS": "3", "CQA_THREADS": "3"},
    "generic": {"ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "SSE4_2", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
                "CQA_THREADS": "1"},
}

