"""The CPU's numeric code paths, pinned so that every x86-64 CPU computes the same bits.

Float results depend on which kernels run, and the libraries pick kernels by the CPU:
- MKL (every float32 GEMM) dispatches by instruction set and vendor. ``MKL_CBWR=AVX2,STRICT``
  (conditional numerical reproducibility, strict) gives the same bits on every CPU with AVX2 and
  for any thread count, at the speed of MKL's own AVX2 kernels, but MKL honours it on Intel CPUs
  only: elsewhere it asks ``mkl_serv_intel_cpu_true`` and falls back to its automatic dispatch.
  The extension ``cqa_rlhf._mkl_intel`` answers that question "yes"; loaded with RTLD_GLOBAL
  before torch, it takes the place of MKL's own (torch calls it through the PLT), so an AMD CPU
  runs the kernels an Intel one does (measured: an AMD EPYC with it and an Intel Haswell under
  qemu give one GEMM hash; bench/RESULTS.md, "Exact on every x86 CPU").
- ATen's vectorised kernels (softmax, layer norm, sums, sampling) use AVX-512 where the CPU has it;
  ``ATEN_CPU_CAPABILITY=avx2`` selects the AVX2 build of the same kernels.
- oneDNN's matmuls (which ATen prefers for batched products) lie outside MKL's reproducibility
  guarantee: switched off under the pin, so every matmul is MKL's (no measured cost).
- Square roots, whole-tensor sums, layer norms' weight gradients and softmax's gradient are not
  covered by either (their bits follow the CPU or the thread count): the project computes them
  itself (:mod:`cqa_rlhf.exact_math`; the softmax gradient replaces ATen's CPU kernel under the pin).
All of these are read when torch first loads, so ``cqa_rlhf/__init__`` calls
:func:`pin_environment` before anything imports torch; stages then :func:`check` that it held,
which includes a fixed GEMM whose hash must equal the reference (a guard against an MKL or CPU
that computes other bits: refused with a one-line error, never silently different numbers).

``CQA_NUMERICS`` switches it: ``pinned`` (the default) or ``free`` (the libraries' own paths:
other CPUs give other numbers). ``CQA_THREADS=N`` sets the thread count (default: every core
this process may use); the pinned numbers do not depend on it.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.machinery
import os
import sys
from pathlib import Path

from cqa_rlhf.errors import CqaError

SWITCH = "CQA_NUMERICS"
THREADS_SWITCH = "CQA_THREADS"
MODES = ("pinned", "free")
PIN = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2,STRICT", "ONEDNN_MAX_CPU_ISA": "AVX2"}
# sha256 of :func:`_gemm_probe` under the pin: an Intel CPU's MKL AVX2 kernels (recorded on an
# AMD EPYC with the vendor shim; the same under qemu -cpu Haswell, an Intel vendor string).
GEMM_REFERENCE = "32f2ca0827e259f4"

_torch_was_loaded = False  # torch imported before cqa_rlhf: too late to pin
_shim_loaded = False


class NumericsError(CqaError):
    """The numeric pin was asked for but is not in effect in this process."""


def mode() -> str:
    """The ``CQA_NUMERICS`` setting; anything else is refused by :func:`check`."""
    return os.environ.get(SWITCH, "pinned").strip().lower() or "pinned"


def threads() -> int:
    """``CQA_THREADS``, else every core this process may run on."""
    raw = os.environ.get(THREADS_SWITCH, "").strip()
    if not raw:
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if not raw.isdigit() or int(raw) < 1:
        raise NumericsError(f"{THREADS_SWITCH}={raw!r}: expected a whole number of threads >= 1")
    return int(raw)


def pin_environment() -> None:
    """Set the pinned code paths in the environment, overriding the user's (pinned means pinned),
    and load MKL's vendor shim, unless ``CQA_NUMERICS=free``. Called on import of the package,
    before torch loads."""
    global _torch_was_loaded, _shim_loaded
    if mode() != "pinned":
        return
    if "torch" in sys.modules:
        _torch_was_loaded = True
        return
    try:
        n = str(threads())
    except NumericsError:  # refused by check(), with its one-line error, once the stage starts
        n = "1"
    os.environ.update(PIN, OMP_NUM_THREADS=n, MKL_NUM_THREADS=n)
    _shim_loaded = _load_shim()


def _load_shim() -> bool:
    """Load ``cqa_rlhf._mkl_intel`` into the global symbol scope; False if no build of it is found.
    Beside this file first; then any ``cqa_rlhf`` on ``sys.path`` (a clone run with
    ``PYTHONPATH=src`` and the venv of another checkout: every build of the one function is alike)."""
    dirs = [Path(__file__).parent, *(Path(p) / "cqa_rlhf" for p in sys.path if p)]
    for folder in dirs:
        for suffix in importlib.machinery.EXTENSION_SUFFIXES:
            lib = folder / f"_mkl_intel{suffix}"
            if lib.is_file():
                ctypes.CDLL(str(lib), mode=ctypes.RTLD_GLOBAL)
                return True
    return False


def _gemm_probe() -> str:
    """sha256 (16 hex digits) of GEMMs of the shapes training runs: square, tall-skinny (a weight
    gradient), batched (also transposed, as attention's backward), and a matrix-vector product, on
    inputs made exactly from integers."""
    import torch

    def grid(rows: int, cols: int, salt: int) -> torch.Tensor:
        k = torch.arange(rows * cols, dtype=torch.int64)
        return ((k * 7919 + salt) % 1009).to(torch.float32).div_(1009.0).sub_(0.5).view(rows, cols)

    a, b, tall = grid(96, 256, 1), grid(256, 128, 2), grid(4096, 64, 3)
    scores, q = grid(4 * 256, 256, 4).view(4, 256, 256), grid(4 * 256, 32, 5).view(4, 256, 32)
    digest = hashlib.sha256()
    for y in (a @ b, tall.t() @ tall, torch.bmm(a.view(4, 24, 256), b.expand(4, 256, 128)), a @ b[:, 0],
              scores.transpose(1, 2) @ q):  # attention's key gradient: the contraction runs over positions
        digest.update(y.contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def state() -> dict[str, str]:
    """What is in effect in this process (recorded beside every exported model; the thread count
    is not: pinned results do not depend on it)."""
    import torch

    return {"mode": mode(), "aten": torch.backends.cpu.get_cpu_capability(),
            "mkl_cbwr": os.environ.get("MKL_CBWR", "AUTO")}


def check() -> dict[str, str]:
    """:func:`state`, after making sure the pin holds when it is asked for (one-line errors)."""
    if mode() not in MODES:
        raise NumericsError(f"{SWITCH}={os.environ[SWITCH]!r}: expected one of {', '.join(MODES)}")
    threads()  # a malformed CQA_THREADS is refused in either mode
    now = state()
    if mode() == "free":
        return now
    if _torch_was_loaded:
        raise NumericsError(f"torch was imported before cqa_rlhf, so its numeric code paths are not pinned: "
                            f"import cqa_rlhf first, or set {SWITCH}=free to run unpinned")
    if now["aten"] != "AVX2":
        raise NumericsError(f"this CPU runs ATen's {now['aten']} kernels, not AVX2: the pinned numbers need an "
                            f"x86-64 CPU with AVX2 (or set {SWITCH}=free to run unpinned)")
    if now["mkl_cbwr"] != PIN["MKL_CBWR"]:
        raise NumericsError(f"numeric pin overridden in this process (MKL_CBWR {now['mkl_cbwr']}, pinned: "
                            f"{PIN['MKL_CBWR']})")
    import torch

    torch.set_num_threads(threads())  # torch caps OMP_NUM_THREADS at the core count; this it honours
    # oneDNN's batched matmul (attention's q k^T and its gradients) is outside MKL's CNR
    # guarantee; without it ATen calls MKL's GEMMs (STRICT) for every product.
    torch.backends.mkldnn.enabled = False
    from cqa_rlhf.exact_math import install_softmax_backward

    install_softmax_backward()  # ATen's splits rows by thread (exact_math.softmax_backward)
    _check_gemm()
    return now


def _check_gemm() -> None:
    got = _gemm_probe()
    if got != GEMM_REFERENCE:
        cause = ("MKL's vendor shim cqa_rlhf._mkl_intel was not built (reinstall the package: "
                 "pip install -e .)" if not _shim_loaded else "this MKL or CPU computes other GEMM bits")
        raise NumericsError(f"pinned GEMMs give {got}, not the reference {GEMM_REFERENCE}: {cause}; the exact numbers "
                            f"cannot be promised here (set {SWITCH}=free to run unpinned)")
