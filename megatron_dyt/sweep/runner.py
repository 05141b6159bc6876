"""Running a sweep's runs on this machine: one `megatron-dyt train` child process per run.

Supervision lives here and nowhere else: the children are started in sessions of their own,
get SIGTERM if the sweep dies, and receive the sweep's stop signals so they checkpoint first;
`--parallel` runs share the machine with GPU blocks of their own (CUDA_VISIBLE_DEVICES). How
each run ended is decided by `state.end_state` and recorded in its sweep.json. A SLURM array
task runs one run through `run_one`, the same way.
"""

from __future__ import annotations

import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megatron_dyt.launch import local
from megatron_dyt.sweep.spec import SweepError
from megatron_dyt.sweep.state import (
    claim,
    end_state,
    finished_step,
    load_plan,
    read_status,
    skip_reason,
    write_status,
)

# What the trainer checkpoints on before it stops: the sweep passes them on to every run.
_FORWARDED = (signal.SIGTERM, signal.SIGUSR1)


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


def _die_with_parent() -> Callable[[], Any] | None:
    """A preexec_fn that makes the training get SIGTERM (and checkpoint) if the sweep process
    that started it dies, instead of living on unwatched in its own session (Linux only)."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved here, not in the forked child
    return lambda: prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def train_command(config: Path, run_dir: Path, nproc: int = 1, nodes: int = 1) -> list[str]:
    """`megatron-dyt train` in a fresh interpreter; several processes through torchrun's node
    wrapper (launch/node.py), which passes SIGUSR1 on so the workers save before stopping; on
    `nodes` > 1 nodes of a SLURM allocation, one such wrapper per node started by srun, with a
    c10d rendezvous on this node (the array task's first) at a port free here."""
    if nodes > 1:
        with socket.socket() as sock:
            sock.bind(("", 0))
            port = sock.getsockname()[1]
        head = os.environ.get("SLURMD_NODENAME") or socket.gethostname()
        job = f"{os.environ.get('SLURM_JOB_ID', 'sweep')}"
        return [
            "srun",
            "--ntasks-per-node=1",
            f"--nodes={nodes}",
            "--kill-on-bad-exit=1",
            sys.executable,
            "-m",
            "megatron_dyt.launch.node",
            f"--nnodes={nodes}",
            f"--nproc-per-node={max(1, nproc // nodes)}",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint={head}:{port}",
            f"--rdzv-id={job}",
            "--max-restarts=0",
            "-m",
            "megatron_dyt.cli",
            "train",
            str(config),
            "--run-dir",
            str(run_dir),
            "--no-progress",
        ]
    if nproc > 1:
        return local.command(str(config), ["--no-progress"], run_dir, nproc)
    cli = ["-m", "megatron_dyt", "train", str(config), "--run-dir", str(run_dir), "--no-progress"]
    return [sys.executable, *cli]


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
    nodes: int = 1,
) -> dict[str, Any]:
    """Train one planned run to its end and record how it ended in its sweep.json; a run that
    another sweep process holds, or that finished or diverged meanwhile, is left alone."""
    run_dir = sweep_dir / entry["run_dir"]
    with claim(run_dir) as mine:
        unchanged = {**read_status(run_dir), "index": entry["index"], "name": entry["name"]}
        if not mine:  # another sweep process is training it now
            return {**unchanged, "state": "running"}
        if children is not None and children.stopping:  # the sweep is being stopped
            return unchanged
        if skip_reason(sweep_dir, entry, retry_diverged, held=True):  # done since the plan
            return {**read_status(run_dir), "index": entry["index"], "name": entry["name"]}
        return _train(sweep_dir, entry, run_dir, nproc, threads, children, gpus, nodes)


def _train(
    sweep_dir: Path,
    entry: dict[str, Any],
    run_dir: Path,
    nproc: int,
    threads: int | None,
    children: _Children | None,
    gpus: str | None,
    nodes: int = 1,
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
    cmd = train_command(sweep_dir / entry["config"], run_dir, nproc, nodes)
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
    signalled = children is not None and children.stopping
    state = end_state(run_dir, entry["train_steps"], status["started"], code, signalled)
    status.update(
        state=state,
        exit_code=code,
        step=finished_step(run_dir),
        finished=time.time(),
        seconds=round(time.time() - status["started"], 1),
    )
    if state in ("failed", "diverged"):  # the log's last lines say why, for the user
        tail = _log_tail(log, start)
        errors = [ln for ln in tail if ln.startswith("megatron-dyt:") or "Error" in ln]
        status["message"] = (errors or tail or [f"exit code {code}"])[-1]
        status["log_tail"] = tail
    write_status(run_dir, status)
    return status


def run_one(
    sweep_dir: str | Path,
    index: int,
    *,
    nproc: int = 1,
    retry_diverged: bool = False,
    nodes: int = 1,
) -> str:
    """One run of a prepared sweep: what each SLURM array task calls. Returns its final state."""
    sweep_dir = Path(sweep_dir)
    plan = load_plan(sweep_dir)
    if not 0 <= index < len(plan):
        raise SweepError(f"--index {index}: this sweep has runs 0 to {len(plan) - 1}")
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
            nodes=nodes,
        )
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print(_status_line(entry, status), flush=True)
    return status["state"]


def _status_line(entry: dict[str, Any], status: dict[str, Any]) -> str:
    line = f"{entry['name']}: {status['state']} ({status.get('seconds', 0):.0f} s)"
    if status.get("message"):
        line += f": {status['message']}"
    return line


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
    """How many runs ended in each state, and how many were skipped and why."""

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
        raise SweepError(f"--parallel {parallel}: must be at least 1")
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
