#!/usr/bin/env bash
# `megatron-dyt train` on the lent GPU, in one call (see benchmarks/README.md): short runs of the
# real trainer on the TinyLlama-1.1B shape, one process each, results merged into
# $OUT/train.json after every run. Run from the repo root with `.whl` carried (the wheels of
# ../shared/tools/device-wheels.sh plus this project's own). VARIANTS and the phase limits are
# environment variables, so one call fits what is left of the device time.
set -u
OUT=${OUT:-/tmp/gpu-out}
HERE=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
cd /tmp  # import the installed wheel (the one being measured), not the checkout
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, triton, deepspeed; print('torch', torch.__version__, 'triton',
  triton.__version__, 'deepspeed', deepspeed.__version__)"
} 2>&1 | tee "$OUT/env.txt"
phase() {  # name, seconds, command...
  local name=$1 limit=$2; shift 2
  echo "== $name (limit ${limit}s)"; local t0=$SECONDS
  timeout "$limit" "$@" >"$OUT/$name.txt" 2>&1; local rc=$?
  grep -v "Warning\|warnings.warn" "$OUT/$name.txt" | tail -n 12
  echo "== $name: exit $rc after $((SECONDS - t0))s"
}
CACHE=/tmp/gpu-train-cache
phase data "${DATA_S:-60}" python3 "$HERE/gpu_train.py" data --cache "$CACHE"
for v in ${VARIANTS:-dyt-triton-z1 rmsnorm-z1 dyt-triton-z1-eager rmsnorm-z1-eager}; do
  phase "$v" "${RUN_S:-110}" python3 "$HERE/gpu_train.py" run "$v" --cache "$CACHE" \
    --json "$OUT/train.json" --steps "${STEPS:-25}"
  rm -rf "$CACHE/runs/$v"  # the checkpoint: disk is small
done
