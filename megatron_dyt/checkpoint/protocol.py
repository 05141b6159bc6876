"""Saving and loading a training checkpoint with every rank: the complete.json protocol.

A checkpoint counts only once every rank has written its part and rank 0 has written
`complete.json` in it; only then does `checkpoints/latest` (DeepSpeed's own pointer file, so its
tools work) move to it, by an atomic rename. A crash mid-save leaves a folder without
`complete.json`, which is never picked (docs/design.md §4).
"""

from __future__ import annotations

import json
import random
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from megatron_dyt.checkpoint.format import (
    COMPLETE,
    CONFIG,
    LATEST,
    WEIGHTS_ONLY,
    CheckpointError,
    complete_tags,
    read_complete,
    rng_file,
    tag_for,
)
from megatron_dyt.config import Config
from megatron_dyt.data.tokenizer import Tokenizer
from megatron_dyt.fileio import atomic_write


def _rng_state() -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save(
    engine,
    root: Path,
    step: int,
    client_state: dict[str, Any],
    cfg: Config,
    tokenizer: Tokenizer | None,
    keep: int,
) -> Path:
    """Collective: every rank calls it. Returns the checkpoint folder."""
    tag = tag_for(step)
    folder = root / tag
    rank = dist.get_rank()
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if folder.exists():  # a save of this step that never completed
            shutil.rmtree(folder)
    dist.barrier()
    engine.save_checkpoint(str(root), tag=tag, client_state=client_state, save_latest=False)
    torch.save(_rng_state(), folder / rng_file(rank))
    dist.barrier()
    if rank == 0:
        (folder / CONFIG).write_text(cfg.to_yaml())
        if tokenizer is not None:
            tokenizer.save(folder)
        atomic_write(
            folder / COMPLETE,
            json.dumps(
                {
                    "step": step,
                    "world_size": dist.get_world_size(),
                    "time": time.time(),
                    **client_state,
                }
            ),
        )
        atomic_write(root / LATEST, tag)
        for old in complete_tags(root)[:-keep]:
            shutil.rmtree(root / old, ignore_errors=True)
    dist.barrier()
    return folder


def load(engine, root: Path, tag: str) -> dict[str, Any]:
    """Restore model, optimizer, scheduler, RNG; returns the client state (data position)."""
    folder = root / tag
    info = read_complete(folder)
    weights_only = bool(info.get(WEIGHTS_ONLY, False))
    if weights_only and engine.zero_optimization_partition_weights():
        raise CheckpointError(
            f"checkpoint '{folder}' holds weights only (an import); it loads with"
            " parallel.zero_stage 0, 1 or 2, not 3: start from it with ZeRO-1/2, save, then"
            " switch to ZeRO-3 (or convert it with zero_stage<=2)"
        )
    try:
        # A weights-only checkpoint (`megatron-dyt convert from-hf`) has no optimizer or
        # schedule state: the module is loaded and both start fresh (step 0).
        path, client_state = engine.load_checkpoint(
            str(root),
            tag=tag,
            load_optimizer_states=not weights_only,
            load_lr_scheduler_states=not weights_only,
            load_module_only=weights_only,
        )
    except Exception as exc:  # DeepSpeed raises whatever torch.load raised
        raise CheckpointError(
            f"cannot load checkpoint '{folder}': {type(exc).__name__}: {exc}"
        ) from exc
    if path is None:
        raise CheckpointError(f"DeepSpeed found no model states in checkpoint '{folder}'")
    if weights_only:
        client_state = {k: info[k] for k in ("step", "data_cursor", "skipped_batches") if k in info}
        client_state["weights_only"] = True
    rng = folder / rng_file(dist.get_rank())
    if rng.is_file():
        try:
            _set_rng_state(torch.load(rng, weights_only=False))
        except Exception as exc:
            raise CheckpointError(f"cannot read '{rng}': {exc}") from exc
    return client_state
