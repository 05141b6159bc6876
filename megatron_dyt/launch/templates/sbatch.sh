#!/bin/bash
# {{HEADER}}
#SBATCH --job-name={{JOB_NAME}}
#SBATCH --nodes={{NODES}}
#SBATCH --ntasks-per-node={{TASKS_PER_NODE}}
{{SBATCH_OPTIONS}}#SBATCH --output={{RUN_DIR}}/logs/slurm-%j.out
#SBATCH --open-mode=append
# Pre-emption: USR1 {{SIGNAL_SECONDS}} s before the time limit makes every rank save a checkpoint
# and exit 0; the job then requeues itself and resumes from `latest`. `scontrol requeue` and
# `scancel --signal=USR1 JOB` take the same path. A crash (a lost node, an NCCL time-out, a killed
# process) requeues too, at most {{MAX_REQUEUES}} times in a row without progress.
# USR1's lead: {{SIGNAL_WHY}}.
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

# The CPUs of each task (all of the node's under --exclusive) shared by the processes it starts;
# srun does not inherit --cpus-per-task from sbatch on every SLURM version, so it is passed on.
CPUS=${SLURM_CPUS_PER_TASK:-${SLURM_CPUS_ON_NODE:-{{PROCS_PER_TASK}}}}
export SRUN_CPUS_PER_TASK=$CPUS
THREADS=$((CPUS / {{PROCS_PER_TASK}}))
export OMP_NUM_THREADS=$((THREADS > 0 ? THREADS : 1))
export PYTHONUNBUFFERED=1
export CUDA_DEVICE_MAX_CONNECTIONS=1       # megatron-core's TP/SP communication overlap
export TORCH_NCCL_ASYNC_ERROR_HANDLING=1   # a hung collective fails the job instead of idling
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
# Compiled kernels cached on each node's local disk, not in a shared $HOME all ranks write to.
LOCAL_CACHE=${SLURM_TMPDIR:-${TMPDIR:-/tmp}}/megatron-dyt-$SLURM_JOB_ID
export TRITON_CACHE_DIR=$LOCAL_CACHE/triton TORCHINDUCTOR_CACHE_DIR=$LOCAL_CACHE/inductor
{{ENV}}{{SETUP}}
# The rendezvous runs on the node this script runs on (the job's first): a port the system
# hands out free there, not one derived from the job id that another job may hold.
HEAD_NODE=${SLURMD_NODENAME:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}
PORT=$({{PYTHON}} -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])')
echo "[$(date -u +%FT%TZ)] job $SLURM_JOB_ID restart ${SLURM_RESTART_COUNT:-0}:" \
  "$SLURM_JOB_NUM_NODES node(s) $SLURM_JOB_NODELIST, head $HEAD_NODE:$PORT, git {{GIT}}"

latest() { cat "$RUN_DIR/checkpoints/latest" 2>/dev/null || echo none; }
LATEST_BEFORE=$(latest)

{{LAUNCH}}
rc=$?

# Requeue (resuming from `latest`) when training stopped early with a checkpoint (USR1 near
# the time limit), or crashed; a crash counts against MAX_REQUEUES unless the run got further
# than the last time. Finished and diverged runs, and bad input (exit 2: a config or file error
# fails the same way every time), end the job.
state=$({{PYTHON}} -c 'import json, sys; print(json.load(open(sys.argv[1]))["state"])' \
  "$RUN_DIR/status.json" 2>/dev/null || echo unknown)
echo "[$(date -u +%FT%TZ)] training exited with $rc, state: $state, checkpoint $(latest)"
FAILS_FILE="$RUN_DIR/launch/failed-requeues-$SLURM_JOB_ID"
FAILS=$(cat "$FAILS_FILE" 2>/dev/null || echo 0)
[ "$(latest)" != "$LATEST_BEFORE" ] && FAILS=0  # it saved a newer checkpoint: progress
if [ "$rc" -eq 0 ] && [ "$state" = stopped ]{{REQUEUE_CONDITION}}; then
  echo 0 >"$FAILS_FILE"
  echo "requeueing job $SLURM_JOB_ID to resume from the latest checkpoint"
  scontrol requeue "$SLURM_JOB_ID"
elif [ "$rc" -ne 0 ] && [ "$rc" -ne 2 ] && [ "$state" != finished ] && [ "$state" != diverged ]{{REQUEUE_CONDITION}}; then
  if [ "$FAILS" -lt {{MAX_REQUEUES}} ]; then
    echo $((FAILS + 1)) >"$FAILS_FILE"
    echo "training failed (exit $rc); requeueing job $SLURM_JOB_ID to resume from the latest" \
      "checkpoint (failed requeue $((FAILS + 1)) of {{MAX_REQUEUES}})"
    scontrol requeue "$SLURM_JOB_ID"
  else
    echo "training failed (exit $rc) {{MAX_REQUEUES}} requeue(s) in a row without progress:" \
      "not requeueing again; the reason is above in this log"
  fi
fi
exit "$rc"
