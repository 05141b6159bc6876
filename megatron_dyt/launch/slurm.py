"""`megatron-dyt launch slurm`: render an sbatch script for a training run and submit it.

One task per node runs torchrun (through `megatron_dyt.launch.node`, which passes pre-emption
signals on) with a c10d rendezvous on the job's first node; `--launcher srun` starts one task
per GPU instead, with ranks from SLURM_PROCID / SLURM_LOCALID. The script freezes the resolved
config, logs to `<run>/logs/slurm-<job>.out`, and requeues itself when training stopped early
on USR1, so a pre-empted or time-limited run resumes from its latest checkpoint on its own.
"""

from __future__ import annotations

import datetime
import json
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from megatron_dyt.config import Config
from megatron_dyt.errors import MegatronDyTError
from megatron_dyt.launch import preflight
from megatron_dyt.launch.layout import JobLayout, job_layout
from megatron_dyt.launch.preflight import signal_lead


@dataclass
class SlurmOptions:
    nodes: int = 1
    gpus_per_node: int = 8
    procs_per_node: int | None = None  # default: gpus_per_node (required with no GPUs)
    launcher: str = "torchrun"  # or "srun"
    partition: str | None = None
    account: str | None = None
    time: str | None = None
    qos: str | None = None
    cpus_per_task: int | None = None  # default: all of the node's under --exclusive
    mem: str | None = None  # default: "0" (all of the node's) under --exclusive
    exclusive: bool | None = None  # default: on for GPU nodes
    job_name: str | None = None
    signal_seconds: int | None = None  # default: `signal_lead` of the run folder
    requeue: bool = True
    max_requeues: int = 3  # requeues after a crash in a row without a newer checkpoint
    env: list[str] = field(default_factory=list)  # KEY=VALUE exported before the launch
    setup: Path | None = None  # shell lines run before the launch (modules, conda, NCCL)
    extra: list[str] = field(default_factory=list)  # raw `#SBATCH` options

    @property
    def is_exclusive(self) -> bool:
        return self.gpus_per_node > 0 if self.exclusive is None else self.exclusive

    @property
    def procs(self) -> int:
        if self.procs_per_node is not None:
            return self.procs_per_node
        if self.gpus_per_node < 1:
            raise SlurmError(
                "--gpus-per-node=0 (a CPU cluster) needs --nproc-per-node N: how many training"
                " processes to start on each node"
            )
        return self.gpus_per_node


class SlurmError(MegatronDyTError, ValueError):
    """Submission cannot go ahead (no sbatch, sbatch refused); the message says why."""


def git_revision() -> str:
    """The project's git commit (+"-dirty"), or "unknown" outside a checkout."""
    root = Path(__file__).resolve().parents[2]
    try:
        rev = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return rev + ("-dirty" if dirty else "")


def _sbatch_options(opts: SlurmOptions) -> str:
    lines = []
    if opts.gpus_per_node > 0:
        lines.append(f"--gpus-per-node={opts.gpus_per_node}")
    if opts.is_exclusive:
        lines.append("--exclusive")
    if opts.cpus_per_task:
        lines.append(f"--cpus-per-task={opts.cpus_per_task}")
    mem = opts.mem if opts.mem is not None else ("0" if opts.is_exclusive else None)
    if mem is not None:
        lines.append(f"--mem={mem}")
    for name in ("partition", "account", "time", "qos"):
        value = getattr(opts, name)
        if value:
            lines.append(f"--{name}={value}")
    lines += opts.extra
    return "".join(f"#SBATCH {line}\n" for line in lines)


def _env_lines(pairs: list[str]) -> str:
    """`export KEY=VALUE` per `--env`, the value quoted as given."""
    lines = []
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.isidentifier():
            raise SlurmError(f"--env {pair!r}: expected KEY=VALUE with KEY a shell variable name")
        lines.append(f"export {key}={shlex.quote(value)}\n")
    return "".join(lines)


def _setup_lines(path: Path | None) -> str:
    """The `--setup` file's lines, copied into the script (a requeued job runs what was
    submitted, whatever the file holds by then)."""
    if path is None:
        return ""
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise SlurmError(f"--setup {path}: cannot read it ({exc.__class__.__name__})") from None
    return f"# --setup {path}\n{text.rstrip()}\n# end of --setup\n"


def _launch_command(opts: SlurmOptions, layout: JobLayout, python: str) -> str:
    train = '-m megatron_dyt.cli train "$CONFIG" --run-dir "$RUN_DIR" --no-progress'
    if opts.launcher == "torchrun":
        return (
            "srun --ntasks-per-node=1 --kill-on-bad-exit=1 \\\n"
            f"  {python} -m megatron_dyt.launch.node \\\n"
            f'    --nnodes="$SLURM_JOB_NUM_NODES" --nproc-per-node={layout.procs_per_node} \\\n'
            '    --rdzv-backend=c10d --rdzv-endpoint="$HEAD_NODE:$PORT"'
            ' --rdzv-id="$SLURM_JOB_ID" \\\n'
            f"    --max-restarts=0 {train}"
        )
    return (
        'export MASTER_ADDR="$HEAD_NODE" MASTER_PORT="$PORT" CONFIG RUN_DIR\n'
        f"srun --ntasks-per-node={layout.procs_per_node} --kill-on-bad-exit=1 bash -c '\n"
        "  export RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID WORLD_SIZE=$SLURM_NTASKS\n"
        f"  exec {python} {train}'"
    )


