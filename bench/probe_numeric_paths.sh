#!/usr/bin/env bash
# Which CPU code-path switches change the numbers? A tiny SFT run (tests/helpers.py's tiny
# site and model, 40 steps) under each setting; prints the sha256 prefix of the exported weights
# and the validation loss. Same hash = bit-identical training. Groundwork for pinning the numeric
# paths across CPUs (the reproducibility issue). About 4 minutes on 2 cores.
#
#     bash bench/probe_numeric_paths.sh
set -u
cd "$(dirname "$0")/.."
root=$(pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export PYTHONPATH="$root/src" CQA_PROGRESS=0
python - "$work" "$root" <<'PY'
import subprocess, sys, yaml
from pathlib import Path
work, root = Path(sys.argv[1]), Path(sys.argv[2])
sys.path.insert(0, str(root / "tests"))
from helpers import tiny_params
p = tiny_params(work, max_steps=40, val_check_interval=20)
p["tokenizer"]["vocab_size"] = 900
(work / "params.yaml").write_text(yaml.safe_dump(p))
for stage in ("synth", "data", "tokenizer"):
    subprocess.run([sys.executable, "-m", f"cqa_rlhf.stages.{stage}", "--params", "params.yaml"], cwd=work,
                   check=True, capture_output=True)
PY
grep -m1 'model name' /proc/cpuinfo; grep -o -m1 -w 'avx512f' /proc/cpuinfo || echo "no avx512f"; echo "$(nproc) cores"
run() {
  (cd "$work" && rm -rf sft ckpt live m/sft.json &&
   env "$@" python -m cqa_rlhf.stages.sft --params params.yaml >/dev/null 2>err.txt) || { echo "FAILED :: $*"; return; }
  echo "$(sha256sum "$work/sft/model.safetensors" | cut -c1-12) $(python -c "import json; print(json.load(open('$work/m/sft.json'))['val_loss'])") :: $*"
}
run NONE=1
run NONE=2
run ATEN_CPU_CAPABILITY=avx2
run ATEN_CPU_CAPABILITY=default
run MKL_CBWR=COMPATIBLE
run MKL_CBWR=AVX2
run ONEDNN_MAX_CPU_ISA=AVX2
run ATEN_CPU_CAPABILITY=avx2 MKL_CBWR=AVX2
run ATEN_CPU_CAPABILITY=default MKL_CBWR=COMPATIBLE
run OMP_NUM_THREADS=1
run OMP_NUM_THREADS=1 ATEN_CPU_CAPABILITY=avx2 MKL_CBWR=AVX2
