#!/usr/bin/env bash
# Everything that needs the lent GPU, in one call: conformance on CUDA, the kernel tests on the
# GPU, the kernel benchmark and the engine benchmark on the LLaDA-8B shape. Prints the tables;
# writes logs and JSON under $OUT when set. Run from the repo root on the device machine:
#   bash bench/gpu_check.sh
set -uo pipefail
OUT=${OUT:-/tmp/llada-gpu}; mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONPATH=${PYTHONPATH:-$PWD} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
G=${GOLDEN:-shared/golden/tiny-llada}; [ -d "$G" ] || G=../shared/golden/tiny-llada
echo "== conformance on CUDA (fp32, fp64)"
python3 -m sampler.conformance --model "$G" --cases "$G/cases.json" --device cuda --dtype float32 | tail -1
python3 -m sampler.conformance --model "$G" --cases "$G/cases.json" --device cuda --dtype float64 | tail -1
echo "== kernel tests on the GPU (no interpreter)"
TRITON_INTERPRET=0 LLADA_TEST_DEVICE=cuda timeout 300 python3 -m pytest -q -x tests/test_kernels_attention.py tests/test_kernels_selection.py 2>&1 | tail -3
echo "== kernel benchmark"
timeout 300 python3 -m bench.bench_kernels 2>&1 | tee "$OUT/bench_kernels.txt"
echo "== engine benchmark (random 8B shape, bf16)"
timeout 420 python3 -m bench.bench_engine --json "$OUT/bench_engine.json" 2>&1 | tee "$OUT/bench_engine.txt"
