#!/usr/bin/env bash
# GPU self-check (issue 11), meant to finish in under 10 minutes on one H100-class GPU:
#   1. the `gpu` tests (attention per SDPA backend, train steps in bf16 and fp16 + GradScaler, no host sync in an
#      update, DDP over NCCL, a compiled step, exact resume on CUDA);
#   2. the demo on CUDA (train, evaluate, fine-tune; it fails below 95% top-1);
#   3. scripts/benchmark.py --device cuda: Swin-T bf16 at batch 128, ours vs timm (and torchvision), eager and
#      compiled, train and inference, with peak memory; the markdown tables go to docs/BENCHMARKS.md by hand;
#   4. scripts/benchmark_data.py --device cuda: the input pipelines end to end on the GPU (docs/DATA.md).
# Without a CUDA device it says so and exits 0. Output lands in $GPU_CHECK_OUT (default gpu_check_output/).
set -euo pipefail
if [ "${1:-}" = "-h" ] || [ "${1:-}" = "--help" ]; then
    echo "usage: bash scripts/gpu_check.sh    (no arguments; PYTHON and GPU_CHECK_OUT override the interpreter and"
    echo "       the output folder). Runs the gpu tests, the demo on CUDA and the Swin-T bf16 benchmark."
    exit 0
fi
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "gpu_check: no CUDA device visible to torch; nothing to check here (the CPU suite is 'make test')"
    exit 0
fi
OUT=${GPU_CHECK_OUT:-gpu_check_output}
mkdir -p "$OUT"
"$PY" -c 'import torch; p = torch.cuda.get_device_properties(0); print(f"gpu_check: {p.name}, {p.total_memory / 2**30:.0f} GiB; torch {torch.__version__}, CUDA {torch.version.cuda}")' | tee "$OUT/device.txt"
start=$SECONDS

echo "== 1/4 gpu tests"
"$PY" -m pytest -q -m gpu tests 2>&1 | tee "$OUT/gpu_tests.log"

echo "== 2/4 demo on CUDA"
"$PY" scripts/demo.py --device cuda --data-path "$OUT/demo_data" --output "$OUT/demo_output" 2>&1 | tail -n 15 | tee "$OUT/demo.log"

echo "== 3/4 benchmark: Swin-T bf16, batch 128"
"$PY" scripts/benchmark.py --device cuda --model tiny --batch-size 128 --dtypes bf16 --modes train infer \
    --rounds 10 --out "$OUT/bench_eager" > "$OUT/bench_eager.log"
"$PY" scripts/benchmark.py --device cuda --model tiny --batch-size 128 --dtypes bf16 --modes train infer \
    --rounds 10 --compile --out "$OUT/bench_compiled" > "$OUT/bench_compiled.log"

echo "== 4/4 input pipelines (issue 13): timm vs DATA.LOADER fast / gpu, 4 workers, end to end on CUDA"
if "$PY" -c 'import skimage' 2>/dev/null; then
    "$PY" scripts/benchmark_data.py --device cuda --workers 4 --rounds 3 --batch-size 128 --skip-stages \
        --loaders timm fast gpu > "$OUT/bench_data.log" 2>&1 || echo "benchmark_data failed: see $OUT/bench_data.log"
else
    echo "skipped: scripts/benchmark_data.py makes its photos with scikit-image (pip install scikit-image)" \
        | tee "$OUT/bench_data.log"
fi

echo "== results ($((SECONDS - start)) s)"
cat "$OUT/device.txt"
for kind in eager compiled; do
    echo "### Swin-T, bf16, batch 128, $kind"
    cat "$OUT/bench_$kind.md"
done
cat "$OUT/bench_data.log"
