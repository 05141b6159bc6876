#!/usr/bin/env bash
# The checks that need the lent GPU, in one call (see benchmarks/README.md). Run from the repo
# root on the device machine with `.whl` carried: it holds the wheels of
# ../shared/tools/device-wheels.sh plus this project's own (`pip wheel --no-deps -w .whl .`).
# Every phase has its own time limit and writes its log and results under $OUT; together they
# stay under the device tool's 600 s per call (80 + 30 + 70 + 80 + 250 s, plus the install).
set -u
OUT=${OUT:-/tmp/gpu-out}
REPO=$(pwd)
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
cd /tmp  # import the installed wheel (the one being measured), not the checkout
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
} 2>&1 | tee "$OUT/env.txt"
phase() {  # name, seconds, command...
  local name=$1 limit=$2; shift 2
  echo "== $name (limit ${limit}s)"; local t0=$SECONDS
  timeout "$limit" "$@" >"$OUT/$name.txt" 2>&1; local rc=$?
  tail -n 40 "$OUT/$name.txt"; echo "== $name: exit $rc after $((SECONDS - t0))s"
}
phase tests "${TESTS_S:-80}" python3 -m pytest -q -p no:cacheprovider -o addopts="" \
  "$REPO/tests/test_kernels.py"
phase host 30 python3 -m megatron_dyt.kernels.bench_host --json "$OUT/host.json"
phase step "${STEP_S:-70}" python3 -m megatron_dyt.kernels.bench_step --json "$OUT/step.json"
# Generation tokens/s: the HF export vs a stock LlamaForCausalLM of its shape vs our decoder.
phase generate "${GEN_S:-80}" python3 "$REPO/benchmarks/gpu_generate.py" "$OUT/generate.json"
# Block sizes: tune ours on the two large shapes for at most TUNE_S seconds (the current
# defaults first), then the whole table with the choice. kernels.json is rewritten after every
# row, so a phase stopped at its limit still returns what it measured ("complete": false).
phase bench "${BENCH_S:-250}" python3 -m megatron_dyt.kernels.bench --tune \
  --tune-shapes 16384x4096,32768x8192 --tune-budget "${TUNE_S:-80}" --json "$OUT/kernels.json"
