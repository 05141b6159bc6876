"""α₀ sweeps: a grid spec expanded into training runs, run locally or as one SLURM job array.

A spec (YAML) names a base config, overrides for every run and a grid of axes:

    base: ../tiny-dyt.yaml                 # relative to the spec file (or the current folder)
    overrides: {train.train_steps: 50}
    grid:
      width:                               # tied keys: one value sets several config keys
        keys: [model.hidden_size, model.num_heads, model.ffn_hidden_size]
        values: [[64, 2, 176], [128, 4, 352]]
      model.norm.alpha_attn: [0.5, 1.0]    # a plain axis: a dotted config key and its values
      alpha_other: {keys: [model.norm.alpha_mlp, model.norm.alpha_final], values: [0.5, 1.0]}
      seed: {keys: [train.seed], values: [1, 2]}
    name: "w{width}-a{model.norm.alpha_attn}-o{alpha_other}-s{seed}"   # optional

Every combination of axis values is one run; every run's config is validated before anything
runs, so a typo fails at once with the run's name. The sweep folder holds:

    sweep.yaml            the resolved spec (base made absolute)
    plan.json             index, name, axis values and config file of every run
    configs/<name>.yaml   each run's full config
    runs/<name>/          a normal `megatron-dyt train` run folder, plus train.log and
                          sweep.json (pending, running, done, failed or diverged)

Running the same sweep again skips finished runs (their final checkpoint exists) and diverged
ones (unless --retry-diverged), and resumes or retries the rest.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import fcntl
import itertools
import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from megatron_dyt.arguments import positive_int
from megatron_dyt.config import Config, ConfigError, apply_overrides, config_from_dict

STATES = ("pending", "running", "done", "failed", "diverged")
DIVERGED_MARK = "training diverged"  # what the trainer's TrainingError says on a NaN/Inf loss
SPEC_KEYS = ("base", "overrides", "grid", "name")


# ---- the spec ----------------------------------------------------------------------------------


@dataclass
class Axis:
    """One grid dimension: its values set one or several (tied) config keys together."""

    name: str
    keys: list[str]
    values: list[Any]

    def settings(self, value: Any) -> dict[str, Any]:
        if len(self.keys) == 1:
            return {self.keys[0]: value}
        if isinstance(value, list):
            return dict(zip(self.keys, value, strict=True))
        return dict.fromkeys(self.keys, value)

    @staticmethod
    def label(value: Any) -> Any:
        """The value a report shows for this axis: a scalar, or the first of tied values."""
        return value[0] if isinstance(value, list) else value


@dataclass
class SweepSpec:
    base: Path | None
    overrides: dict[str, Any]
    axes: list[Axis]
    name: str | None = None
    source: str = "(spec)"

    def to_dict(self) -> dict[str, Any]:
        return {
            "base": str(self.base) if self.base else None,
            "overrides": self.overrides,
            "grid": {a.name: {"keys": a.keys, "values": a.values} for a in self.axes},
            "name": self.name,
        }


@dataclass
class Run:
    index: int
    name: str
    axes: dict[str, Any]  # axis name -> label
    settings: dict[str, Any] = field(default_factory=dict)  # dotted config key -> value


def load_spec(path: str | Path) -> SweepSpec:
    """Read and check a sweep spec; the base config path is resolved against the spec's folder."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"sweep spec '{path}' does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"sweep spec '{path}' is not valid YAML: {exc}") from None
    return spec_from_dict(data, path.parent, str(path))


