"""`megatron-dyt launch local`: the same training processes on this machine, via torchrun."""

from __future__ import annotations

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
    return subprocess.run(cmd).returncode
