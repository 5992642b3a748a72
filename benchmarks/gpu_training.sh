#!/usr/bin/env bash
# One prepared GPU session (< 8 minutes on an H100/H200): correctness of activation checkpointing, the compiled
# loss and bf16; a 1-GPU FSDP run (stop + resume) and Transformer-3B under FSDP + AC (peak memory vs the planner);
# training throughput and MFU of Transformer-/DiT-Medium (and Base) at batch 64 / 256, eager vs compiled vs
# compiled + AC. Results: $OUT/benchmarks/results/<date>-<card>-training.json (OUT defaults to the repository
# root). The package is read from src/, nothing is installed.
#   bash benchmarks/gpu_training.sh          # on the GPU
#   bash benchmarks/gpu_training.sh --dry    # tiny sizes on the CPU, to check the script end to end
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [[ "${1:-}" != "--dry" ]]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
fi
"$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
# The phases keep to a 420 s budget by their estimates; the timeout is the backstop (the JSON is rewritten
# after every row and phase, so a killed run keeps what it measured).
PYTHONPATH=src HF_HUB_OFFLINE=1 timeout 470 "$PYTHON" benchmarks/gpu_training.py --out "${OUT:-.}" "$@"
