#!/usr/bin/env bash
# `megatron-dyt train` on the lent GPU, in one call (see benchmarks/README.md): short runs of the
# real trainer on the TinyLlama-1.1B shape, one process each, results merged into
# $OUT/train.json after every run; the compiled plain-loop anchor, a resume from step 10, the
# gradient-accumulation numerics and the Markdown table ($OUT/train.md) in the same call.
# Budget (defaults): wheels ~40 s, data 60, anchor 100, 4 runs x 100 + resume 60, accum 2 x 45:
# at most ~12 min if every phase hits its limit; ~8 min expected. Trim VARIANTS to fit. Run from the repo root with `.whl` carried (the wheels of
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
JSON="$OUT/train.json"
phase data "${DATA_S:-60}" python3 "$HERE/gpu_train.py" data --cache "$CACHE"
# the anchor: the plain loop (no DeepSpeed) of the same model, whole model under torch.compile
phase anchor "${ANCHOR_S:-100}" python3 -m megatron_dyt.kernels.bench_step --compile \
  --variants dyt-triton --steps 15 --json "$JSON"
FIRST=1
for v in ${VARIANTS:-dyt-triton-z1 rmsnorm-z1 dyt-triton-z1-eager rmsnorm-z1-eager}; do
  # the first run also saves at step 10, which `resume` restarts from
  SAVE=0; [ "$FIRST" = 1 ] && SAVE=10
  phase "$v" "${RUN_S:-100}" python3 "$HERE/gpu_train.py" run "$v" --cache "$CACHE" \
    --json "$JSON" --steps "${STEPS:-25}" --save-at "$SAVE"
  if [ "$FIRST" = 1 ]; then
    phase "resume-$v" "${RESUME_S:-60}" python3 "$HERE/gpu_train.py" resume "$v" \
      --cache "$CACHE" --json "$JSON"
    FIRST=0
  fi
  rm -rf "$CACHE/runs/$v"  # the checkpoints: disk is small
done
for a in ${ACCUM:-fp32 bf16}; do
  phase "accum-$a" "${ACCUM_S:-45}" python3 "$HERE/gpu_train.py" accum --zero 2 --accum "$a" \
    --json "$JSON"
done
python3 "$HERE/gpu_train.py" table "$JSON" | tee "$OUT/train.md"
