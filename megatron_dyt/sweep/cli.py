"""`megatron-dyt sweep run / run-one / report`: the options, and what each action calls.

The one module that brings the runner, the SLURM array and the report together, so that each
of them stays usable (and testable) without the others.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from megatron_dyt.arguments import positive_float, positive_int
from megatron_dyt.sweep.runner import run_local, run_one
from megatron_dyt.sweep.slurm_array import array_script, requeue_array_task, submit
from megatron_dyt.sweep.spec import format_value, load_spec, validate
from megatron_dyt.sweep.state import prepare, read_status, skip_reason


def _plan_table(sweep_dir: Path, plan: list[dict[str, Any]]) -> str:
    rows = []
    for e in plan:
        state = read_status(sweep_dir / e["run_dir"]).get("state", "pending")
        axes = "  ".join(f"{k}={format_value(v)}" for k, v in e["axes"].items())
        rows.append(f"{e['index']:>4}  {state:<8}  {e['name']}  ({axes})")
    return "\n".join(rows)


def _time_line(args: argparse.Namespace) -> str:
    """The sweep's total GPU-hours (`info`'s time estimate of every run)."""
    from megatron_dyt.info import format_sweep_time, sweep_time

    cfgs = [cfg for _, cfg in validate(load_spec(args.spec))]
    return format_sweep_time(sweep_time(cfgs, args.gpus_per_run))


def _preflight(args: argparse.Namespace, plan: list[dict[str, Any]], pending: list[int]) -> None:
    """Every run to be queued would start training: its data and tokenizer exist and fit, it
    fits its GPUs (`info`'s estimate), the time limit leaves room for a checkpoint; or nothing
    is queued. Runs that share a data section or a shape are checked once."""
    from megatron_dyt.info import sweep_fit
    from megatron_dyt.launch import preflight

    cfgs = dict(enumerate(cfg for _, cfg in validate(load_spec(args.spec))))
    todo = [i for i in pending if i in cfgs]
    problems: list[str] = []
    seen_data: set[str] = set()
    for i in todo:
        key = repr(cfgs[i].data)
        if key not in seen_data:
            seen_data.add(key)
            problems += [
                f"sweep run {i} '{plan[i]['name']}': {p}" for p in preflight.data_problems(cfgs[i])
            ]
    misfits = sweep_fit([cfgs[i] for i in todo], args.gpus_per_run, args.gpu_memory)
    lines = [
        f"sweep run {todo[k]} '{plan[todo[k]]['name']}': {fit['message']}" for k, fit in misfits
    ]
    problems += lines[:10] + (
        [f"… and {len(lines) - 10} more runs that do not fit"] if len(lines) > 10 else []
    )
    if args.time and todo:
        longest = max(todo, key=lambda i: cfgs[i].model.num_layers * cfgs[i].model.hidden_size ** 2)
        gpus = args.gpus_per_run or 1
        problems += [
            f"sweep run {longest} '{plan[longest]['name']}': {p}"
            for p in preflight.time_problems(cfgs[longest], args.time, gpus, 120)
        ]
    if args.dry_run:
        for problem in problems:
            print(f"note: submitting would fail: {problem}", file=sys.stderr)
    else:
        preflight.require(problems, f"{len(todo)} sweep run(s)")


def cmd_run(args: argparse.Namespace) -> int:
    """`sweep run`: prepare the folder, then train locally or submit one job array."""
    sweep_dir = Path(args.out or Path("runs") / f"sweep-{Path(args.spec).stem}")
    plan = prepare(args.spec, sweep_dir, write=not args.dry_run)
    print(f"sweep {args.spec}: {len(plan)} runs in {sweep_dir}", file=sys.stderr, flush=True)
    if args.dry_run:
        print(_time_line(args), file=sys.stderr, flush=True)
    if args.slurm:
        pending = [e["index"] for e in plan if not skip_reason(sweep_dir, e, args.retry_diverged)]
        if not pending:
            print(f"nothing to submit: all {len(plan)} runs are done or diverged")
            return 0
        if not args.no_check:
            _preflight(args, plan, pending)
        script = array_script(
            sweep_dir,
            pending,
            partition=args.partition,
            account=args.account,
            time_limit=args.time,
            max_running=args.parallel,
            cpus_per_task=args.cpus_per_task,
            gpus_per_run=args.gpus_per_run or 0,
            nodes_per_run=args.nodes_per_run,
            qos=args.qos,
            extra=args.sbatch,
            retry_diverged=args.retry_diverged,
        )
        if args.dry_run:
            print(script, end="")
            return 0
        job = submit(script, sweep_dir)
        print(f"submitted job array {job} ({len(pending)} runs); logs in {sweep_dir}/slurm/")
        return 0
    if args.dry_run:
        print(_plan_table(sweep_dir, plan))
        return 0
    summary = run_local(
        sweep_dir,
        plan,
        parallel=args.parallel or 1,
        nproc=args.gpus_per_run or 1,
        retry_diverged=args.retry_diverged,
        progress=not args.no_progress,
    )
    total = {**summary.skipped}
    for k, v in summary.counts.items():
        total[k] = total.get(k, 0) + v
    print("sweep finished: " + ", ".join(f"{v} {k}" for k, v in sorted(total.items())))
    print(f"report: megatron-dyt sweep report {sweep_dir}")
    return 0 if summary.ok else 1


def cmd_run_one(args: argparse.Namespace) -> int:
    """`sweep run-one`: one run, as an array task; requeued when stopped early."""
    state = run_one(
        args.sweep_dir,
        args.index,
        nproc=args.nproc_per_run,
        retry_diverged=args.retry_diverged,
        nodes=args.nodes_per_run,
    )
    if state == "pending":  # stopped early by a signal, with a checkpoint to resume from
        requeue_array_task()
    return 1 if state == "failed" else 0


def cmd_report(args: argparse.Namespace) -> int:
    """`sweep report`: the report files of a sweep folder, and a summary on stdout."""
    # Imported here: numpy, scipy and (for figures) matplotlib only when a report is made.
    from megatron_dyt.sweep.report import write_report
    from megatron_dyt.sweep.study import is_study, write_study_report

    if is_study(args.sweep_dir):  # a spec with parts: the study's questions (study.py)
        study = write_study_report(args.sweep_dir, args.out, metric=args.metric)
        print(study.summary)
        print(
            f"wrote {study.markdown.name}, {study.json.name}, {study.csv.name} and"
            f" {len(study.figures)} figure(s) in {study.folder}"
        )
        return 0
    out = write_report(args.sweep_dir, args.out, metric=args.metric)
    print(out.summary)
    print(f"wrote {out.csv}, {out.markdown} and {len(out.figures)} figure(s) in {out.folder}")
    return 0


def add_sweep_parser(subparsers: argparse._SubParsersAction) -> None:
    """`megatron-dyt sweep run|run-one|report`."""
    sweep = subparsers.add_parser(
        "sweep",
        help="α₀ sweeps: expand a grid into runs, run them, report the best α₀ per width",
        description="Expand a grid spec (configs/sweeps/*.yaml) into training runs, run them"
        " locally or as a SLURM job array (resumably), and report the results.",
    )
    sub = sweep.add_subparsers(dest="sweep_command", required=True, metavar="ACTION")

    run = sub.add_parser(
        "run",
        help="run (or resume) a sweep",
        description="Validate every run of the spec, then train the unfinished ones locally"
        " (--parallel N at a time) or as one SLURM job array (--slurm). Finished runs are"
        " skipped; failed and diverged runs are recorded in runs/<name>/sweep.json.",
    )
    run.add_argument("spec", metavar="SPEC", help="sweep spec, e.g. configs/sweeps/tiny.yaml")
    run.add_argument("--out", help="sweep folder (default: runs/sweep-<spec name>)")
    run.add_argument(
        "--parallel",
        type=positive_int,
        default=None,
        help="runs at a time (locally, default 1; with --slurm: the array's %%limit, default none)",
    )
    run.add_argument(
        "--gpus-per-run",
        type=positive_int,
        default=None,
        help="GPUs (processes, via torchrun) per run (default: 1 process, no GPU request)",
    )
    run.add_argument("--retry-diverged", action="store_true", help="run diverged runs again too")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.add_argument("--slurm", action="store_true", help="submit one SLURM job array")
    run.add_argument("--partition", help="SLURM partition")
    run.add_argument("--account", help="SLURM account")
    run.add_argument("--time", help="SLURM time limit per run, e.g. 04:00:00")
    run.add_argument("--cpus-per-task", type=positive_int, help="SLURM CPUs per run")
    run.add_argument(
        "--nodes-per-run",
        type=positive_int,
        default=1,
        help="with --slurm: nodes of each run (its --gpus-per-run split evenly over them)",
    )
    run.add_argument("--qos", help="SLURM quality of service")
    run.add_argument(
        "--sbatch",
        action="append",
        default=[],
        metavar="OPTION",
        help="extra #SBATCH option of the array, e.g. --sbatch=--constraint=h100 (repeatable)",
    )
    run.add_argument(
        "--gpu-memory",
        type=positive_float,
        default=None,
        metavar="GIB",
        help="with --slurm: memory of one GPU for the per-run fit check (default: this"
        " machine's GPU, else 80)",
    )
    run.add_argument(
        "--no-check", action="store_true", help="with --slurm: queue without the fit check"
    )
    run.add_argument(
        "--dry-run",
        action="store_true",
        help="validate and list the runs (with --slurm: print the sbatch script) only",
    )
    run.set_defaults(func=cmd_run)

    one = sub.add_parser(
        "run-one",
        help="train run INDEX of a prepared sweep (what each SLURM array task runs)",
    )
    one.add_argument("sweep_dir", metavar="SWEEP_DIR")
    one.add_argument("--index", type=int, required=True, help="run index (plan.json)")
    one.add_argument("--nproc-per-run", type=positive_int, default=1, help="processes for the run")
    one.add_argument(
        "--nodes-per-run", type=positive_int, default=1, help="nodes of the run (srun + torchrun)"
    )
    one.add_argument("--retry-diverged", action="store_true", help="run it even if it diverged")
    one.set_defaults(func=cmd_run_one)

    rep = sub.add_parser(
        "report",
        help="CSV, Markdown, heat-maps and the α₀-vs-width fit of a sweep (a study: its"
        " questions; one run: `megatron-dyt report RUN`)",
    )
    rep.add_argument("sweep_dir", metavar="SWEEP_DIR")
    rep.add_argument("--out", help="report folder (default: SWEEP_DIR/report)")
    rep.add_argument(
        "--metric",
        choices=("auto", "final_valid", "best_valid", "final_train"),
        default="auto",
        help="loss that ranks the α₀ cells (auto: final validation loss if every run has one)",
    )
    rep.set_defaults(func=cmd_report)
