#!/usr/bin/env bash
# The real-data run: presets/smollm2-135m-5sites-cpu.yaml (SmolLM2-135M on the five sites of
# ../shared/data/stackexchange), detached and resumable, in its own clone so the working tree
# stays free:
#
#   nohup bash bench/real_data/run.sh > ../cqa-real-run.log 2>&1 &
#
# After an interruption (a kill, the end of a session) run the same command again: stages that
# finished are skipped (dvc.lock and DVC's run cache), the interrupted one resumes from its last
# checkpoint (the stages resume byte-identically after a kill). At the end the run's metrics, the
# params used, dvc.lock, the stage times and sample answers go to bench/real_data/<YYYY-MM-DD>/ of
# this checkout, to commit as data, with report.md (bench/real_data/report.py), which the docs include.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
WORK=${WORK:-$(dirname "$ROOT")/cqa-real-run}
PRESET=${PRESET:-presets/smollm2-135m-5sites-cpu.yaml}
[ -d "$WORK/.git" ] || git clone -q "$ROOT" "$WORK"
cd "$WORK"
[ -x .venv/bin/python ] || bash scripts/setup.sh
source .venv/bin/activate
echo "$(date -u +%FT%TZ) start in $WORK at $(git rev-parse --short HEAD), $PRESET"
# Each stage's wall time over every session the run spans, and its peak memory (monitor.sh).
MEM=${MEM:-$(dirname "$WORK")/cqa-real-run.mem.tsv}
bash "$ROOT/bench/real_data/monitor.sh" "$MEM" "$WORK" & monitor=$!
trap 'kill $monitor 2>/dev/null' EXIT
start=$(date +%s)
dvc exp run $(python -m cqa_rlhf.presets "$PRESET")
end=$(date +%s)
OUT="$ROOT/bench/real_data/$(date -u +%F)"
python "$ROOT/bench/real_data/collect.py" --run "$WORK" --out "$OUT" --preset "$PRESET" --wall "$((end - start))" --mem "$MEM"
python "$ROOT/bench/real_data/report.py" "$OUT"
echo "$(date -u +%FT%TZ) done: $OUT"