def render(
    cfg: Config,
    run_dir: Path,
    opts: SlurmOptions,
    workdir: Path | None = None,
    python: str | None = None,
    stamp: str | None = None,
) -> tuple[str, JobLayout]:
    """The sbatch script for this run, after checking the layout fits the job."""
    if opts.launcher not in ("torchrun", "srun"):
        raise SlurmError(f"--launcher={opts.launcher!r}: choose 'torchrun' or 'srun'")
    if opts.signal_seconds is None:
        signal_seconds, signal_why = signal_lead(run_dir, cfg)
    elif opts.signal_seconds < 1:
        raise SlurmError(f"--signal-seconds={opts.signal_seconds}: must be at least 1")
    else:
        signal_seconds, signal_why = opts.signal_seconds, "--signal-seconds"
    layout = job_layout(cfg, opts.nodes, opts.procs)
    python = shlex.quote(python or sys.executable)
    stamp = stamp or datetime.datetime.now(datetime.UTC).strftime("%Y%m%d-%H%M%S")
    run_dir = run_dir.resolve()
    workdir = (workdir or Path.cwd()).resolve()
    tasks = 1 if opts.launcher == "torchrun" else layout.procs_per_node
    if opts.max_requeues < 0:
        raise SlurmError(f"--max-requeues={opts.max_requeues}: must be 0 or more")
    header = (
        f"Generated by `megatron-dyt launch slurm` for {cfg.model.name}: {layout.nodes} node(s)"
        f" × {layout.procs_per_node} process(es) = TP {layout.tensor} × PP {layout.pipeline}"
        f" × DP {layout.data}"
    )
    values = {
        "HEADER": header,
        "JOB_NAME": opts.job_name or cfg.model.name,
        "NODES": str(layout.nodes),
        "TASKS_PER_NODE": str(tasks),
        "SBATCH_OPTIONS": _sbatch_options(opts),
        "RUN_DIR": shlex.quote(str(run_dir)),
        "SIGNAL_SECONDS": str(signal_seconds),
        "SIGNAL_WHY": signal_why,
        "REQUEUE": "#SBATCH --requeue" if opts.requeue else "#SBATCH --no-requeue",
        "REQUEUE_CONDITION": "" if opts.requeue else " && false",
        "WORKDIR": shlex.quote(str(workdir)),
        "STAMP": stamp,
        "CONFIG_YAML": cfg.to_yaml(),
        "PROCS_PER_TASK": str(layout.procs_per_node // tasks),
        "MAX_REQUEUES": str(opts.max_requeues),
        "ENV": _env_lines(opts.env),
        "SETUP": _setup_lines(opts.setup),
        "GIT": git_revision(),
        "PYTHON": python,
        "LAUNCH": _launch_command(opts, layout, python),
    }
    script = resources.files("megatron_dyt.launch").joinpath("templates/sbatch.sh").read_text()
    for key, value in values.items():
        script = script.replace("{{" + key + "}}", value)
    return script, layout


def require_sbatch() -> str:
    path = shutil.which("sbatch")
    if path is None:
        raise SlurmError(
            "sbatch is not on PATH: submit from a SLURM login node, or use --dry-run to print"
            " the script"
        )
    return path


def submit(script: str, script_path: Path, extra_args: list[str] | None = None) -> str:
    """Write the script and `sbatch` it; returns the job id."""
    sbatch = require_sbatch()
    script_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = script_path.with_name(script_path.name + ".tmp")
    tmp.write_text(script)
    tmp.replace(script_path)
    proc = subprocess.run(
        [sbatch, "--parsable", *(extra_args or []), str(script_path)],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise SlurmError(f"sbatch refused {script_path}: {proc.stderr.strip() or proc.stdout}")
    return proc.stdout.strip().split(";")[0]


def launch(
    cfg: Config,
    run_dir: Path,
    opts: SlurmOptions,
    command: list[str],
    dry_run: bool = False,
    check: bool = True,
    gpu_memory: float | None = None,
) -> str | None:
    """Render, check (`preflight`), then print (dry run: problems as notes) or submit;
    submission records what was sent."""
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%d-%H%M%S")
    script, layout = render(cfg, run_dir, opts, stamp=stamp)
    problems = []
    if check:
        problems = preflight.check(
            cfg,
            gpus=layout.world,
            gpu_memory=gpu_memory,
            time_limit=opts.time,
            signal_seconds=opts.signal_seconds,
            run_dir=run_dir,
            on_gpus=opts.gpus_per_node > 0,
        )
    if dry_run:
        print(script, end="")
        for problem in problems:
            print(f"note: submitting would fail: {problem}", file=sys.stderr)
        return None
    preflight.require(problems, f"the job for {cfg.model.name}")
    require_sbatch()
    launch_dir = run_dir.resolve() / "launch"
    script_path = launch_dir / f"sbatch-{stamp}.sh"
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    job_id = submit(script, script_path)
    record = {
        "job_id": job_id,
        "script": str(script_path),
        "command": command,
        "git": git_revision(),
        "layout": layout.__dict__,
        "submitted": stamp,
    }
    (launch_dir / f"submit-{job_id}.json").write_text(json.dumps(record, indent=1) + "\n")
    print(
        f"submitted job {job_id}: {layout.nodes} node(s) × {layout.procs_per_node} ="
        f" TP {layout.tensor} × PP {layout.pipeline} × DP {layout.data}\n"
        f"  script: {script_path}\n  log:    {run_dir.resolve() / 'logs' / f'slurm-{job_id}.out'}"
    )
    return job_id
