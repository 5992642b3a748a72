#!/usr/bin/env bash
# One prepared GPU session: environment, CUDA correctness + throughput, and the CPU-side model tests
# on the GPU machine's own PyTorch (the package is read from src/, nothing is installed).
set -uo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
PYTHONPATH=src python3 benchmarks/gpu_check.py
status=$?
PYTHONPATH=src HF_HUB_OFFLINE=1 timeout 60 python3 -m pytest -q -p no:cacheprovider tests/test_models.py 2>&1 | tail -3
exit $status
