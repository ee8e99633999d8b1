#!/usr/bin/env bash
# What a session that is lent one GPU runs, in one device call of at most 10 minutes with no network:
#   1. install tpfuse over the machine's own torch/triton (--no-deps, no build isolation),
#   2. check which python modules the steps need are there (the GPU image has torch and triton, no diffusers or
#      transformers),
#   3. build the csrc kernels, the GPU tests (Triton kernels on CUDA, csrc numerics, row-parallel overlap),
#   4. the benchmarks at a reduced sweep (kernels, overlap, meshes, model, torch.compile / CUDA graphs) and the sm_90
#      compile report, JSON + tables into ${OUT:-bench/results}.
# Every step runs under its own timeout and logs into $out/<step>.txt; a step whose modules are missing prints
# "<step>: skipped: <module> missing" instead of running, and a failing or timed-out step is reported in
# $out/summary.txt while the next one runs. The timeouts (plus the grace before a kill) add up to at most
# 9 minutes: tests/test_bench.py checks the sum.
# Usage on the device machine: bash bench/gpu_session.sh   (OUT is set by the device tool)
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-bench/results}"
mkdir -p "$out"
summary="$out/summary.txt"
: >"$summary"
date=$(date -u +%Y-%m-%d)
export PYTHONUNBUFFERED=1  # a step killed by its timeout still leaves the output it printed
KILL_AFTER=3               # seconds between the SIGINT at the timeout and a SIGKILL
missing=""                 # modules the preflight could not import; "cuda": torch sees no GPU
declare -A status_of=()    # step name -> ok, skipped, FAILED ..., TIMED OUT ...

# step NAME SECONDS "MODULES" COMMAND...: COMMAND under a timeout, unless one of MODULES is missing.
# SIGINT first, so pytest prints what it ran and the benchmarks stop like a Ctrl-C.
step() {
    local name=$1 limit=$2 modules=$3 m rc=0 start=$SECONDS status
    shift 3
    for m in $modules; do
        if [[ " $missing " == *" $m "* ]]; then
            echo "$name: skipped: $m missing" | tee -a "$summary"
            status_of[$name]=skipped
            return 0
        fi
    done
    echo "== $name (timeout ${limit}s): $*"
    timeout -s INT -k "$KILL_AFTER" "$limit" "$@" >"$out/$name.txt" 2>&1 || rc=$?
    tail -n 30 "$out/$name.txt"
    case $rc in
        0) status=ok ;;
        124 | 137) status="TIMED OUT after ${limit}s" ;;
        *) status="FAILED (exit $rc)" ;;
    esac
    status_of[$name]=$status
    echo "$name: $status in $((SECONDS - start))s" | tee -a "$summary"
}

step device 10 "" nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv
step install 27 "" python -m pip install --no-deps --no-build-isolation -q -e .
step preflight 17 "" python - torch triton pytest tpfuse.kernels diffusers <<'EOF'
import importlib
import sys

missing = []
for name in sys.argv[1:]:
    try:
        module = importlib.import_module(name)
        print(f"{name} {getattr(module, '__version__', '')}")
    except Exception as exc:  # a broken install is as missing as an absent one
        print(f"{name}: {type(exc).__name__}: {exc}")
        missing.append(name)
if "torch" not in missing:
    import torch

    if torch.cuda.is_available():
        print("cuda", torch.version.cuda, torch.cuda.get_device_name())
    else:
        missing.append("cuda")
print("missing:", " ".join(missing))
EOF
# No answer from the preflight (it failed or timed out): nothing is gated, each step fails on its own.
missing=$(sed -n 's/^missing: *//p' "$out/preflight.txt")
echo "missing modules: ${missing:-none}" | tee -a "$summary"

# `tpfuse` is python -m tpfuse.tp_layers.cli: the console script may be installed off PATH (a user install).
step build-csrc 45 "tpfuse.kernels cuda" python -m tpfuse.tp_layers.cli build-csrc
# --continue-on-collection-errors: a test file that cannot be imported here (say, it needs diffusers) is reported,
# and the other files still run.
step gpu-tests 97 "pytest tpfuse.kernels cuda" python -m pytest -q -p no:cacheprovider \
    --continue-on-collection-errors tests/test_kernels.py tests/test_csrc.py tests/test_row_parallel.py
# bench_kernels rewrites its JSON after every shape, so a timeout keeps the shapes it finished. The csrc columns
# only if the library built above: otherwise the benchmark would spend its time in nvcc again.
csrc=()
[[ ${status_of[build-csrc]} == ok ]] || csrc=(--no-csrc)
step bench-kernels 93 "tpfuse.kernels triton cuda" python bench/bench_kernels.py --presets klein-4b,dev \
    --tp 1,8 --tokens 512+4096 "${csrc[@]}" --out "$out/kernels-$date.json"
step bench-overlap 40 "tpfuse.kernels triton cuda" python bench/bench_overlap.py --presets klein-4b,dev --tp 2,8 \
    --out "$out/overlap-$date.json"
# Issue 24's meshes on one GPU: one rank's compute of a klein-4B double and single block for every sp x tp mesh of
# 2 and 8 GPUs (plain torch, CUDA graphs), plus the scaling model's communication, against its pure prediction.
step bench-mesh 50 "tpfuse.kernels triton cuda" python bench/bench_mesh.py --presets klein-4b --gpus 2,8 \
    --out "$out/mesh-$date.json"
# Not gated on diffusers: without it bench_model writes a JSON saying it skipped. Compiling the whole model does
# not fit this call.
step bench-model 20 "tpfuse.kernels cuda" python bench/bench_model.py --no-compile --out "$out/model-$date.json"
# Eager vs torch.compile vs reduce-overhead (CUDA graphs) of a klein-4B-shaped stack of TP blocks (regional
# compilation: one compile per block kind); the JSON is rewritten after each mode.
step bench-compile 65 "tpfuse.kernels triton cuda" python bench/bench_compile.py --out "$out/compile-$date.json"
step compile-report 30 "tpfuse.kernels triton" python -m tpfuse.tp_layers.cli compile-report --arch 90 \
    --json "$out/compile-report.json"
# The TP scaling model and its best meshes (CPU arithmetic, 2 s each), reading this session's kernel and overlap
# measurements.
step scaling-model 10 "" sh -c 'python bench/scaling_model.py --results "$1" --out "$1/scaling-model" &&
    python bench/scaling_model.py --meshes --results "$1" --out "$1/scaling-model"' sh "$out"

echo "== summary (${SECONDS}s)"
cat "$summary"
ls -la "$out"
