#!/usr/bin/env bash
# Everything that needs the lent GPU, in modes sized to one device command each (at most 600 s):
#
#   bash bench/gpu_check.sh headline [--dry-run]   # < 7 min: the 8B-shape engine benchmark (six
#                                                  #   configurations, graphs on, roofline measured in
#                                                  #   the same process) and a short step profile
#   bash bench/gpu_check.sh checks [--dry-run]     # < 5 min: graph replay, kernel tests compiled (fp32,
#                                                  #   fp16, bf16), conformance of the golden sets in fp32,
#                                                  #   the kernel benchmark
#   bash bench/gpu_check.sh extra [--dry-run]      # a later lease: device-step tests on CUDA, bf16
#                                                  #   conformance (information), logprobs/filters cost,
#                                                  #   MoE kernel benchmark, LLaDA2-mini and LLaDA-MoE
#                                                  #   engine rows, the eager profile
#
# Run from the repository root on the device machine. Each step runs under its own time limit
# (timeout, then a kill 3 s later); its output goes to the terminal and is appended to one log,
# $OUT/gpu_check.log, which starts with the versions (GPU, driver, torch, triton) and a hash of the
# code (the tree that travels has no .git). JSON files: bench_engine.json (headline),
# bench_engine_llada2.json and bench_engine_llada_moe.json (extra). A summary of the steps (limit,
# seconds taken, exit status) is printed last. `--dry-run` prints the plan and the sum of its limits
# and runs nothing; it exits 1 when the mode does not fit its target or one device command.
#
# The golden sets are in the tree (tests/golden), so they travel with it; LLADA_GOLDEN_DIR points at
# another folder of sets. A missing set is named and fails the conformance step. No wheels are installed:
# every step runs on the image's own packages (a carried .whl would only be appended to PYTHONPATH).
set -u

usage() { echo "usage: bash bench/gpu_check.sh headline|checks|extra [--dry-run]" >&2; exit 2; }
MODE=${1:-}
DRY=0
[ $# -ge 1 ] && shift
for a in "$@"; do
  case $a in --dry-run) DRY=1 ;; *) usage ;; esac
done
case $MODE in
  headline) TARGET=420 ;;  # the issue's "under 7 minutes"
  checks) TARGET=300 ;;    # "under 5 minutes"
  extra) TARGET=600 ;;     # one device command
  *) usage ;;
esac
COMMAND_LIMIT=600  # the most one device command may run
GRACE=3            # timeout --kill-after, per step

OUT=${OUT:-/tmp/llada-gpu}
LOG=$OUT/gpu_check.log
GOLDEN=${LLADA_GOLDEN_DIR:-tests/golden}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
PYTEST="python3 -m pytest -q -p no:cacheprovider -rfEs"

NAMES=() LIMITS=() CMDS=()
step() { NAMES+=("$1"); LIMITS+=("$2"); CMDS+=("$3"); }

step "versions" 10 "nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; \
python3 -c \"import sys, torch, triton; print('python', sys.version.split()[0], '| torch', torch.__version__, \
'(cuda', str(torch.version.cuda) + ') | triton', triton.__version__, '|', torch.cuda.get_device_name() \
if torch.cuda.is_available() else 'no CUDA device')\"; \
echo \"code: \$(cat kernels/*.py sampler/*.py weights/*.py bench/*.py | sha256sum | cut -c1-12) \
(sha256 of kernels, sampler, weights, bench .py files in name order)\""

