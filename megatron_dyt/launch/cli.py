"""The `launch` command: `launch slurm` (sbatch) and `launch local` (torchrun on this machine)."""

from __future__ import annotations

import argparse
from pathlib import Path

from megatron_dyt.arguments import non_negative_int, positive_float, positive_int


def _run_dir(args: argparse.Namespace) -> Path:
    return Path(args.run_dir) if args.run_dir else Path("runs") / Path(args.config).stem


def cmd_slurm(args: argparse.Namespace) -> int:
    import sys

    from megatron_dyt.config import load_config
    from megatron_dyt.launch.slurm import SlurmOptions, launch

    cfg = load_config(args.config, args.overrides)
    opts = SlurmOptions(
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node,
        procs_per_node=args.nproc_per_node,
        launcher=args.launcher,
        partition=args.partition,
        account=args.account,
        time=args.time,
        qos=args.qos,
        cpus_per_task=args.cpus_per_task,
        mem=args.mem,
        exclusive=args.exclusive,
        job_name=args.job_name,
        signal_seconds=args.signal_seconds,
        requeue=not args.no_requeue,
        max_requeues=args.max_requeues,
        env=args.env,
        setup=Path(args.setup) if args.setup else None,
        extra=args.sbatch,
    )
    launch(
        cfg,
        _run_dir(args),
        opts,
        ["megatron-dyt", *sys.argv[1:]],
        dry_run=args.dry_run,
        check=not args.no_check,
        gpu_memory=args.gpu_memory,
    )
    return 0


def cmd_local(args: argparse.Namespace) -> int:
    from megatron_dyt.config import load_config
    from megatron_dyt.launch.local import launch

    cfg = load_config(args.config, args.overrides)
    if not args.no_check:
        import torch

        from megatron_dyt.launch import preflight

        problems = preflight.check(
            cfg, gpus=args.nproc, gpu_memory=args.gpu_memory, on_gpus=torch.cuda.is_available()
        )
        preflight.require(problems, f"training {cfg.model.name}", done="started")
    return launch(
        cfg, args.config, args.overrides, _run_dir(args), args.nproc, dry_run=args.dry_run
    )


def add_launch_parser(sub: argparse._SubParsersAction) -> None:
    launch = sub.add_parser(
        "launch",
        help="start a training run on a SLURM cluster or as several local processes",
        description="Start `megatron-dyt train` as a SLURM batch job or with torchrun here.",
    )
    where = launch.add_subparsers(dest="where", required=True, metavar="WHERE")

    slurm = where.add_parser(
        "slurm",
        help="render an sbatch script and submit it",
        description="Render an sbatch script (one torchrun per node, c10d rendezvous on the"
        " first node, USR1 pre-emption → checkpoint → requeue → resume) and submit it.",
    )
    slurm.add_argument("config", metavar="CONFIG")
    slurm.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    slurm.add_argument("--nodes", type=positive_int, required=True)
    slurm.add_argument("--gpus-per-node", type=non_negative_int, default=8)
    slurm.add_argument(
        "--nproc-per-node",
        type=positive_int,
        default=None,
        help="training processes per node (default: --gpus-per-node; needed on CPU nodes)",
    )
    slurm.add_argument(
        "--launcher",
        choices=["torchrun", "srun"],
        default="torchrun",
        help="torchrun: one task per node; srun: one task per process (default: torchrun)",
    )
    slurm.add_argument("--partition")
    slurm.add_argument("--account")
    slurm.add_argument("--time", help="time limit, e.g. 2-00:00:00")
    slurm.add_argument("--qos")
    slurm.add_argument(
        "--cpus-per-task",
        type=positive_int,
        help="CPUs for each node's task (default: all of the node's under --exclusive);"
        " OMP_NUM_THREADS is this divided by the processes per node",
    )
    slurm.add_argument(
        "--mem", help="memory per node, as sbatch takes it (default: 0 = all, under --exclusive)"
    )
    slurm.add_argument(
        "--exclusive",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="whole nodes (default: on when --gpus-per-node > 0)",
    )
    slurm.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="export this in the job before the launch, e.g. NCCL_IB_HCA=mlx5 (repeatable)",
    )
    slurm.add_argument(
        "--setup",
        metavar="FILE",
        help="shell lines run before the launch (module load, conda activate, NCCL settings);"
        " copied into the script at submission",
    )
    slurm.add_argument(
        "--max-requeues",
        type=non_negative_int,
        default=3,
        help="requeue after a crash at most this many times in a row without a newer"
        " checkpoint (default: 3); bad input (exit 2) is never requeued",
    )
    slurm.add_argument("--job-name", help="default: model.name")
    slurm.add_argument(
        "--signal-seconds",
        type=positive_int,
        default=None,
        help="send USR1 this long before the time limit (checkpoint + requeue); default: the"
        " longest save this run folder measured plus a step plus 60 s, else 300",
    )
    slurm.add_argument("--no-requeue", action="store_true", help="do not requeue after USR1")
    slurm.add_argument(
        "--sbatch",
        action="append",
        default=[],
        metavar="OPTION",
        help="extra #SBATCH option, e.g. --sbatch=--exclusive (repeatable)",
    )
    slurm.add_argument("--run-dir", help="run folder (default: runs/<config file name>)")
    slurm.add_argument(
        "--gpu-memory",
        type=positive_float,
        default=None,
        metavar="GIB",
        help="memory of one GPU for the pre-flight fit check (default: this machine's, else 80)",
    )
    slurm.add_argument(
        "--no-check",
        action="store_true",
        help="submit without the pre-flight checks (data, tokenizer, memory, time limit)",
    )
    slurm.add_argument(
        "--dry-run",
        action="store_true",
        help="print the script, submit nothing (pre-flight problems are printed as notes)",
    )
    slurm.set_defaults(func=cmd_slurm)

    local = where.add_parser(
        "local",
        help="run the training processes on this machine with torchrun",
        description="Start N training processes here (torchrun --standalone).",
    )
    local.add_argument("config", metavar="CONFIG")
    local.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    local.add_argument("--nproc", type=positive_int, required=True, help="processes to start")
    local.add_argument("--run-dir", help="run folder (default: runs/<config file name>)")
    local.add_argument(
        "--gpu-memory",
        type=positive_float,
        default=None,
        metavar="GIB",
        help="memory of one GPU for the pre-flight fit check (default: this machine's)",
    )
    local.add_argument(
        "--no-check",
        action="store_true",
        help="start without the pre-flight checks (data, tokenizer, memory)",
    )
    local.add_argument("--dry-run", action="store_true", help="print the command only")
    local.set_defaults(func=cmd_local)
