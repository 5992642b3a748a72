#!/usr/bin/env bash
# One prepared GPU session (< 8 minutes on an H100/H200): fused-vs-eager correctness, LatentLM vs DiT
# generation throughput, sample-many kill + resume. Results: $OUT/benchmarks/results/<date>-<card>-generation.json
# (OUT defaults to the repository root). The package is read from src/, nothing is installed.
#   bash benchmarks/gpu_generation.sh          # on the GPU
#   bash benchmarks/gpu_generation.sh --dry    # tiny sizes on the CPU, to check the script end to end
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [[ "${1:-}" != "--dry" ]]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
fi
"$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
"$PYTHON" -c "import importlib.util as u; print('modules:', {m: u.find_spec(m) is not None for m in \
  ('safetensors', 'tqdm', 'PIL', 'numpy', 'flash_attn', 'triton')})"
PYTHONPATH=src HF_HUB_OFFLINE=1 "$PYTHON" benchmarks/gpu_generation.py --out "${OUT:-.}" "$@"
