#!/usr/bin/env bash
# Everything that needs the lent GPU, in one call: conformance on CUDA (fp32, and bf16 ids against
# fp32), the kernel and device-step tests compiled for the GPU (CUDA graph replay included), the
# kernel benchmark, the engine benchmark on the LLaDA-8B shape (graphs + one-step-late events, and
# the same configurations eager and synchronous), and the step profile (kernels, host and GPU time
# per step, with and without graphs). With BEFORE=<git rev> it also runs the engine benchmark and
# the profile of that revision first (the "before" table), from a worktree of it, in the same call.
# Prints the tables; writes logs and JSON under $OUT when set. Run from the repo root on the device:
#   bash bench/gpu_check.sh              # or: BEFORE=f3f8fbc bash bench/gpu_check.sh
set -uo pipefail
OUT=${OUT:-/tmp/llada-gpu}; mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONPATH=${PYTHONPATH:-$PWD} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
SHARED=shared; [ -d "$SHARED/golden" ] || SHARED=../shared

if [ -n "${BEFORE:-}" ]; then
  echo "== before: engine benchmark and profile at $BEFORE"
  git worktree add -f /tmp/llada-before "$BEFORE" >/dev/null 2>&1
  ( cd /tmp/llada-before && PYTHONPATH=/tmp/llada-before${PYTHONPATH:+:$PYTHONPATH} \
      timeout 420 python3 -m bench.bench_engine --json "$OUT/before_engine.json" 2>&1 | tee "$OUT/before_engine.txt"
    cp "$OLDPWD/bench/profile_step.py" bench/profile_step_now.py 2>/dev/null
    PYTHONPATH=/tmp/llada-before timeout 180 python3 -m bench.profile_step_now --no-cuda-graphs 2>&1 \
      | tee "$OUT/before_profile.txt" )
fi

echo "== conformance on CUDA"
for set in tiny-llada tiny-llada-moe tiny-llada2; do
  G=$SHARED/golden/$set
  [ -d "$G" ] || continue
  for dt in float32 bfloat16; do
    printf '%s %s: ' "$set" "$dt"
    timeout 120 python3 -m sampler.conformance --model "$G" --cases "$G/cases.json" --device cuda \
      --dtype "$dt" > "$OUT/conformance_${set}_$dt.txt" 2>&1
    tail -1 "$OUT/conformance_${set}_$dt.txt"
  done
done
echo "== exact parallel decoding on CUDA (draft depth 4, batched: graphs of buckets with draft rows)"
for set in tiny-llada tiny-llada-moe; do
  G=$SHARED/golden/$set
  [ -d "$G" ] || continue
  printf '%s float32 drafts: ' "$set"
  timeout 120 python3 -m sampler.conformance --model "$G" --cases "$G/cases.json" --device cuda \
    --dtype float32 --batched --draft-depth 4 > "$OUT/conformance_${set}_drafts.txt" 2>&1
  tail -2 "$OUT/conformance_${set}_drafts.txt" | tr '\n' ' '; echo
done
echo "== kernel and device-step tests on the GPU (no interpreter)"
TRITON_INTERPRET=0 LLADA_TEST_DEVICE=cuda timeout 420 python3 -m pytest -q -x -p no:cacheprovider \
  tests/test_kernels_attention.py tests/test_kernels_selection.py tests/test_kernels_moe.py \
  tests/test_device_step.py 2>&1 | tail -3
echo "== kernel benchmark"
timeout 300 python3 -m bench.bench_kernels 2>&1 | tee "$OUT/bench_kernels.txt"
echo "== logprobs and filters: what they cost a step (16 requests, 8B vocabulary, bf16)"
timeout 300 python3 -m bench.bench_logprobs --device cuda 2>&1 | tee "$OUT/bench_logprobs.txt"
echo "== engine benchmark (random 8B shape, bf16)"
timeout 600 python3 -m bench.bench_engine --json "$OUT/bench_engine.json" 2>&1 | tee "$OUT/bench_engine.txt"
echo "== MoE family: the grouped MoE kernel against the per-expert loop, engine on LLaDA2-mini and LLaDA-MoE shapes"
timeout 300 python3 -m bench.bench_moe 2>&1 | tee "$OUT/bench_moe.txt"
timeout 600 python3 -m bench.bench_engine --shape llada2-mini --json "$OUT/bench_engine_llada2.json" 2>&1 \
  | tee "$OUT/bench_engine_llada2.txt"
timeout 600 python3 -m bench.bench_engine --shape llada-moe --json "$OUT/bench_engine_llada_moe.json" 2>&1 \
  | tee "$OUT/bench_engine_llada_moe.txt"
echo "== step profile (graphs, then eager)"
timeout 240 python3 -m bench.profile_step 2>&1 | tee "$OUT/profile.txt"
timeout 240 python3 -m bench.profile_step --no-cuda-graphs 2>&1 | tee "$OUT/profile_eager.txt"
