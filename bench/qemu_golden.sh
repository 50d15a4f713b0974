#!/usr/bin/env bash
# The default model's first 20 SFT steps (tests/golden.py) under qemu-user's emulated Intel
# (Haswell) and AMD (EPYC-Rome) AVX2 CPUs, compared with the golden hashes in tests/golden.json.
# Data and tokenizer are made natively (pure Python and the tokenizers library: no float maths
# that the CPU changes); the SFT stage itself runs emulated. A process that qemu-user runs starts
# its children natively, so the stage is launched under qemu directly, not through dvc.
#   bash bench/qemu_golden.sh [Haswell EPYC-Rome]     # from the project root; slow (minutes per CPU)
set -euo pipefail
cd "$(dirname "$0")/.."
CPUS=("$@"); [ ${#CPUS[@]} -eq 0 ] && CPUS=(Haswell EPYC-Rome)
PY=$(readlink -f .venv/bin/python3)
SITE=$(.venv/bin/python -c "import site; print(site.getsitepackages()[0])")
W=$(mktemp -d)
trap 'rm -rf "$W"' EXIT
.venv/bin/python - "$W" <<'PY'
import subprocess, sys
from pathlib import Path
sys.path.insert(0, "tests")
from golden import sft20_params
w = Path(sys.argv[1])
p = sft20_params(Path("."), w)
for stage in ("synth", "data", "tokenizer"):
    subprocess.run([sys.executable, "-m", f"cqa_rlhf.stages.{stage}", "--params", str(p)], check=True, capture_output=True, cwd=w)
PY
for cpu in "${CPUS[@]}"; do
  rm -rf "$W/sft" "$W/ckpt" "$W/live" "$W/sft.json"
  start=$(date +%s)
  (cd "$W" && PYTHONPATH="$SITE:$OLDPWD/src" CQA_THREADS=2 qemu-x86_64 -cpu "$cpu" "$PY" -m cqa_rlhf.stages.sft \
     --params "$W/params.yaml" > "$W/log" 2>&1) || { tail -n 5 "$W/log"; exit 1; }
  .venv/bin/python - "$W" "$cpu" "$(( $(date +%s) - start ))" <<'PY'
import json, sys
from pathlib import Path
sys.path.insert(0, "tests")
from golden import GOLDEN, sha256
w, cpu, secs = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
got = {"sft20/model.safetensors": sha256(w / "sft" / "model.safetensors"), "sft20/sft.json": sha256(w / "sft.json"),
       "sft20/train_loss.tsv": sha256(w / "live" / "plots" / "metrics" / "train" / "loss.tsv")}
gold = json.loads(GOLDEN.read_text())["sha256"]
same = all(gold[k] == v for k, v in got.items())
print(f"qemu -cpu {cpu}: 20 SFT steps in {secs} s; " + ("all 3 hashes equal the golden ones" if same else
      "DIFFERENT: " + ", ".join(f"{k} {v[:12]} (golden {gold[k][:12]})" for k, v in got.items() if gold[k] != v)), flush=True)
PY
done
