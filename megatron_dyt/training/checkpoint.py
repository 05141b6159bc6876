"""Checkpoints: DeepSpeed's layout plus our config, tokenizer, data position and RNG states.

A checkpoint is `checkpoints/step_XXXXXXX/`. It counts only once every rank has written its part
and rank 0 has written `complete.json` in it; only then does `checkpoints/latest` (DeepSpeed's
own pointer file, so its tools work) move to it, by an atomic rename. A crash mid-save leaves a
folder without `complete.json`, which is never picked.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from megatron_dyt.config import Config

COMPLETE = "complete.json"
LATEST = "latest"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file."""


def tag_for(step: int) -> str:
    return f"step_{step:07d}"


def atomic_write(path: Path, text: str) -> None:
    """Write `text` to `path` so a reader sees the old file or the whole new one, never part."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    with open(tmp) as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def complete_tags(root: Path) -> list[str]:
    """Finished checkpoints, oldest first."""
    if not root.is_dir():
        return []
    tags = [p.name for p in root.iterdir() if p.is_dir() and (p / COMPLETE).is_file()]
    return sorted(tags, key=lambda t: json.loads((root / t / COMPLETE).read_text())["step"])


def find_latest(root: Path) -> str | None:
    """The tag to resume from: `latest` if it names a complete checkpoint, else the newest one."""
    pointer = root / LATEST
    if pointer.is_file():
        tag = pointer.read_text().strip()
        if (root / tag / COMPLETE).is_file():
            return tag
    tags = complete_tags(root)
    return tags[-1] if tags else None


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
    tokenizer_path: str | None,
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
    torch.save(_rng_state(), folder / f"rng_rank{rank:05d}.pt")
    dist.barrier()
    if rank == 0:
        (folder / "config.yaml").write_text(cfg.to_yaml())
        if tokenizer_path:
            shutil.copy2(tokenizer_path, folder / "tokenizer.model")
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
    if not (folder / COMPLETE).is_file():
        raise CheckpointError(
            f"checkpoint '{folder}' is incomplete (no {COMPLETE}): it was interrupted while being"
            " written; remove it or resume from an earlier one"
        )
    info = json.loads((folder / COMPLETE).read_text())
    weights_only = bool(info.get("weights_only", False))
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
    rng_file = folder / f"rng_rank{dist.get_rank():05d}.pt"
    if rng_file.is_file():
        try:
            _set_rng_state(torch.load(rng_file, weights_only=False))
        except Exception as exc:
            raise CheckpointError(f"cannot read '{rng_file}': {exc}") from exc
    return client_state


# ---- reading a checkpoint outside training (evaluation, conversion) --------------------------


def resolve(path: str | Path) -> Path:
    """A checkpoint folder from a run folder, its `checkpoints/` folder or a `step_*` folder."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint '{path}' does not exist")
    if (path / COMPLETE).is_file():
        return path
    root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    tag = find_latest(root)
    if tag is None:
        raise CheckpointError(
            f"no complete checkpoint under '{path}' (expected a run folder, its checkpoints/"
            f" folder, or a step_XXXXXXX folder holding {COMPLETE})"
        )
    return root / tag


def read_config(folder: Path) -> Config:
    from megatron_dyt.config import load_config

    return load_config(folder / "config.yaml", saved=True)


def read_full_state_dict(
    folder: Path, cfg: Config, vocab_rows: int | None = None
) -> dict[str, torch.Tensor]:
    """The full (TP-merged, all stages) model weights of a checkpoint, by canonical name.

    `cfg` is the checkpoint's own config. The embedding and output head come back with
    `vocab_rows` rows (default: `cfg`'s padded vocabulary): the padding depends on the TP size,
    so a model built at another one needs other padding rows (no token maps to them).
    """
    from megatron_dyt.convert.reshard import fit_vocab_rows

    return fit_vocab_rows(_read_full(folder, cfg), vocab_rows or cfg.padded_vocab_size)


def _read_full(folder: Path, cfg: Config) -> dict[str, torch.Tensor]:
    from megatron_dyt.convert.reshard import is_universal, read_universal_weights
    from megatron_dyt.model.init import tp_partition
    from megatron_dyt.parallel import merge_shards

    if is_universal(folder):  # written by `convert reshard`: full tensors already
        return read_universal_weights(folder)
    tp, pp = cfg.parallel.tensor, cfg.parallel.pipeline
    if cfg.parallel.zero_stage == 3:
        if tp > 1:
            raise CheckpointError(
                f"'{folder}': reading ZeRO-3 checkpoints with parallel.tensor={tp} is not"
                " supported yet (ZeRO-3 with TP=1 is)"
            )
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return dict(get_fp32_state_dict_from_zero_checkpoint(str(folder.parent), tag=folder.name))
    shards: list[dict[str, torch.Tensor]] = []
    for rank in range(tp):
        if pp == 1:
            shards.append(_load(folder / f"mp_rank_{rank:02d}_model_states.pt")["module"])
            continue
        merged = {}
        for index in range(cfg.model.num_layers + 2):
            prefix = _layer_prefix(index, cfg.model.num_layers)
            layer = _load(folder / f"layer_{index:02d}-model_{rank:02d}-model_states.pt")
            merged.update({prefix + k: v for k, v in layer.items()})
        shards.append(merged)
    full = {}
    for name, tensor in shards[0].items():
        split = tp_partition(name)
        full[name] = tensor if split is None else merge_shards([s[name] for s in shards], *split)
    return full


def _layer_prefix(index: int, num_layers: int) -> str:
    """Canonical prefix of pipeline layer `index`: embedding, blocks, then the output stage."""
    if index == 0:
        return "embedding."
    if index == num_layers + 1:
        return "output."
    return f"layers.{index - 1}."


def _load(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"checkpoint file '{path}' is missing")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise CheckpointError(f"cannot read checkpoint file '{path}': {exc}") from exc
