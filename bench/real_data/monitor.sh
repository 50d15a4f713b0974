#!/usr/bin/env bash
# Samples a running pipeline every ${EVERY:-20} s: for each stage process (`python -m
# cqa_rlhf.stages.<name> [args]`) whose working directory is the run's (the second argument,
# default ../cqa-real-run: tests or other runs on the machine are not counted), a line "<unix time>\t<stage>\t<VmRSS kB>\t<VmHWM kB>" appended to
# the file given (default ../cqa-real-run.mem.tsv). VmHWM is the process's own peak resident set,
# so a stage's peak is exact to its last sample; the samples also give each stage's wall time
# summed over the sessions a resumed run spans (bench/real_data/collect.py reads them). Reads
# /proc only: it costs nothing next to the run. A stopped process (SIGSTOP, state T: the run paused
# for another measurement) is not sampled, so a pause does not count as the stage's time. Started
# and stopped by run.sh.
set -uo pipefail
OUT=${1:-$(cd "$(dirname "$0")/../../.." && pwd)/cqa-real-run.mem.tsv}
RUN=$(cd "${2:-$(dirname "$OUT")/cqa-real-run}" && pwd -P)
EVERY=${EVERY:-20}
while true; do
  now=$(date +%s)
  for status in /proc/[0-9]*/status; do
    pid=${status#/proc/}; pid=${pid%/status}
    args=$(tr '\0' ' ' 2>/dev/null < "/proc/$pid/cmdline") || continue
    case "$args" in
      *"-m cqa_rlhf.stages."*) ;;
      *) continue ;;
    esac
    [ "$(readlink "/proc/$pid/cwd" 2>/dev/null)" = "$RUN" ] || continue
    stage=${args#*-m cqa_rlhf.stages.}
    stage=$(echo "$stage" | sed -E 's/ --(kind|policy|name) /@/; s/ +$//; s/ /_/g')
    read -r state rss hwm < <(awk '/^State/{s=$2} /^VmRSS/{r=$2} /^VmHWM/{h=$2} END{print s, r, h}' "$status" 2>/dev/null)
    [ "${state:-}" = T ] && continue
    [ -n "${hwm:-}" ] && printf '%s\t%s\t%s\t%s\n' "$now" "$stage" "$rss" "$hwm" >> "$OUT"
  done
  sleep "$EVERY"
done
