#!/usr/bin/env bash
# GPU smoke, in two parts; about 10 minutes on one H100/H200 class GPU, so a session lent a GPU
# measures at once:
#
#     bash bench/gpu_smoke.sh            # after `dvc repro` (bench_ppo reads models/ and data/prepared)
#
# 1. Step times, throughput and peak memory: a few steps of SFT and PPO in bf16, and LoRA against
#    full fine-tuning, for the default config and the GPT-Neo-125M shape.
# 2. The whole default graph on the GPU (bench/gpu_smoke_graph.yaml: GPT-Neo-125M's shape,
#    bf16-mixed, a few steps per stage), in a clone, with each stage's wall time and the GPU's peak
#    memory while it ran; then SFT under the FSDP strategy on one device.
#
# Runs the package from src/ (PYTHONPATH), so it also works where the project is not installed.
# GPU_SMOKE_PART=1 or 2 runs one part.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}" CQA_PROGRESS=0
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c "import torch, lightning, transformers; print('torch', torch.__version__, '| lightning', lightning.__version__, '| transformers', transformers.__version__)"
PART=${GPU_SMOKE_PART:-all}

if [ "$PART" != 2 ]; then
  python3 bench/bench_sft.py --accelerator gpu --precision bf16-mixed --steps 40 --big-steps 20
  python3 bench/bench_ppo.py --accelerator gpu --precision bf16-mixed --iterations 4 --big-iterations 4 --big-rollout 64
  python3 bench/bench_lora.py --device cuda --steps 5
fi

if [ "$PART" != 1 ]; then
  ROOT=$(pwd)
  WORK=$(mktemp -d)/repo
  git clone -q "$ROOT" "$WORK" && cd "$WORK"
  export PYTHONPATH="$WORK/src"
  # the GPU's used memory every 200 ms, and a timestamp on every line dvc prints
  nvidia-smi --query-gpu=timestamp,memory.used --format=csv,noheader,nounits -lms 200 > "$WORK/gpu_mem.csv" &
  SAMPLER=$!
  stamp() { while IFS= read -r line; do printf '%s %s\n' "$(date +%s.%N)" "$line"; done; }
  dvc exp run $(python3 -m cqa_rlhf.presets "$ROOT/bench/gpu_smoke_graph.yaml") 2>&1 | stamp | tee "$WORK/graph.log"
  dvc exp run sft $(python3 -m cqa_rlhf.presets "$ROOT/bench/gpu_smoke_graph.yaml") -S trainer.strategy=fsdp 2>&1 \
    | stamp | tee "$WORK/fsdp.log"
  kill "$SAMPLER"
  python3 "$ROOT/bench/gpu_stage_table.py" "$WORK/graph.log" "$WORK/fsdp.log" --memory "$WORK/gpu_mem.csv"
fi
