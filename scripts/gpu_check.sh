#!/usr/bin/env bash
# One prepared check on a CUDA machine, sized for a short lease (about 9 minutes on one H100/H200):
#   A. correctness, run side by side: the CUDA tests (tests/test_cuda.py and the CUDA<->CPU checkpoint
#      test), a debug training run with bf16 + compile that is then resumed, a data-parallel run through
#      torchrun with the NCCL backend, and the clear error of --parallel 2 on one GPU;
#   B. benchmarks one at a time (nothing else on the GPU): size S and XL, vector and image
#      observations, float32 and bf16, eager, CUDA graphs and compiled (GPU_CHECK_BENCHES picks),
#   C. a real training run's speed.
# Logs go to /tmp/gpu_check/*.log and are packed into $OUT/logs.tgz after every step; the summary
# (one line per step, every bench figure) is $OUT/summary.txt and the end of stdout.
#
#     OUT=./gpu_out bash scripts/gpu_check.sh            # on any CUDA machine
#     GPU_CHECK_SECONDS=270 GPU_CHECK_BENCHES="S_vec_fp32_graphs S_img_fp32_eager" bash scripts/gpu_check.sh
#     GPU_CHECK_PARTS="B" ...   # only some of the parts A, B, C (default: all three)
#
# Python packages missing on the machine can travel as wheels in .whl/ (installed to /tmp/site).
set -u
OUT=${OUT:-$PWD/gpu_out}
BUDGET=${GPU_CHECK_SECONDS:-540}   # the whole script ends by then: later steps are skipped
DEV=${GPU_CHECK_DEVICE:-cuda}       # cpu: a dry run of the plumbing on a machine without a GPU
LOGS=/tmp/gpu_check
mkdir -p "$OUT" "$LOGS"
export PYTHONUNBUFFERED=1 CI=1
START=$(date +%s)
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONPATH=${PYTHONPATH:-$PWD}

left() { echo $(( BUDGET - ($(date +%s) - START) )); }
pack() { tar -czf "$OUT/logs.tgz" --exclude='*.pt' --exclude=replay --exclude='events.*' -C "$LOGS" . 2>/dev/null; }
note() { echo "$*" | tee -a "$OUT/summary.txt"; }

# step NAME LIMIT CMD...: run CMD with a time limit (shortened to what is left), log its output.
step() {
  local name=$1 limit=$2; shift 2
  local rest; rest=$(left)
  if (( rest < 20 )); then note "$name: SKIPPED (out of time)"; return; fi
  (( limit > rest )) && limit=$rest
  local t0; t0=$(date +%s)
  timeout "$limit" "$@" > "$LOGS/$name.log" 2>&1
  local rc=$?
  note "$name: rc=$rc in $(( $(date +%s) - t0 ))s (limit ${limit}s)"
  pack
}

note "== machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee -a "$OUT/summary.txt"
python3 -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available() and torch.cuda.get_device_name(0))" 2>&1 | tee -a "$OUT/summary.txt"
nproc | sed 's/^/cpu cores: /' | tee -a "$OUT/summary.txt"

PARTS=" ${GPU_CHECK_PARTS:-A B C} "
part() { [[ $PARTS == *" $1 "* ]]; }

if part A; then
note "== A. correctness (side by side)"
RUN=(python3 dreamer.py --configs debug custom --task custom_reach --device $DEV --eval_every 0 --save_every_minutes 0)
step pytest_cuda "${GPU_CHECK_A_LIMIT:-240}" python3 -m pytest -q -n 0 -p no:cacheprovider tests/test_cuda.py \
  tests/test_resume.py::test_checkpoint_moves_between_cuda_and_cpu &
step train_bf16_compile_graphs "${GPU_CHECK_A_LIMIT:-240}" bash -c "${RUN[*]} --logdir $LOGS/run --precision bf16 --compile True \
  --cuda_graphs True --steps 600 && ${RUN[*]} --logdir $LOGS/run --precision bf16 --compile True --cuda_graphs True \
  --steps 1000 && grep -h 'resumed from' $LOGS/run/train.log" &
step torchrun_nccl "${GPU_CHECK_A_LIMIT:-240}" python3 -m torch.distributed.run --standalone --nproc_per_node 1 dreamer.py --configs debug custom \
  --task custom_reach --device $DEV --eval_every 0 --logdir "$LOGS/ddp" --steps 600 &
step parallel2_one_gpu 120 "${RUN[@]}" --logdir "$LOGS/p2" --parallel 2 &
wait
grep -h "passed\|failed\|error" "$LOGS/pytest_cuda.log" | tail -3 | sed 's/^/  pytest: /' | tee -a "$OUT/summary.txt"
grep -h "resumed from\|Error\|error\|cuda_graphs: capturing" "$LOGS/train_bf16_compile_graphs.log" | tail -3 | sed 's/^/  train: /' | tee -a "$OUT/summary.txt"
grep -h "parallel:\|training on\|capturing\|Error\|error" "$LOGS/torchrun_nccl.log" | tail -4 | sed 's/^/  torchrun: /' | tee -a "$OUT/summary.txt"
grep -h "GPUs\|rror" "$LOGS/parallel2_one_gpu.log" | tail -2 | sed 's/^/  parallel 2: /' | tee -a "$OUT/summary.txt"
fi

