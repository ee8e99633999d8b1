#!/usr/bin/env bash
# What a session that is lent one GPU runs (prepared so it fits a ~10-minute device call):
#   1. install tpfuse over the machine's own torch/triton (no network there: --no-deps, no build isolation),
#   2. the GPU tests (Triton kernels on CUDA, csrc numerics, row-parallel overlap with the real kernel),
#   3. the benchmarks at a reduced sweep, JSON + tables into ${OUT:-bench/results}.
# Usage on the device machine: bash bench/gpu_session.sh   (OUT is set by the device tool)
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-bench/results}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee "$out/device.txt"
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$out/device.txt"
pip install --no-deps --no-build-isolation -q -e . 2>&1 | tail -2
tpfuse build-csrc | tee -a "$out/device.txt"
timeout 240 python -m pytest -q -x tests/test_kernels.py tests/test_csrc.py tests/test_row_parallel.py \
    -p no:cacheprovider 2>&1 | tail -15 | tee "$out/gpu-tests.txt"
date=$(date -u +%Y-%m-%d)
timeout 180 python bench/bench_kernels.py --presets klein-4b,dev --tp 1,2,8 --tokens 512+4096 \
    --out "$out/kernels-$date.json" 2>&1 | tail -40
timeout 120 python bench/bench_overlap.py --presets klein-4b,dev --tp 2,8 --out "$out/overlap-$date.json" 2>&1 | tail -20
timeout 120 python bench/bench_model.py --out "$out/model-$date.json" 2>&1 | tail -10
ls -la "$out"
