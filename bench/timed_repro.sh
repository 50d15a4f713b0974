#!/usr/bin/env bash
# The README's first command on a fresh clone of this checkout, every output line stamped with the
# seconds since the start, so the graph's time splits by stage ("Running stage" lines):
#
#   bash bench/timed_repro.sh [CLONE_DIR] > timed_repro.log 2>&1
#
# CLONE_DIR (default ../fresh beside this checkout) is deleted first.
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
CLONE=${1:-$(dirname "$ROOT")/fresh}
cd "$(dirname "$CLONE")" && rm -rf "$CLONE" && git clone -q "$ROOT" "$CLONE" && cd "$CLONE"
{ bash scripts/setup.sh > setup.log 2>&1 && source .venv/bin/activate && echo "setup done" && dvc repro; echo "exit $?"; } 2>&1 |
  python3 -u -c '
import sys, time
t0 = time.time()
for line in sys.stdin:
    sys.stdout.write(f"{time.time() - t0:8.1f} {line}")'