case $MODE in
  headline)
    step "engine benchmark, 8B shape, bf16, graphs" 300 \
      "python3 -m bench.bench_engine --json $OUT/bench_engine.json"
    step "step profile, batch 1 and 64 (graphs)" 80 \
      "python3 -m bench.profile_step --cases 1:dual,64:dual --steps 10"
    ;;
  checks)
    step "graph replay equals eager (fp32, bf16), no refused capture" 80 \
      "LLADA_TEST_DEVICE=cuda $PYTEST -s tests/test_device_step.py -k cuda_graph_replay"
    step "kernel tests compiled (fp32, fp16, bf16), capture launch keys" 75 \
      "$PYTEST tests/test_kernels_attention.py tests/test_kernels_selection.py tests/test_kernels_moe.py tests/test_kernels_launch.py"
    step "conformance of the golden sets, CUDA, fp32 (pass/fail)" 50 \
      "python3 -m bench.conformance_sets --device cuda --dtype float32 --root $GOLDEN"
    step "kernel benchmark" 60 "python3 -m bench.bench_kernels --reps 10"
    ;;
  extra)
    step "device-step tests on CUDA" 90 "LLADA_TEST_DEVICE=cuda $PYTEST tests/test_device_step.py"
    step "conformance of the golden sets, CUDA, bf16 (information)" 50 \
      "python3 -m bench.conformance_sets --device cuda --dtype bfloat16 --root $GOLDEN"
    step "logprobs and filters: cost per step" 60 "python3 -m bench.bench_logprobs --device cuda"
    step "MoE kernel benchmark" 60 "python3 -m bench.bench_moe"
    step "engine benchmark, LLaDA2-mini shape" 120 \
      "python3 -m bench.bench_engine --shape llada2-mini --json $OUT/bench_engine_llada2.json"
    step "engine benchmark, LLaDA-MoE shape" 120 \
      "python3 -m bench.bench_engine --shape llada-moe --json $OUT/bench_engine_llada_moe.json"
    step "step profile, eager" 50 \
      "python3 -m bench.profile_step --no-cuda-graphs --cases 1:dual,64:dual --steps 10"
    ;;
esac

SUM=0
for l in "${LIMITS[@]}"; do SUM=$((SUM + l)); done
WORST=$((SUM + GRACE * ${#LIMITS[@]}))

golden_note() {
  local s missing=""
  for s in tiny-llada tiny-llada-moe tiny-llada2; do
    [ -f "$GOLDEN/$s/cases.json" ] || missing="$missing $s"
  done
  if [ -n "$missing" ]; then
    echo "golden sets: MISSING at $GOLDEN:$missing (they belong in the tree: tests/golden)"
  else
    echo "golden sets: present at $GOLDEN (they travel with the tree)"
  fi
}

if [ $DRY = 1 ]; then
  echo "plan: bash bench/gpu_check.sh $MODE  (nothing runs in a dry run)"
  for i in "${!NAMES[@]}"; do
    printf '%2d. %-62s %4d s\n    %s\n' $((i + 1)) "${NAMES[$i]}" "${LIMITS[$i]}" "${CMDS[$i]}"
  done
  [ $MODE != headline ] && golden_note
  json=$(printf '%s\n' "${CMDS[@]}" | grep -o -- '--json [^ ]*' | cut -d' ' -f2 | xargs echo)
  echo "files under \$OUT: $LOG${json:+ $json}"
  fit="fits"
  if [ $WORST -gt $TARGET ] || [ $WORST -gt $COMMAND_LIMIT ]; then fit="DOES NOT FIT"; fi
  echo "sum of limits: $SUM s; with ${GRACE} s kill grace per step: $WORST s; target $TARGET s, one device command $COMMAND_LIMIT s: $fit"
  [ "$fit" = fits ] && exit 0 || exit 1
fi

mkdir -p "$OUT"
[ -d .whl ] && echo "not installing .whl: no step needs it (the image's packages are used)" | tee -a "$LOG"
echo "=== gpu_check $MODE, $(date -u +%Y-%m-%dT%H:%M:%SZ), limits $SUM s (worst $WORST s)" | tee -a "$LOG"
[ $MODE != headline ] && golden_note | tee -a "$LOG"
RESULTS=()
FAILED=0
for i in "${!NAMES[@]}"; do
  name=${NAMES[$i]} limit=${LIMITS[$i]} cmd=${CMDS[$i]}
  echo "=== [$((i + 1))/${#NAMES[@]}] $name (limit $limit s)" | tee -a "$LOG"
  echo "\$ $cmd" | tee -a "$LOG"
  t0=$(date +%s.%N)
  timeout -k $GRACE "$limit" bash -c "$cmd" 2>&1 | tee -a "$LOG"
  rc=${PIPESTATUS[0]}
  dt=$(python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.1f}')" "$t0" "$(date +%s.%N)")
  status="ok"
  [ "$rc" != 0 ] && status="rc=$rc" && FAILED=1
  [ "$rc" = 124 ] || [ "$rc" = 137 ] && status="TIMED OUT"
  echo "=== $name: $status in $dt s" | tee -a "$LOG"
  RESULTS+=("$(printf '%-62s %4d s  %7s s  %s' "$name" "$limit" "$dt" "$status")")
done
{
  echo "=== summary: gpu_check $MODE (step, limit, taken, status)"
  printf '%s\n' "${RESULTS[@]}"
} | tee -a "$LOG"
exit $FAILED
