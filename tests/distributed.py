"""Run a test function in N real processes (gloo on localhost) and collect what each returns."""

from __future__ import annotations

import os
import socket
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, fn: Callable, args: tuple, out_dir: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world),
        OMP_NUM_THREADS="1",
    )
    torch.set_num_threads(1)
    try:
        result = fn(*args)
    except BaseException:
        Path(out_dir, f"error-{rank}.txt").write_text(traceback.format_exc())
        raise
    finally:
        from megatron_dyt import parallel

        parallel.teardown()
    torch.save(result, Path(out_dir, f"rank-{rank}.pt"))


def run(fn: Callable, world: int, *args: Any, tmp_path: Path) -> list[Any]:
    """`fn(*args)` on ranks 0..world-1; returns the per-rank results in rank order."""
    out = tmp_path / f"dist-{fn.__name__}-{world}"
    out.mkdir(parents=True, exist_ok=True)
    try:
        mp.start_processes(
            _worker,
            args=(world, _free_port(), fn, args, str(out)),
            nprocs=world,
            join=True,
            start_method="spawn",
        )
    except mp.ProcessRaisedException:
        errors = "\n".join(p.read_text() for p in sorted(out.glob("error-*.txt")))
        raise AssertionError(f"a worker failed:\n{errors}") from None
    return [torch.load(out / f"rank-{r}.pt", weights_only=False) for r in range(world)]
