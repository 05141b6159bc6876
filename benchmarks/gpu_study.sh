#!/usr/bin/env bash
# The α₀ and norm study (configs/studies/alpha-width.yaml, docs/design.md §14) on the lent GPU in
# one call (see benchmarks/README.md): 108 short runs of `megatron-dyt train`, PARALLEL (16) at a
# time on the one GPU (one CPU core each), then the study report. Everything that comes back is
# under $OUT: study-<device>.json (every run's losses and per-layer norm statistics, the
# findings), report.md and report/ (figures), runs.tar.gz (metrics.jsonl, sweep.json and
# status.json of every run; no checkpoints), env.txt and one log per phase.
# Budget (defaults): wheels ~40 s, data 90, sweep 300 (SWEEP_S), report 60: under 8 minutes.
# A sweep stopped at its limit reports what finished; seeds are the plan's outer loop, so the
# first seeds are whole. Run from the repo root with `.whl` carried (the wheels of
# ../shared/tools/device-wheels.sh plus this project's own: `pip wheel --no-deps -w .whl .`).
set -u
OUT=${OUT:-/tmp/gpu-out}
REPO=$(pwd)
HERE=$REPO/benchmarks
SPEC=${SPEC:-$REPO/configs/studies/alpha-width.yaml}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
WORK=/tmp/study  # the runs' data.cache_dir (.cache/megatron-dyt) is relative to it
mkdir -p "$WORK" && cd "$WORK"  # import the installed wheel, not the checkout
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; nproc; df -h /tmp
  python3 -c "import torch, triton, deepspeed; print('torch', torch.__version__, 'triton',
  triton.__version__, 'deepspeed', deepspeed.__version__)"
} 2>&1 | tee "$OUT/env.txt"
phase() {  # name, seconds, command...
  local name=$1 limit=$2; shift 2
  echo "== $name (limit ${limit}s)"; local t0=$SECONDS
  timeout -k 30 "$limit" "$@" >"$OUT/$name.txt" 2>&1; local rc=$?
  grep -v "Warning\|warnings.warn" "$OUT/$name.txt" | tail -n 15
  echo "== $name: exit $rc after $((SECONDS - t0))s"
}
phase data "${DATA_S:-90}" python3 "$HERE/gpu_study.py" data --cache "$WORK/.cache/megatron-dyt"
python3 "$HERE/gpu_study.py" prune "$WORK/sweep" --every 5 >"$OUT/prune.txt" 2>&1 &
PRUNE=$!
T0=$SECONDS
phase sweep "${SWEEP_S:-300}" python3 -m megatron_dyt sweep run "$SPEC" --out "$WORK/sweep" \
  --parallel "${PARALLEL:-16}" --no-progress
SWEEP_SECONDS=$((SECONDS - T0))
kill "$PRUNE" 2>/dev/null
python3 "$HERE/gpu_study.py" prune "$WORK/sweep" --once
phase report "${REPORT_S:-60}" python3 "$HERE/gpu_study.py" collect "$WORK/sweep" "$OUT" \
  --spec "${SPEC#"$REPO"/}" --sweep-seconds "$SWEEP_SECONDS"
du -sh "$OUT"
