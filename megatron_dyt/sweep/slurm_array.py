"""A sweep as one SLURM job array: the sbatch script, its submission, and requeueing a task.

Array task i runs `megatron-dyt sweep run-one SWEEP_DIR --index i`, which trains run i through
the same runner and folder state as a local sweep; so a pre-empted task only has to put itself
back in the queue, and resumes from the run's checkpoint. Submission is `launch.slurm`'s.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from megatron_dyt.launch.slurm import submit as sbatch
from megatron_dyt.sweep.spec import SweepError


def array_ranges(indices: Sequence[int]) -> str:
    """SLURM's --array list for these task ids, e.g. [0, 1, 2, 5, 7, 8] -> '0-2,5,7-8'."""
    parts: list[str] = []
    ids = sorted(set(indices))
    i = 0
    while i < len(ids):
        j = i
        while j + 1 < len(ids) and ids[j + 1] == ids[j] + 1:
            j += 1
        parts.append(str(ids[i]) if i == j else f"{ids[i]}-{ids[j]}")
        i = j + 1
    return ",".join(parts)


def _job_name(sweep_dir: Path) -> str:
    name = sweep_dir.name
    return name if name.startswith("sweep") else f"sweep-{name}"


def array_script(
    sweep_dir: str | Path,
    indices: Sequence[int],
    *,
    job_name: str | None = None,
    partition: str | None = None,
    account: str | None = None,
    time_limit: str | None = None,
    max_running: int | None = None,
    cpus_per_task: int | None = None,
    gpus_per_run: int = 0,
    nodes_per_run: int = 1,
    qos: str | None = None,
    extra: Sequence[str] = (),
    python: str | None = None,
    workdir: str | Path | None = None,
    retry_diverged: bool = False,
) -> str:
    """An sbatch script whose array task i trains run i of the sweep (`sweep run-one`), on
    `nodes_per_run` nodes with `gpus_per_run` GPUs (processes) in all; `extra` are raw
    `#SBATCH` options."""
    if not indices:
        raise SweepError("no runs to submit: every run of this sweep is done or diverged")
    if nodes_per_run > 1 and gpus_per_run % nodes_per_run:
        raise SweepError(
            f"--gpus-per-run {gpus_per_run} does not split over --nodes-per-run {nodes_per_run}:"
            " give a multiple of the nodes"
        )
    sweep_dir = Path(sweep_dir).resolve()
    array = array_ranges(indices) + (f"%{max_running}" if max_running else "")
    lines = [
        "#!/bin/bash",
        f"#SBATCH --job-name={job_name or _job_name(sweep_dir)}",
        f"#SBATCH --array={array}",
        f"#SBATCH --output={sweep_dir}/slurm/%A_%a.out",
        f"#SBATCH --chdir={Path(workdir or os.getcwd()).resolve()}",
        f"#SBATCH --nodes={nodes_per_run}",
        "#SBATCH --ntasks-per-node=1",
        # The trainer checkpoints on SIGUSR1; `run-one` passes it on from the batch shell and
        # then requeues the task, which resumes from that checkpoint.
        "#SBATCH --signal=B:USR1@120",
        "#SBATCH --requeue",
        "#SBATCH --open-mode=append",
    ]
    if partition:
        lines.append(f"#SBATCH --partition={partition}")
    if account:
        lines.append(f"#SBATCH --account={account}")
    if time_limit:
        lines.append(f"#SBATCH --time={time_limit}")
    if qos:
        lines.append(f"#SBATCH --qos={qos}")
    if cpus_per_task:
        lines.append(f"#SBATCH --cpus-per-task={cpus_per_task}")
    if gpus_per_run:
        lines.append(f"#SBATCH --gpus-per-node={gpus_per_run // nodes_per_run}")
    lines += [f"#SBATCH {option}" for option in extra]
    options = f" --nproc-per-run {gpus_per_run}" if gpus_per_run > 1 else ""
    options += f" --nodes-per-run {nodes_per_run}" if nodes_per_run > 1 else ""
    options += " --retry-diverged" if retry_diverged else ""  # submitted for it: the task must too
    lines += [
        "",
        "set -euo pipefail",
        'export OMP_NUM_THREADS="${SLURM_CPUS_PER_TASK:-1}"',
        f"exec {python or sys.executable} -m megatron_dyt sweep run-one {sweep_dir}"
        f' --index "$SLURM_ARRAY_TASK_ID"{options}',
        "",
    ]
    return "\n".join(lines)


def submit(script: str, sweep_dir: str | Path) -> str:
    """Write the script into the sweep folder and sbatch it; returns the job id."""
    (Path(sweep_dir) / "slurm").mkdir(parents=True, exist_ok=True)  # the tasks' log folder
    return sbatch(script, Path(sweep_dir) / "sweep.sbatch")


def requeue_array_task() -> None:
    """Under SLURM (pre-emption, the time limit's USR1): put this array task back in the queue;
    it resumes from the run's checkpoint when it starts again."""
    job, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if not (job and task):
        return
    print(f"requeueing array task {job}_{task} to resume from its checkpoint", flush=True)
    subprocess.run(["scontrol", "requeue", f"{job}_{task}"], check=False)
