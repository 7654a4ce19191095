#!/usr/bin/env bash
# One full GPU pass, for a session that is lent a GPU: build the CUDA extension, run the gpu-marked tests and every
# benchmark, and write the JSON + logs into benchmarks/results/<date>-<gpu>-<commit>/ (or into $1 when given,
# e.g. the device tool's $OUT). liger-kernel is not on the device machine: carry its wheel (see README, "GPU").
# DALI is too large to carry, so decode.py there measures PIL only unless DALI is installed.
set -uo pipefail
cd "$(dirname "$0")/.."
gpu=$(python -c "import torch; print(torch.cuda.get_device_name().replace(' ', '_'))") || exit 1
dest=${1:-benchmarks/results/$(date -u +%Y-%m-%d)-${gpu}-$(git rev-parse --short HEAD 2>/dev/null || echo nogit)}
mkdir -p "$dest"
export PYTHONUNBUFFERED=1
SIF_CUDA_ARCH="${SIF_CUDA_ARCH:-9.0}" python setup.py build_ext --inplace > "$dest/build.log" 2>&1 || { tail -40 "$dest/build.log"; exit 1; }
report="$dest/report.md"  # every table and the test summary, one file (the device tool returns at most 8)
{ echo "# $gpu, $(date -u +%F), commit $(git rev-parse --short HEAD 2>/dev/null)"; nvidia-smi -L; } > "$report"
python -m pytest -q -m gpu tests 2>&1 | tee -a "$report"
python -m benchmarks.kernels --device cuda --out "$dest/kernels.json" 2>&1 | tee -a "$report"
python -m benchmarks.crop_boxes --device cuda --out "$dest/crop_boxes.json" 2>&1 | tee -a "$report"
python -m benchmarks.model --device cuda --out "$dest/model.json" 2>&1 | tee -a "$report"
python -m benchmarks.decode --out "$dest/decode.json" 2>&1 | tee -a "$report"
echo "results in $dest"
