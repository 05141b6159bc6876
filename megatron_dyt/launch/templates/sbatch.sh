#!/bin/bash
# {{HEADER}}
#SBATCH --job-name={{JOB_NAME}}
#SBATCH --nodes={{NODES}}
#SBATCH --ntasks-per-node={{TASKS_PER_NODE}}
{{SBATCH_OPTIONS}}#SBATCH --output={{RUN_DIR}}/logs/slurm-%j.out
#SBATCH --open-mode=append
# Pre-emption: USR1 {{SIGNAL_SECONDS}} s before the time limit makes every rank save a checkpoint
# and exit 0; the job then requeues itself and resumes from `latest`. `scontrol requeue` and
# `scancel --signal=USR1 JOB` take the same path.
#SBATCH --signal=USR1@{{SIGNAL_SECONDS}}
{{REQUEUE}}

set -uo pipefail
cd {{WORKDIR}}
RUN_DIR={{RUN_DIR}}
mkdir -p "$RUN_DIR/logs" "$RUN_DIR/launch"

# The resolved config, frozen at submission: a requeued job trains exactly the same run.
CONFIG="$RUN_DIR/launch/config-{{STAMP}}.yaml"
cat > "$CONFIG" <<'MEGATRON_DYT_CONFIG'
{{CONFIG_YAML}}MEGATRON_DYT_CONFIG

export OMP_NUM_THREADS={{OMP_THREADS}}
export PYTHONUNBUFFERED=1
export CUDA_DEVICE_MAX_CONNECTIONS=1       # megatron-core's TP/SP communication overlap
export TORCH_NCCL_ASYNC_ERROR_HANDLING=1   # a hung collective fails the job instead of idling
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
# Site-specific network settings go here, e.g. NCCL_SOCKET_IFNAME, NCCL_IB_HCA, FI_PROVIDER.

HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
PORT=$((20000 + SLURM_JOB_ID % 20000))
echo "[$(date -u +%FT%TZ)] job $SLURM_JOB_ID restart ${SLURM_RESTART_COUNT:-0}:" \
  "$SLURM_JOB_NUM_NODES node(s) $SLURM_JOB_NODELIST, head $HEAD_NODE:$PORT, git {{GIT}}"

{{LAUNCH}}
rc=$?

# Requeue when training stopped early with a checkpoint (USR1 near the time limit);
# a finished, diverged or failed run ends the job.
state=$({{PYTHON}} -c 'import json, sys; print(json.load(open(sys.argv[1]))["state"])' \
  "$RUN_DIR/status.json" 2>/dev/null || echo unknown)
echo "[$(date -u +%FT%TZ)] training exited with $rc, state: $state"
if [ "$rc" -eq 0 ] && [ "$state" = stopped ]{{REQUEUE_CONDITION}}; then
  echo "requeueing job $SLURM_JOB_ID to resume from the latest checkpoint"
  scontrol requeue "$SLURM_JOB_ID"
fi
exit "$rc"
