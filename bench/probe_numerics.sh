#!/usr/bin/env bash
# bench/probe_numerics.py natively and under qemu-user's emulated Intel (Haswell) and AMD
# (EPYC-Rome) AVX2 CPUs (Debian's qemu-user; slow: minutes each). Output: one file per CPU in
# $1 (default bench/probe_numerics/), then a diff of each against the native one.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-bench/probe_numerics}
mkdir -p "$OUT"
PY=$(readlink -f .venv/bin/python3)
SITE=$(.venv/bin/python -c "import site; print(site.getsitepackages()[0])")
.venv/bin/python bench/probe_numerics.py > "$OUT/native.txt"
for cpu in Haswell EPYC-Rome; do
  PYTHONPATH="$SITE:src" qemu-x86_64 -cpu "$cpu" "$PY" bench/probe_numerics.py 2>/dev/null > "$OUT/qemu-$cpu.txt"
done
for cpu in Haswell EPYC-Rome; do
  echo "== native vs qemu -cpu $cpu (only the first line, the threads, may differ)"
  diff "$OUT/native.txt" "$OUT/qemu-$cpu.txt" || true
done
