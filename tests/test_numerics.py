"""The numeric pin (cqa_rlhf/numerics.py): free, two CPU code paths write different weights (what
the pin is for; pinned, the whole tiny graph gives the golden bits on both, tests/test_golden.py);
MKL's vendor check answered by the shim, and the GEMM guard's one-line refusal without it. Plus the
switches' one-line errors."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import stage_env
from helpers import CODE_PATHS, cpu_flags, tiny_params

HAS_AVX2 = " avx2 " in cpu_flags()
VENDOR = next((line.split(":")[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
               if line.startswith("vendor_id")), "") if Path("/proc/cpuinfo").is_file() else ""


def _stage(module: str, params: dict, work: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    pfile = work / f"params-{module}-{hashlib.sha1(repr(sorted(env.items())).encode()).hexdigest()[:8]}.yaml"
    pfile.write_text(yaml.safe_dump(params), encoding="utf-8")
    return subprocess.run([sys.executable, "-m", f"cqa_rlhf.stages.{module}", "--params", str(pfile), *args],
                          capture_output=True, text=True, cwd=work, env={**stage_env(), **env}, timeout=600)


def _run_sft(site: Path, out: Path, env: dict[str, str]) -> dict[str, bytes]:
    """20 tiny SFT steps under ``env``: its weights and metrics files."""
    params = tiny_params(site, max_steps=20, out=str(out / "sft"), metrics=str(out / "m" / "sft.json"),
                         live_dir=str(out / "sft_live"), checkpoint_dir=str(out / "sft_ckpt"))
    proc = _stage("sft", params, site, env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"sft/model.safetensors": (out / "sft" / "model.safetensors").read_bytes(),
            "m/sft.json": (out / "m" / "sft.json").read_bytes()}


def test_free_stages_differ_across_code_paths(prepared):
    """Without the pin the two code paths of helpers.CODE_PATHS write other bits (what the pin is
    for); under the pin the whole tiny graph gives the golden bits on both
    (test_golden.test_tiny_graph_at_other_thread_counts_and_code_paths_matches_too)."""
    free = {tag: _run_sft(prepared, prepared / f"free-{tag}", {**env, "CQA_NUMERICS": "free"})
            for tag, env in CODE_PATHS.items()}
    assert free["best"]["sft/model.safetensors"] != free["generic"]["sft/model.safetensors"]
    assert free["best"]["m/sft.json"] != free["generic"]["m/sft.json"]  # the val loss moves too
    exported = yaml.safe_load((prepared / "free-generic" / "sft" / "params.yaml").read_text())
    assert exported["numerics"] == {"mode": "free", "aten": "DEFAULT", "mkl_cbwr": "SSE4_2"}


def test_unknown_switch_value_is_a_one_line_error(prepared):
    proc = _stage("sft", tiny_params(prepared, out=str(prepared / "never")), prepared, {"CQA_NUMERICS": "fast"})
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["error: CQA_NUMERICS='fast': expected one of pinned, free"]
    assert not (prepared / "never").exists()


def test_torch_imported_before_the_package_is_refused_when_pinned(prepared):
    params = prepared / "params-early-torch.yaml"
    params.write_text(yaml.safe_dump(tiny_params(prepared, out=str(prepared / "never2"))), encoding="utf-8")
    code = f"import torch; from cqa_rlhf.stages.sft import main; main(['--params', {str(params)!r}])"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=prepared,
                          env={**stage_env(), "CQA_NUMERICS": "pinned"}, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: torch was imported before cqa_rlhf") and "CQA_NUMERICS=free" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not (prepared / "never2").exists()


def test_malformed_thread_count_is_a_one_line_error(prepared):
    proc = _stage("sft", tiny_params(prepared, out=str(prepared / "never3")), prepared, {"CQA_THREADS": "all"})
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["error: CQA_THREADS='all': expected a whole number of threads >= 1"]
    assert not (prepared / "never3").exists()


def _probe(src: Path, bare: bool = False) -> subprocess.CompletedProcess:
    """Import the package from ``src`` and check the pin. ``bare``: the base interpreter with the
    venv's packages on PYTHONPATH, so the editable install's .pth (which would put the workspace's
    src, shim and all, on sys.path) is not read: no build of the shim is reachable."""
    import site

    code = "import cqa_rlhf, torch; from cqa_rlhf import numerics; print(numerics._shim_loaded); numerics.check(); print('ok')"
    python = os.path.realpath(sys.executable) if bare else sys.executable
    path = f"{src}{os.pathsep}{site.getsitepackages()[0]}" if bare else str(src)
    return subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**stage_env(), "PYTHONPATH": path, "CQA_NUMERICS": "pinned"})


@pytest.mark.skipif(not HAS_AVX2, reason="the pinned numbers need an x86-64 CPU with AVX2")
def test_vendor_shim_makes_mkl_honour_the_strict_branch_and_the_guard_refuses_without_it(tmp_path):
    """With the shim, the guard GEMM equals the reference (recorded with Intel's dispatch). Without
    it, MKL on a non-Intel CPU ignores AVX2,STRICT: the guard refuses with one line naming the
    shim. An Intel CPU honours the branch by itself, so there the copy without it passes too."""
    import cqa_rlhf

    with_shim = _probe(Path(cqa_rlhf.__file__).parents[1])
    assert with_shim.returncode == 0 and with_shim.stdout.split() == ["True", "ok"], with_shim.stderr[-2000:]
    bare = tmp_path / "src"
    shutil.copytree(Path(cqa_rlhf.__file__).parent, bare / "cqa_rlhf", ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    without = _probe(bare, bare=True)
    if VENDOR == "GenuineIntel":
        assert without.returncode == 0 and without.stdout.split() == ["False", "ok"], without.stderr[-2000:]
        return
    assert without.returncode != 0 and without.stdout.split() == ["False"]
    last = without.stderr.strip().splitlines()[-1]
    assert "not the reference" in last and "cqa_rlhf._mkl_intel was not built" in last, last
