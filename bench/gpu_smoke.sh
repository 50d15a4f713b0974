#!/usr/bin/env bash
# GPU smoke: a few steps of SFT and PPO in bf16 on one GPU, and LoRA against full fine-tuning, for the default config and the
# GPT-Neo-125M shape (random weights, vocabulary 50257), printing step times, throughput and peak
# GPU memory. Finishes in about 4 minutes on one H100/H200 class GPU, so a session lent a GPU
# measures at once:
#
#     bash bench/gpu_smoke.sh            # after `dvc repro` (bench_ppo reads models/ and data/prepared)
#
# Runs the package from src/ (PYTHONPATH), so it also works where the project is not installed.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}" CQA_PROGRESS=0
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c "import torch, lightning, transformers; print('torch', torch.__version__, '| lightning', lightning.__version__, '| transformers', transformers.__version__)"
python3 bench/bench_sft.py --accelerator gpu --precision bf16-mixed --steps 40 --big-steps 20
python3 bench/bench_ppo.py --accelerator gpu --precision bf16-mixed --iterations 4 --big-iterations 4 --big-rollout 64
python3 bench/bench_lora.py --device cuda --steps 5