def spec_from_dict(data: Any, folder: Path = Path("."), source: str = "(spec)") -> SweepSpec:
    if not isinstance(data, dict):
        raise ConfigError(f"sweep spec {source} must hold a mapping, got {type(data).__name__}")
    unknown = sorted(set(data) - set(SPEC_KEYS))
    if unknown:
        raise ConfigError(
            f"sweep spec {source}: unknown key {unknown[0]!r} (allowed: {', '.join(SPEC_KEYS)})"
        )
    base = None
    if data.get("base") is not None:
        base = Path(str(data["base"]))
        if not base.is_absolute():
            base = folder / base if (folder / base).is_file() else base
        if not base.is_file():
            raise ConfigError(
                f"sweep spec {source}: base config '{data['base']}' not found (looked in"
                f" '{folder}' and the current folder)"
            )
        base = base.resolve()
    overrides = data.get("overrides") or {}
    if not isinstance(overrides, dict):
        raise ConfigError(f"sweep spec {source}: 'overrides' must map dotted keys to values")
    grid = data.get("grid")
    if not isinstance(grid, dict) or not grid:
        raise ConfigError(
            f"sweep spec {source}: 'grid' must map axes to value lists, e.g."
            " grid: {model.norm.alpha_attn: [0.5, 1.0]}"
        )
    axes = [_parse_axis(str(name), entry, source) for name, entry in grid.items()]
    owner: dict[str, str] = {}
    for axis in axes:
        for key in axis.keys:
            if key in owner:
                raise ConfigError(
                    f"sweep spec {source}: grid axes {owner[key]!r} and {axis.name!r} both set"
                    f" {key}; one axis per key (tie keys into one axis with 'keys')"
                )
            owner[key] = axis.name
    name = data.get("name")
    if name is not None and not isinstance(name, str):
        raise ConfigError(f"sweep spec {source}: 'name' must be a template string")
    return SweepSpec(base, dict(overrides), axes, name, source)


def _parse_axis(name: str, entry: Any, source: str) -> Axis:
    where = f"sweep spec {source}: grid.{name}"
    if isinstance(entry, list):
        keys, values = [name], entry
    elif isinstance(entry, dict) and set(entry) == {"keys", "values"}:
        keys = [entry["keys"]] if isinstance(entry["keys"], str) else entry["keys"]
        values = entry["values"]
        if not isinstance(keys, list) or not keys or not all(isinstance(k, str) for k in keys):
            raise ConfigError(f"{where}: 'keys' must be a dotted key or a list of them")
        if not isinstance(values, list):
            raise ConfigError(f"{where}: 'values' must be a list")
    else:
        raise ConfigError(
            f"{where}: expected a list of values or {{keys: [...], values: [...]}}, got {entry!r}"
        )
    if not values:
        raise ConfigError(f"{where}: has no values")
    for v in values:
        if isinstance(v, list) and len(v) != len(keys):
            raise ConfigError(
                f"{where}: value {v!r} has {len(v)} entries for {len(keys)} keys {keys};"
                " give one value per key, or a single value for all of them"
            )
    return Axis(name, list(keys), list(values))


def expand(spec: SweepSpec) -> list[Run]:
    """The cartesian product of the grid's axes, in spec order (the last axis varies fastest)."""
    runs = []
    for index, combo in enumerate(itertools.product(*(a.values for a in spec.axes))):
        settings = dict(spec.overrides)
        axes = {}
        for axis, value in zip(spec.axes, combo, strict=True):
            settings.update(axis.settings(value))
            axes[axis.name] = Axis.label(value)
        runs.append(Run(index, _run_name(spec, axes), axes, settings))
    seen: dict[str, int] = {}
    for run in runs:
        if run.name in seen:
            raise ConfigError(
                f"sweep spec {spec.source}: runs {seen[run.name]} and {run.index} are both named"
                f" {run.name!r}; make the 'name' template use every axis"
                f" ({', '.join(a.name for a in spec.axes)}), and give tied axes values whose"
                " first entries differ (names and reports show the first)"
            )
        seen[run.name] = run.index
    return runs


def _fmt(value: Any, fmt: str = "") -> str:
    if fmt:
        return format(value, fmt)
    return f"{value:g}" if isinstance(value, float) else str(value)


