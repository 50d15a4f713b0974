#!/usr/bin/env bash
# bench/probe_cross_cpu.py under each numeric setting; run on two machines and diff the output.
cd "$(dirname "$0")/.."
grep -m1 'model name' /proc/cpuinfo; grep -o -m1 -w avx512f /proc/cpuinfo || echo "no avx512f"
for e in "X=free" "ATEN_CPU_CAPABILITY=avx2 MKL_CBWR=AVX2" "ATEN_CPU_CAPABILITY=avx2 MKL_CBWR=COMPATIBLE" \
         "ATEN_CPU_CAPABILITY=default MKL_CBWR=COMPATIBLE"; do
  env $e OMP_NUM_THREADS=2 MKL_NUM_THREADS=2 python bench/probe_cross_cpu.py
done
