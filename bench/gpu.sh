#!/usr/bin/env bash
# Every GPU check in one call (one H100/H200, about 3 minutes): bench/gpu.py's rows, i.e. dinoray's own
# training step (the recipe job's backend, precision and model section) on ViT-L/14 in each variant,
# then ViT-g/14 (as many of its 40 blocks as fit) in the best one; images/s and MFU against the bf16
# matmul peak measured in the same run. Arguments go to bench/gpu.py (--help lists them).
#
#   bash bench/gpu.sh            # needs python3 with a CUDA build of torch; PYTHON=... to override
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
exec "${PYTHON:-python3}" bench/gpu.py "$@"