def _run_name(spec: SweepSpec, axes: dict[str, Any]) -> str:
    if spec.name is None:
        name = "-".join(f"{k.rpartition('.')[2]}{_fmt(v)}" for k, v in axes.items())
    else:

        def field_value(match: re.Match) -> str:
            key, fmt = match.group(1), match.group(2) or ""
            if key not in axes:
                raise ConfigError(
                    f"sweep spec {spec.source}: name template field {{{key}}} is not an axis"
                    f" (axes: {', '.join(axes)})"
                )
            try:
                return _fmt(axes[key], fmt)
            except (ValueError, TypeError) as exc:
                raise ConfigError(
                    f"sweep spec {spec.source}: name template field {match.group(0)} cannot"
                    f" format {axes[key]!r}: {exc}"
                ) from None

        name = re.sub(r"\{([^{}:]+)(?::([^{}]*))?\}", field_value, spec.name)
    return re.sub(r"[^A-Za-z0-9._=+-]", "_", name)


def _load_base(spec: SweepSpec) -> dict[str, Any]:
    if spec.base is None:
        return {}
    try:
        tree = yaml.safe_load(spec.base.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"base config '{spec.base}' is not valid YAML: {exc}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"base config '{spec.base}' must hold a mapping")
    return tree


def run_config(base_tree: dict[str, Any], run: Run, base_name: str = "(defaults)") -> Config:
    """The validated config of one run; errors name the run."""
    tree = copy.deepcopy(base_tree)
    try:
        apply_overrides(tree, {str(key): value for key, value in run.settings.items()})
    except ConfigError as exc:
        raise ConfigError(f"sweep run {run.index} '{run.name}': {exc}") from None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # vocab padding notes, once per run, are noise here
        return config_from_dict(tree, f"of sweep run {run.index} '{run.name}' (base {base_name})")


def validate(spec: SweepSpec) -> list[tuple[Run, Config]]:
    """Expand and validate every run up front: a bad key or value fails before anything runs."""
    tree = _load_base(spec)
    base_name = str(spec.base) if spec.base else "(defaults)"
    return [(run, run_config(tree, run, base_name)) for run in expand(spec)]


# ---- the sweep folder --------------------------------------------------------------------------


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    tmp.write_text(text)
    os.replace(tmp, path)


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
            _atomic_write(sweep_dir / rel, cfg.to_yaml())
        plan.append(
            {
                "index": run.index,
                "name": run.name,
                "axes": run.axes,
                "config": str(rel),
                "run_dir": str(Path("runs") / run.name),
                "train_steps": cfg.train.train_steps,
            }
        )
    if write:
        _atomic_write(sweep_dir / "sweep.yaml", yaml.safe_dump(spec.to_dict(), sort_keys=False))
        _atomic_write(sweep_dir / "plan.json", json.dumps(plan, indent=1) + "\n")
    return plan


def load_plan(sweep_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(sweep_dir) / "plan.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"'{sweep_dir}' is not a sweep folder (no plan.json); create one with"
            " `megatron-dyt sweep run SPEC.yaml --out DIR`"
        )
    return json.loads(path.read_text())


def read_status(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / "sweep.json"
    if not path.is_file():
        return {"state": "pending"}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return {"state": "pending"}


def write_status(run_dir: Path, status: dict[str, Any]) -> None:
    _atomic_write(Path(run_dir) / "sweep.json", json.dumps(status, indent=1) + "\n")


def finished_step(run_dir: Path) -> int | None:
    """The step of the newest complete checkpoint (see megatron_dyt/checkpoint/format.py), read from the
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
    step = finished_step(run_dir)
    return step is not None and step >= train_steps


# ---- running one run ---------------------------------------------------------------------------


class _Children:
    """The training processes this sweep started, so a signal reaches every one of them."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.procs: set[subprocess.Popen] = set()
        self.stopping = False

    def add(self, proc: subprocess.Popen) -> None:
        with self.lock:
            self.procs.add(proc)
            if self.stopping:
                proc.terminate()

    def discard(self, proc: subprocess.Popen) -> None:
        with self.lock:
            self.procs.discard(proc)

    def forward(self, sig: int) -> None:
        """SIGTERM/SIGUSR1 make the trainer save a checkpoint and exit cleanly."""
        with self.lock:
            self.stopping = True
            for proc in self.procs:
                if proc.poll() is None:
                    proc.send_signal(sig)


def _die_with_parent():
    """A preexec_fn that makes the training get SIGTERM (and checkpoint) if the sweep process
    that started it dies, instead of living on unwatched in its own session (Linux only)."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved here, not in the forked child
    return lambda: prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


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


def train_command(config: Path, run_dir: Path, nproc: int = 1) -> list[str]:
    """`megatron-dyt train` in a fresh interpreter; several processes through torchrun's node
    wrapper (launch/node.py), which passes SIGUSR1 on so the workers save before stopping."""
    cli = ["-m", "megatron_dyt", "train", str(config), "--run-dir", str(run_dir), "--no-progress"]
    if nproc > 1:
        return [
            sys.executable,
            "-m",
            "megatron_dyt.launch.node",
            "--standalone",
            "--nnodes=1",
            f"--nproc-per-node={nproc}",
            "--max-restarts=0",
            *cli,
        ]
    return [sys.executable, *cli]


def _trainer_state(run_dir: Path, since: float) -> str | None:
    """How the trainer said this invocation ended (its status.json), if it wrote one since
    `since`: "finished", "stopped" (with a checkpoint) or "diverged". Clearer than exit codes
    and log lines once torchrun sits in between."""
    try:
        record = json.loads((run_dir / "status.json").read_text())
    except (OSError, ValueError):
        return None
    return record.get("state") if record.get("time", 0) >= since else None


@contextlib.contextmanager
def _claim(run_dir: Path):
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


def _log_tail(log: Path, start: int, lines: int = 20) -> list[str]:
    try:
        with open(log, "rb") as fh:
            fh.seek(start)
            text = fh.read().decode(errors="replace")
    except OSError:
        return []
    return [line for line in text.splitlines() if line.strip()][-lines:]


def execute(
    sweep_dir: Path,
    entry: dict[str, Any],
    *,
    nproc: int = 1,
    threads: int | None = None,
    children: _Children | None = None,
    retry_diverged: bool = False,
    gpus: str | None = None,
) -> dict[str, Any]:
    """Train one planned run to its end and record how it ended in its sweep.json; a run that
    another sweep process holds, or that finished or diverged meanwhile, is left alone."""
    run_dir = sweep_dir / entry["run_dir"]
    with _claim(run_dir) as mine:
        unchanged = {**read_status(run_dir), "index": entry["index"], "name": entry["name"]}
        if not mine:  # another sweep process is training it now
            return {**unchanged, "state": "running"}
        if children is not None and children.stopping:  # the sweep is being stopped
            return unchanged
        if skip_reason(sweep_dir, entry, retry_diverged, held=True):  # done since the plan
            return {**read_status(run_dir), "index": entry["index"], "name": entry["name"]}
        return _train(sweep_dir, entry, run_dir, nproc, threads, children, gpus)


def _train(
    sweep_dir: Path,
    entry: dict[str, Any],
    run_dir: Path,
    nproc: int,
    threads: int | None,
    children: _Children | None,
    gpus: str | None,
) -> dict[str, Any]:
    log = run_dir / "train.log"
    start = log.stat().st_size if log.exists() else 0
    status = {
        "index": entry["index"],
        "name": entry["name"],
        "state": "running",
        "host": socket.gethostname(),
        "log": str(log.relative_to(sweep_dir)),
        "started": time.time(),
    }
    write_status(run_dir, status)
    env = dict(os.environ)
    if threads is not None and "OMP_NUM_THREADS" not in os.environ:
        env["OMP_NUM_THREADS"] = str(threads)
    if gpus is not None:  # this run's own GPUs when several runs share the machine
        env["CUDA_VISIBLE_DEVICES"] = gpus
    cmd = train_command(sweep_dir / entry["config"], run_dir, nproc)
    with open(log, "ab") as fh:
        fh.write(f"$ {' '.join(cmd)}\n".encode())
        fh.flush()
        # A session of its own: Ctrl-C reaches the sweep, which then asks each run to save.
        proc = subprocess.Popen(
            cmd,
            stdout=fh,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
            preexec_fn=_die_with_parent(),
        )
        if children is not None:
            children.add(proc)
        write_status(run_dir, {**status, "pid": proc.pid})
        try:
            code = proc.wait()
        finally:
            if children is not None:
                children.discard(proc)
    tail = _log_tail(log, start)
    step = finished_step(run_dir)
    trainer = _trainer_state(run_dir, status["started"])
    if step is not None and step >= entry["train_steps"]:
        state = "done"
    elif trainer == "diverged" or any(DIVERGED_MARK in line for line in tail):
        state = "diverged"
    elif (
        trainer == "stopped"
        or code == 0
        or (children is not None and children.stopping and code < 0)
    ):
        # stopped by a signal (after saving a checkpoint, if it got that far): resumes next time
        state = "pending"
    else:
        state = "failed"
    status.update(
        state=state,
        exit_code=code,
        step=step,
        finished=time.time(),
        seconds=round(time.time() - status["started"], 1),
    )
    if state in ("failed", "diverged"):
        errors = [ln for ln in tail if ln.startswith("megatron-dyt:") or "Error" in ln]
        status["message"] = (errors or tail or [f"exit code {code}"])[-1]
        status["log_tail"] = tail
    write_status(run_dir, status)
    return status


def skip_reason(
    sweep_dir: Path, entry: dict[str, Any], retry_diverged: bool, held: bool = False
) -> str | None:
    """'done', 'diverged' or 'running' when this run must not be started now; records a
    finished run as done. `held`: the caller holds the run's lock (see `_claim`)."""
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


def run_one(
    sweep_dir: str | Path, index: int, *, nproc: int = 1, retry_diverged: bool = False
) -> str:
    """One run of a prepared sweep: what each SLURM array task calls. Returns its final state."""
    sweep_dir = Path(sweep_dir)
    plan = load_plan(sweep_dir)
    if not 0 <= index < len(plan):
        raise ValueError(f"--index {index}: this sweep has runs 0 to {len(plan) - 1}")
    entry = plan[index]
    skipped = skip_reason(sweep_dir, entry, retry_diverged)
    if skipped:
        print(f"sweep run {index} '{entry['name']}': already {skipped}, skipping", flush=True)
        return skipped
    children = _Children()
    previous = {s: signal.signal(s, lambda n, f: children.forward(n)) for s in _FORWARDED}
    try:
        threads = os.environ.get("SLURM_CPUS_PER_TASK")
        status = execute(
            sweep_dir,
            entry,
            nproc=nproc,
            threads=int(threads) if threads else None,
            children=children,
            retry_diverged=retry_diverged,
        )
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print(_status_line(entry, status), flush=True)
    return status["state"]


_FORWARDED = (signal.SIGTERM, signal.SIGUSR1)


def _status_line(entry: dict[str, Any], status: dict[str, Any]) -> str:
    line = f"{entry['name']}: {status['state']} ({status.get('seconds', 0):.0f} s)"
    if status.get("message"):
        line += f": {status['message']}"
    return line


# ---- running a sweep locally -------------------------------------------------------------------


def gpu_blocks(parallel: int, nproc: int) -> list[str] | None:
    """CUDA_VISIBLE_DEVICES for each of `parallel` runs of `nproc` processes (None: no GPUs, or
    one run at a time, which sees them all as before)."""
    if parallel == 1:
        return None
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        devices = [d.strip() for d in visible.split(",") if d.strip()]
    else:
        try:
            listing = subprocess.run(
                ["nvidia-smi", "-L"], capture_output=True, text=True, check=True, timeout=30
            ).stdout
        except (OSError, subprocess.SubprocessError):
            return None
        gpus = [ln for ln in listing.splitlines() if ln.startswith("GPU ")]  # not MIG lines
        devices = [str(i) for i in range(len(gpus))]
    if not devices:
        return None
    if parallel * nproc > len(devices):  # tiny runs may share GPUs on purpose: say so, go on
        warnings.warn(
            f"--parallel {parallel} runs × --gpus-per-run {nproc} need {parallel * nproc} GPUs"
            f" to have their own; {len(devices)} are visible ({','.join(devices)}), so the runs"
            " share them",
            stacklevel=2,
        )
        return None
    return [",".join(devices[i * nproc : (i + 1) * nproc]) for i in range(parallel)]


@dataclass
class SweepSummary:
    counts: dict[str, int]
    skipped: dict[str, int]

    @property
    def ok(self) -> bool:
        return self.counts.get("failed", 0) == 0


def run_local(
    sweep_dir: str | Path,
    plan: list[dict[str, Any]],
    *,
    parallel: int = 1,
    nproc: int = 1,
    retry_diverged: bool = False,
    progress: bool = True,
) -> SweepSummary:
    """Run the plan's unfinished runs, `parallel` at a time, each in its own process."""
    if parallel < 1:
        raise ValueError(f"--parallel {parallel}: must be at least 1")
    sweep_dir = Path(sweep_dir)
    skipped: dict[str, int] = {}
    todo = []
    for entry in plan:
        reason = skip_reason(sweep_dir, entry, retry_diverged)
        if reason:
            skipped[reason] = skipped.get(reason, 0) + 1
        else:
            todo.append(entry)
    if skipped:
        print(
            f"skipping {sum(skipped.values())} of {len(plan)} runs ("
            + ", ".join(f"{n} {s}" for s, n in sorted(skipped.items()))
            + ")",
            flush=True,
        )
    counts: dict[str, int] = {}
    if not todo:
        return SweepSummary(counts, skipped)
    threads = max(1, (os.cpu_count() or 1) // (parallel * nproc))
    blocks = gpu_blocks(parallel, nproc)
    free: queue.Queue[str | None] = queue.Queue()
    for block in blocks or [None] * parallel:
        free.put(block)

    def execute_on_free_gpus(entry: dict[str, Any]) -> dict[str, Any]:
        gpus = free.get()  # one block per worker thread: never two runs on one GPU
        try:
            return execute(
                sweep_dir,
                entry,
                nproc=nproc,
                threads=threads,
                children=children,
                retry_diverged=retry_diverged,
                gpus=gpus,
            )
        finally:
            free.put(gpus)

    children = _Children()
    on_main = threading.current_thread() is threading.main_thread()
    previous = (
        {s: signal.signal(s, lambda n, f: children.forward(n)) for s in _FORWARDED}
        if on_main
        else {}
    )
    from tqdm import tqdm

    bar = tqdm(total=len(todo), unit="run", desc="sweep", disable=not progress, dynamic_ncols=True)
    pool = ThreadPoolExecutor(max_workers=parallel)
    try:
        futures = {pool.submit(execute_on_free_gpus, e): e for e in todo}
        for fut in as_completed(futures):
            entry, status = futures[fut], fut.result()
            counts[status["state"]] = counts.get(status["state"], 0) + 1
            bar.write(_status_line(entry, status))
            bar.set_postfix({k: v for k, v in sorted(counts.items())}, refresh=False)
            bar.update(1)
    except KeyboardInterrupt:
        bar.write("interrupted: asking the running trainings to save a checkpoint and stop")
        children.forward(signal.SIGTERM)
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        bar.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return SweepSummary(counts, skipped)


# ---- SLURM job array ---------------------------------------------------------------------------


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
    python: str | None = None,
    workdir: str | Path | None = None,
    retry_diverged: bool = False,
) -> str:
    """An sbatch script whose array task i trains run i of the sweep (`sweep run-one`)."""
    if not indices:
        raise ValueError("no runs to submit: every run of this sweep is done or diverged")
    sweep_dir = Path(sweep_dir).resolve()
    array = array_ranges(indices) + (f"%{max_running}" if max_running else "")
    lines = [
        "#!/bin/bash",
        f"#SBATCH --job-name={job_name or _job_name(sweep_dir)}",
        f"#SBATCH --array={array}",
        f"#SBATCH --output={sweep_dir}/slurm/%A_%a.out",
        f"#SBATCH --chdir={Path(workdir or os.getcwd()).resolve()}",
        "#SBATCH --nodes=1",
        "#SBATCH --ntasks=1",
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
    if cpus_per_task:
        lines.append(f"#SBATCH --cpus-per-task={cpus_per_task}")
    if gpus_per_run:
        lines.append(f"#SBATCH --gpus-per-task={gpus_per_run}")
    options = f" --nproc-per-run {gpus_per_run}" if gpus_per_run > 1 else ""
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
    from megatron_dyt.launch.slurm import submit as sbatch

    (Path(sweep_dir) / "slurm").mkdir(parents=True, exist_ok=True)  # the tasks' log folder
    return sbatch(script, Path(sweep_dir) / "sweep.sbatch")


# ---- command line ------------------------------------------------------------------------------


def _plan_table(sweep_dir: Path, plan: list[dict[str, Any]]) -> str:
    rows = []
    for e in plan:
        state = read_status(sweep_dir / e["run_dir"]).get("state", "pending")
        axes = "  ".join(f"{k}={_fmt(v)}" for k, v in e["axes"].items())
        rows.append(f"{e['index']:>4}  {state:<8}  {e['name']}  ({axes})")
    return "\n".join(rows)


def cmd_run(args: argparse.Namespace) -> int:
    sweep_dir = Path(args.out or Path("runs") / f"sweep-{Path(args.spec).stem}")
    plan = prepare(args.spec, sweep_dir, write=not args.dry_run)
    print(f"sweep {args.spec}: {len(plan)} runs in {sweep_dir}", file=sys.stderr, flush=True)
    if args.slurm:
        pending = [e["index"] for e in plan if not skip_reason(sweep_dir, e, args.retry_diverged)]
        if not pending:
            print(f"nothing to submit: all {len(plan)} runs are done or diverged")
            return 0
        script = array_script(
            sweep_dir,
            pending,
            partition=args.partition,
            account=args.account,
            time_limit=args.time,
            max_running=args.parallel,
            cpus_per_task=args.cpus_per_task,
            gpus_per_run=args.gpus_per_run or 0,
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
    state = run_one(
        args.sweep_dir, args.index, nproc=args.nproc_per_run, retry_diverged=args.retry_diverged
    )
    if state == "pending":  # stopped early by a signal, with a checkpoint to resume from
        _requeue_array_task()
    return 1 if state == "failed" else 0


def _requeue_array_task() -> None:
    """Under SLURM (pre-emption, the time limit's USR1): put this array task back in the queue;
    it resumes from the run's checkpoint when it starts again."""
    job, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if not (job and task):
        return
    print(f"requeueing array task {job}_{task} to resume from its checkpoint", flush=True)
    subprocess.run(["scontrol", "requeue", f"{job}_{task}"], check=False)


def cmd_report(args: argparse.Namespace) -> int:
    from megatron_dyt.launch.report import write_report

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
    one.add_argument("--retry-diverged", action="store_true", help="run it even if it diverged")
    one.set_defaults(func=cmd_run_one)

    rep = sub.add_parser(
        "report",
        help="CSV, Markdown, heat-maps and the α₀-vs-width fit of a sweep",
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
