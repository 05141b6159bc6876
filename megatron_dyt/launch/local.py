"""`megatron-dyt launch local`: the same training processes on this machine, via torchrun."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
from pathlib import Path

from megatron_dyt.config import Config
from megatron_dyt.launch.layout import job_layout


def command(
    config: str, overrides: list[str], run_dir: Path, nproc: int, python: str | None = None
) -> list[str]:
    return [
        python or sys.executable,
        "-m",
        "megatron_dyt.launch.node",
        "--standalone",
        "--nnodes=1",
        f"--nproc-per-node={nproc}",
        "--max-restarts=0",
        "-m",
        "megatron_dyt.cli",
        "train",
        config,
        *overrides,
        "--run-dir",
        str(run_dir),
    ]


def launch(
    cfg: Config,
    config: str,
    overrides: list[str],
    run_dir: Path,
    nproc: int,
    dry_run: bool = False,
) -> int:
    layout = job_layout(cfg, 1, nproc)
    cmd = command(config, overrides, run_dir, nproc)
    print(
        f"{nproc} process(es) = TP {layout.tensor} × PP {layout.pipeline} × DP {layout.data}:\n  "
        + " ".join(cmd),
        flush=True,
    )
    if dry_run:
        return 0
    return run_forwarding_signals(cmd)


FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1)


def run_forwarding_signals(cmd: list[str]) -> int:
    """Run `cmd` and pass every stop signal this process gets on to it, exactly once.

    The child gets its own session, so a Ctrl-C in the terminal reaches it only through here
    (torchrun, hit twice, would cut its workers' checkpoint short); a SIGTERM to the launcher
    stops the training instead of orphaning it.
    """
    proc = subprocess.Popen(cmd, start_new_session=True)

    def forward(signum: int, _frame) -> None:
        # a closed terminal (SIGHUP) saves like SIGTERM; torchrun would pass SIGHUP on as is
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM if signum == signal.SIGHUP else signum)

    previous = {s: signal.signal(s, forward) for s in FORWARDED}
    try:
        return proc.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
