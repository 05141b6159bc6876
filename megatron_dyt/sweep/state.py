"""The sweep folder's state: the plan, each run's status, who trains a run, how a run ended.

Everything a sweep knows lives in its folder, so any process (a local `sweep run`, a SLURM
array task, `sweep report`) can pick up where another left off:

    sweep.yaml            the resolved spec (base made absolute)
    plan.json             index, name, axis values and config file of every run
    configs/<name>.yaml   each run's full config
    runs/<name>/          a normal `megatron-dyt train` run folder, plus train.log and
                          sweep.json (pending, running, done, failed or diverged)

A run is done when its final checkpoint exists; how a training invocation ended (finished,
stopped early with a checkpoint, or diverged) is what the trainer wrote in the run's
status.json, never a guess from its log. Running the same sweep again skips finished runs and
diverged ones (unless asked to retry them), and resumes or retries the rest.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from megatron_dyt.fileio import atomic_write
from megatron_dyt.sweep.spec import SweepError, load_spec, validate


def prepare(
    spec_path: str | Path, sweep_dir: str | Path, write: bool = True
) -> list[dict[str, Any]]:
    """Validate the spec and (if `write`) write sweep.yaml, plan.json and configs/; returns the
    plan: one entry per run with its index, name, axis values, config file and run folder."""
    spec = load_spec(spec_path)
    runs = validate(spec)
    sweep_dir = Path(sweep_dir)
    plan = []
    for run, cfg in runs:
        rel = Path("configs") / f"{run.name}.yaml"
        if write:
            atomic_write(sweep_dir / rel, cfg.to_yaml())
        entry = {
            "index": run.index,
            "name": run.name,
            "axes": run.axes,
            "config": str(rel),
            "run_dir": str(Path("runs") / run.name),
            "train_steps": cfg.train.train_steps,
        }
        if run.part is not None:  # a study's part (spec.py)
            entry["part"] = run.part
        plan.append(entry)
    if write:
        atomic_write(sweep_dir / "sweep.yaml", yaml.safe_dump(spec.to_dict(), sort_keys=False))
        atomic_write(sweep_dir / "plan.json", json.dumps(plan, indent=1) + "\n")
    return plan


def load_plan(sweep_dir: str | Path) -> list[dict[str, Any]]:
    """The plan `prepare` wrote; a folder without one is not a sweep folder."""
    path = Path(sweep_dir) / "plan.json"
    if not path.is_file():
        hint = (
            "; it is a run folder: `megatron-dyt report RUN` reports one run"
            if (Path(sweep_dir) / "metrics.jsonl").is_file()
            else ""
        )
        raise SweepError(
            f"'{sweep_dir}' is not a sweep folder (no plan.json); create one with"
            f" `megatron-dyt sweep run SPEC.yaml --out DIR`{hint}"
        )
    return json.loads(path.read_text())


def read_status(run_dir: Path) -> dict[str, Any]:
    """The sweep's record of a run (sweep.json); a run without one is pending."""
    path = Path(run_dir) / "sweep.json"
    if not path.is_file():
        return {"state": "pending"}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return {"state": "pending"}


def write_status(run_dir: Path, status: dict[str, Any]) -> None:
    """Replace a run's sweep.json."""
    atomic_write(Path(run_dir) / "sweep.json", json.dumps(status, indent=1) + "\n")


def finished_step(run_dir: Path) -> int | None:
    """The step of the newest complete checkpoint (docs/design.md §4), read from the
    checkpoint's complete.json without importing torch."""
    root = Path(run_dir) / "checkpoints"
    steps = []
    if root.is_dir():
        for done in root.glob("*/complete.json"):
            try:
                steps.append(int(json.loads(done.read_text())["step"]))
            except (ValueError, KeyError, json.JSONDecodeError):
                continue
    return max(steps) if steps else None


def is_finished(run_dir: Path, train_steps: int) -> bool:
    """Whether the run saved its final checkpoint: the one proof that it is done."""
    step = finished_step(run_dir)
    return step is not None and step >= train_steps


def trainer_state(run_dir: Path, since: float) -> str | None:
    """How the trainer said this invocation ended (its status.json), if it wrote one since
    `since`: "finished", "stopped" (with a checkpoint) or "diverged". Clearer than exit codes
    and log lines once torchrun sits in between."""
    try:
        record = json.loads((run_dir / "status.json").read_text())
    except (OSError, ValueError):
        return None
    return record.get("state") if record.get("time", 0) >= since else None


def end_state(
    run_dir: Path, train_steps: int, since: float, exit_code: int, signalled: bool
) -> str:
    """The sweep state of a run whose training process, started at `since`, just exited:
    "done" (its final checkpoint exists), "diverged" (the trainer's status.json says so),
    "pending" (stopped early, by a signal or at its own end: it resumes next time) or
    "failed". `signalled`: the sweep asked it to stop."""
    if is_finished(run_dir, train_steps):
        return "done"
    trainer = trainer_state(run_dir, since)
    if trainer == "diverged":
        return "diverged"
    if trainer == "stopped" or exit_code == 0 or (signalled and exit_code < 0):
        # stopped by a signal (after saving a checkpoint, if it got that far): resumes next time
        return "pending"
    return "failed"


@contextlib.contextmanager
def claim(run_dir: Path) -> Iterator[bool]:
    """Yields whether this process holds the run (an exclusive lock on run_dir/.sweep.lock, held
    while it trains): two sweep processes on one folder never train the same run at once."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / ".sweep.lock", "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        except OSError as exc:  # a file system without flock (some Lustre / NFS mounts)
            warnings.warn(
                f"cannot lock '{fh.name}' ({exc.strerror}): two sweep processes on this folder"
                " could train the same run",
                stacklevel=3,
            )
        yield True


def _alive_here(status: dict[str, Any]) -> bool:
    """Whether the status names a training process still running on this machine."""
    pid = status.get("pid")
    if status.get("state") != "running" or not pid or status.get("host") != socket.gethostname():
        return False
    try:
        os.kill(int(pid), 0)
    except (OSError, ValueError):
        return False
    return True


def skip_reason(
    sweep_dir: Path, entry: dict[str, Any], retry_diverged: bool, held: bool = False
) -> str | None:
    """'done', 'diverged' or 'running' when this run must not be started now; records a
    finished run as done. `held`: the caller holds the run's lock (see `claim`)."""
    run_dir = sweep_dir / entry["run_dir"]
    status = read_status(run_dir)
    if is_finished(run_dir, entry["train_steps"]):
        if status.get("state") != "done":
            write_status(run_dir, {**status, "index": entry["index"], "state": "done"})
        return "done"
    if status.get("state") == "diverged" and not retry_diverged:
        return "diverged"
    if not held and _alive_here(status):
        return "running"  # another sweep process on this machine is training it now
    return None