if part B; then
note "== B. benchmarks, batch 16 x 64, one at a time"
bench() {  # bench NAME LIMIT ARGS... (run from $BENCH_DIR: this checkout, or the baseline's)
  local name=$1 limit=$2; shift 2
  step "bench_$name" "$limit" bash -c 'cd "$0" && exec python3 scripts/bench.py "$@"' "${BENCH_DIR:-.}" \
    --batch_size 16 --batch_length 64 --device $DEV --iters 20 --json "$LOGS/bench_$name.json" "$@"
  grep -h "^seconds_per_update\|^world_model\|^behavior\|^gflops\|^cuda_max\|^policy_steps\|kernels_per_update\|Error" \
    "$LOGS/bench_$name.log" | tr '\n' ' ' | sed "s/^/  $name: /" | tee -a "$OUT/summary.txt"
  echo | tee -a "$OUT/summary.txt"
}
# NAME LIMIT ARGS: vec = dmc_proprio sizes (vector observations), img = dmc_vision (64x64 images);
# graphs = CUDA graphs (the default mode), compiled = --compile True, eager = neither. Most telling
# first, so a short budget measures the modes users run: the whole table takes ~25 minutes.
BENCH_TABLE='
S_vec_fp32_compiled_graphs 180 --configs dmc_proprio --compile True --cuda_graphs True
S_vec_fp32_compiled 180 --configs dmc_proprio --compile True --cuda_graphs False --profile /tmp/gpu_check/profile_S_vec_compiled.txt
S_img_fp32_compiled_graphs 180 --configs dmc_vision --compile True --cuda_graphs True
S_vec_fp32_graphs 90 --configs dmc_proprio --cuda_graphs True
S_img_fp32_graphs 90 --configs dmc_vision --cuda_graphs True
XL_vec_fp32_compiled_graphs 180 --configs dmc_proprio size_xl --compile True --cuda_graphs True
XL_img_bf16_compiled_graphs 180 --configs dmc_vision size_xl --precision bf16 --compile True --cuda_graphs True
S_vec_bf16_compiled_graphs 180 --configs dmc_proprio --precision bf16 --compile True --cuda_graphs True
S_img_bf16_compiled_graphs 180 --configs dmc_vision --precision bf16 --compile True --cuda_graphs True
S_vec_fp32_eager 90 --configs dmc_proprio --cuda_graphs False --profile /tmp/gpu_check/profile_S_vec_eager.txt
S_img_fp32_eager 90 --configs dmc_vision --cuda_graphs False
S_vec_bf16_graphs 90 --configs dmc_proprio --precision bf16 --cuda_graphs True
S_img_bf16_graphs 90 --configs dmc_vision --precision bf16 --cuda_graphs True
XL_vec_fp32_graphs 90 --configs dmc_proprio size_xl --cuda_graphs True
XL_vec_bf16_graphs 90 --configs dmc_proprio size_xl --precision bf16 --cuda_graphs True
XL_img_bf16_graphs 90 --configs dmc_vision size_xl --precision bf16 --cuda_graphs True
XL_img_bf16_eager 90 --configs dmc_vision size_xl --precision bf16 --cuda_graphs False
'
# GPU_CHECK_BENCHES="S_vec_fp32_graphs S_img_fp32_eager": run only these, in this order (default: the whole table).
names=${GPU_CHECK_BENCHES:-$(echo "$BENCH_TABLE" | awk 'NF {print $1}')}
# A name "base_ROW" runs ROW's benchmark from GPU_CHECK_BASE, a copy of an earlier version of the repo
# carried along (e.g. `git archive HEAD | tar -x -C .ab`), for a side-by-side figure on the same card.
for name in $names; do
  row=$(echo "$BENCH_TABLE" | awk -v n="${name#base_}" '$1 == n')
  [ -z "$row" ] && { note "bench $name: not in the table"; continue; }
  BENCH_DIR=.
  if [[ $name == base_* ]]; then
    [ -d "${GPU_CHECK_BASE:-}" ] || { note "bench $name: GPU_CHECK_BASE is not a folder"; continue; }
    BENCH_DIR=$(cd "$GPU_CHECK_BASE" && pwd); row="$name ${row#* }"
  fi
  # shellcheck disable=SC2086
  bench $row
done
fi

if part C; then
note "== C. a real training run's speed (custom_reach, size S, bf16)"
step train_speed 120 python3 dreamer.py --configs custom --task custom_reach --device $DEV --precision bf16 \
  --logdir "$LOGS/speed" --steps 6000 --eval_every 0 --log_every 1000
grep -h "fps\|updates" "$LOGS/train_speed.log" | tail -3 | sed 's/^/  speed: /' | tee -a "$OUT/summary.txt"
fi
note "== done in $(( $(date +%s) - START ))s"
pack
