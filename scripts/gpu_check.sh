#!/usr/bin/env bash
# GPU self-check for one short GPU slot (H100/H200 class). Every step runs whatever the steps before it did,
# each under a time limit; the limits add up to 7 min 40 s, so the whole check ends within 8 minutes, with one
# summary table (step, status, seconds):
#   gpu_tests       140 s  pytest -m gpu: attention per SDPA backend, train steps in bf16 and fp16 + GradScaler,
#                          no host sync in an update, DDP over NCCL, a compiled step, exact resume on CUDA
#   demo            120 s  scripts/demo.py on CUDA (train, evaluate, fine-tune; fails below 95% top-1)
#   bench_eager      50 s  scripts/benchmark.py: Swin-T bf16 batch 128, ours vs timm and torchvision, train and
#                          inference, CUDA-event timing and per-contender peak memory (docs/BENCHMARKS.md)
#   bench_compiled  100 s  the same for ours and timm, torch.compile'd, training only (compiling is the cost)
#   bench_data       50 s  scripts/benchmark_data.py: timm vs DATA.LOADER fast / gpu end to end (docs/DATA.md)
# Status per step: ok, FAIL (exit code), timeout (its limit hit) or skipped. Exit status 0 when no step failed
# or timed out, else 1. Without a CUDA device it says so in one line and exits 0.
# Output: $GPU_CHECK_OUT (default gpu_check_output/): one log per step, the benchmark tables, summary.md.
# Testing the runner itself: GPU_CHECK_DRY_RUN=1 skips the CUDA probe and runs `true` for every step;
# GPU_CHECK_FAIL=<step> runs `false` for that step instead.
set -uo pipefail
if [ "${1:-}" = "-h" ] || [ "${1:-}" = "--help" ]; then
    echo "usage: bash scripts/gpu_check.sh    (no arguments; PYTHON and GPU_CHECK_OUT override the interpreter and"
    echo "       the output folder). Runs the gpu tests, the demo on CUDA and the benchmarks, each step whatever"
    echo "       the others did, in at most 8 minutes, and ends with a summary table."
    exit 0
fi
cd "$(dirname "$0")/.." || exit 1
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
DRY=${GPU_CHECK_DRY_RUN:-}
FAIL_STEP=${GPU_CHECK_FAIL:-}
if [ -z "$DRY" ] && ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "gpu_check: no CUDA device visible to torch; nothing to check here (the CPU suite is 'make test')"
    exit 0
fi
OUT=${GPU_CHECK_OUT:-gpu_check_output}
mkdir -p "$OUT"
if [ -z "$DRY" ]; then
    "$PY" -c 'import torch; p = torch.cuda.get_device_properties(0); print(f"gpu_check: {p.name}, {p.total_memory / 2**30:.0f} GiB; torch {torch.__version__}, CUDA {torch.version.cuda}")' \
        > "$OUT/device.txt" 2>&1
else
    echo "gpu_check: dry run (every step is 'true'${FAIL_STEP:+, $FAIL_STEP is 'false'})" > "$OUT/device.txt"
fi
cat "$OUT/device.txt"
start=$SECONDS
rows=()
failed=0

# step NAME LIMIT_SECONDS COMMAND...: run it with its output in $OUT/NAME.log (the last lines echoed), whatever
# happens record one summary row.
step() {
    local name=$1 limit=$2
    shift 2
    if [ -n "$DRY" ]; then
        set -- true
    fi
    if [ "$name" = "$FAIL_STEP" ]; then
        set -- false
    fi
    echo "== $name (limit ${limit} s)"
    local began=$SECONDS rc=0 status
    timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1 || rc=$?
    case $rc in
        0) status=ok ;;
        124|137) status=timeout; failed=1 ;;
        *) status="FAIL (exit $rc)"; failed=1 ;;
    esac
    tail -n 8 "$OUT/$name.log"
    rows+=("| $name | $status | $((SECONDS - began)) |")
}

skip() {
    echo "== $1: skipped ($2)"
    rows+=("| $1 | skipped: $2 | 0 |")
}

BENCH=(scripts/benchmark.py --device cuda --model tiny --batch-size 128 --dtypes bf16 --warmup 3 --rounds 5 --iters 5)
step gpu_tests 140 "$PY" -m pytest -q -m gpu tests
step demo 120 "$PY" scripts/demo.py --device cuda --data-path "$OUT/demo_data" --output "$OUT/demo_output" \
    --opts DATA.NUM_WORKERS 4
step bench_eager 50 "$PY" "${BENCH[@]}" --modes train infer --out "$OUT/bench_eager"
step bench_compiled 100 "$PY" "${BENCH[@]}" --modes train --impls ours timm --compile --out "$OUT/bench_compiled"
if [ -n "$DRY" ] || "$PY" -c 'import skimage' 2>/dev/null; then
    step bench_data 50 "$PY" scripts/benchmark_data.py --device cuda --workers 4 --rounds 2 --epochs 1 \
        --batch-size 128 --num-images 1024 --skip-stages --loaders timm fast gpu
else
    skip bench_data "scripts/benchmark_data.py makes its photos with scikit-image (pip install scikit-image)"
fi

{
    echo "## gpu_check summary ($((SECONDS - start)) s)"
    cat "$OUT/device.txt"
    echo
    echo "| step | status | seconds |"
    echo "|---|---|---|"
    printf '%s\n' "${rows[@]}"
    for kind in eager compiled; do
        if [ -f "$OUT/bench_$kind.md" ]; then
            echo
            echo "### Swin-T, bf16, batch 128, $kind"
            cat "$OUT/bench_$kind.md"
        fi
    done
} > "$OUT/summary.md"
echo
cat "$OUT/summary.md"
exit $failed
