"""The universal (layout-free) checkpoint form, and resuming from it at any layout.

A saved checkpoint is read at its own layout (TP shards merged, pipeline stages joined, ZeRO
partitions concatenated: `reader.py`) into a layout-free form: per canonical parameter its full
fp32 weight and Adam moments (`params/<name>.pt`), plus the optimizer step, the lr-schedule
position and the data position in global samples (`universal.json`). Any layout loads that form:
each rank takes the tensors of its pipeline stage, cuts its tensor-parallel slice, and writes
weights and moments into the freshly built DeepSpeed engine (`deepspeed_state.py`), so Adam
goes on exactly where it stopped.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from megatron_dyt.checkpoint import deepspeed_state as ds
from megatron_dyt.checkpoint.format import (
    UNIVERSAL_CACHE,
    UNIVERSAL_FORMAT,
    UNIVERSAL_META,
    UNIVERSAL_PARAMS,
    UNIVERSAL_VERSION,
    CheckpointError,
    is_universal,
    read_complete,
    read_config,
    saved_layout,
    universal_param_file,
)
from megatron_dyt.checkpoint.reader import read_meta, read_stage
from megatron_dyt.config import Config
from megatron_dyt.fileio import atomic_write
from megatron_dyt.layout import batch_layout
from megatron_dyt.model.sharding import fit_rows, full_shape, is_vocab_tensor, split_shard, tp_split


def _check_shape(name: str, shape: list[int], expected: list[int], vocab: int, where: str) -> None:
    """A saved full shape against the one the model expects; vocab padding may differ."""
    if shape == expected:
        return
    if (
        is_vocab_tensor(name)
        and len(shape) == len(expected)
        and shape[1:] == expected[1:]
        and min(shape[0], expected[0]) >= vocab
    ):
        return  # only padding rows (no token maps to them) differ: cut or zero-filled on load
    raise CheckpointError(
        f"tensor '{name}' has shape {shape} in {where}; the target config expects {expected}"
    )


def convert_to_universal(
    folder: Path,
    out: Path,
    *,
    expected: dict[str, list[int]] | None = None,
    vocab_size: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Read checkpoint `folder` at its own layout and write its universal form to `out`.

    One pipeline stage is in memory at a time. `expected` (full shapes of the target model)
    checks every tensor before anything is kept. The folder appears at once (os.replace).
    """
    from tqdm import tqdm

    folder, out = Path(folder), Path(out)
    cfg = read_config(folder)
    done = read_complete(folder)
    layout = saved_layout(folder, cfg)
    vocab = vocab_size or cfg.model.vocab_size
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / UNIVERSAL_PARAMS).mkdir(parents=True)
    params: dict[str, Any] = {}
    bar = tqdm(desc="reshard", unit="tensor", total=0, disable=not progress, dynamic_ncols=True)
    try:
        for stage in range(layout.pipeline):
            states = read_stage(folder, cfg, layout, stage)
            bar.total += len(states)
            bar.refresh()
            for name, st in states.items():
                if expected is not None:
                    if name not in expected:
                        raise CheckpointError(
                            f"tensor '{name}' of '{folder}' is not in the target model"
                        )
                    _check_shape(name, list(st.weight.shape), expected[name], vocab, f"'{folder}'")
                record = {"weight": st.weight.float(), "step": st.step}
                for key in ds.MOMENTS:
                    value = getattr(st, key)
                    record[key] = None if value is None else value.float()
                torch.save(record, universal_param_file(tmp, name))
                params[name] = {"shape": list(st.weight.shape), "step": st.step, "group": st.group}
                bar.update(1)
        if expected is not None and (missing := sorted(set(expected) - set(params))):
            raise CheckpointError(
                f"tensor '{missing[0]}' of the target model is missing from '{folder}'"
                + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
            )
        step = int(done["step"])
        opt_steps = sorted({p["step"] for p in params.values() if p["group"] is not None})
        if len(opt_steps) != 1:
            raise CheckpointError(
                f"'{folder}': parameters were updated a different number of times ({opt_steps})"
            )
        global_batch = batch_layout(cfg, layout.data).global_batch
        cursor = int(done.get("data_cursor", step))
        meta = {
            "format": UNIVERSAL_FORMAT,
            "version": UNIVERSAL_VERSION,
            "step": step,
            "optimizer_step": opt_steps[0],
            "lr_scheduler_last_epoch": step,
            "data_cursor": cursor,
            "global_batch": global_batch,
            "consumed_samples": int(done.get("consumed_samples", cursor * global_batch)),
            "skipped_batches": list(done.get("skipped_batches", [])),
            "vocab_size": cfg.model.vocab_size,
            "source": {"checkpoint": str(folder), "layout": asdict(layout)},
            "params": params,
        }
        atomic_write(tmp / UNIVERSAL_META, json.dumps(meta, indent=1) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        bar.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return meta


def universal_of(folder: Path, progress: bool = True) -> Path:
    """The universal form of checkpoint `folder`, written next to its files on first use.

    Collective: rank 0 converts (every rank gets its error, if any), the others wait for it.
    """
    import torch.distributed as dist

    if is_universal(folder):
        return folder
    out = folder / UNIVERSAL_CACHE
    error = None
    if dist.get_rank() == 0 and not is_universal(out):
        try:
            convert_to_universal(folder, out, progress=progress)
        except (CheckpointError, OSError) as exc:
            error = str(exc)
    box = [error]
    dist.broadcast_object_list(box, src=0)
    if box[0] is not None:
        raise CheckpointError(box[0])
    return out


# ---- loading the universal form into an engine ---------------------------------------------------


def _collective_check(problems: list[str]) -> None:
    """Raise the first problem any rank found, on every rank (no rank is left waiting)."""
    import torch.distributed as dist

    everyone: list[list[str] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, problems)
    found = [p for ps in everyone if ps for p in ps]
    if found:
        raise CheckpointError(found[0])


def load_universal(
    engine, folder: Path, cfg: Config, global_batch: int, progress: bool = False
) -> dict[str, Any]:
    """Put a universal checkpoint's weights, moments, step and lr position into `engine`.

    Collective. Returns the client state the trainer resumes from, the data cursor converted to
    this run's global batch (the position is kept in global samples).
    """
    import torch.distributed as dist
    from tqdm import tqdm

    from megatron_dyt.model.init import canonical_parameters
    from megatron_dyt.parallel import tp_rank, tp_size

    meta = read_meta(folder)
    saved = meta["params"]
    local = list(canonical_parameters(engine.module))
    size, rank = tp_size(), tp_rank()
    where = f"'{folder}'"
    problems = []
    for name, param in local:
        if name not in saved:
            problems.append(f"tensor '{name}' of the model is missing from checkpoint {where}")
            continue
        try:
            _check_shape(
                name,
                saved[name]["shape"],
                full_shape(name, param.shape, size),
                cfg.model.vocab_size,
                where,
            )
        except CheckpointError as exc:
            problems.append(str(exc))
    names: list[list[str] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(names, [n for n, _ in local])
    used = {n for ns in names if ns for n in ns}
    extra = sorted(set(saved) - used)
    if extra:
        problems.append(f"tensor '{extra[0]}' of checkpoint {where} is not in the model")
    kind = ds.engine_kind(engine)
    if kind is None:
        problems.append(
            f"cannot load {where} into a {type(engine.optimizer).__name__}: resharded resume"
            " supports ZeRO stages 0-2 (fp32 or bf16)"
        )
    _collective_check(problems)

    values: dict[int, dict[str, Any]] = {}
    bar = tqdm(local, desc="load", unit="tensor", disable=not progress, dynamic_ncols=True)
    for name, param in bar:
        record = torch.load(universal_param_file(folder, name), weights_only=True, mmap=True)
        rows = full_shape(name, param.shape, size)[0]
        entry = {}
        for key in ("weight", *ds.MOMENTS):
            value = record[key]
            if value is not None:
                if is_vocab_tensor(name):
                    value = fit_rows(value, rows)
                split = tp_split(name)
                if split is not None:
                    value = split_shard(value, split, rank, size)
                value = value.to(torch.float32).contiguous()
            entry[key] = value
        values[id(param)] = entry
    step = int(meta["optimizer_step"])
    with torch.no_grad():
        if kind == "torch":
            ds.load_torch(engine.optimizer, [p for _, p in local], values, step)
        else:
            ds.load_flat(engine.optimizer, values, step)
        for _, param in local:  # not in the optimizer's partitions: set directly
            if not param.requires_grad:
                param.data.copy_(values[id(param)]["weight"].to(param.dtype))
    ds.set_position(
        engine,
        step=int(meta["step"]),
        samples=int(meta["consumed_samples"]),
        schedule_epoch=int(meta["lr_scheduler_last_epoch"]),
    )
    return _client_state(meta, global_batch, folder)


def _client_state(meta: dict[str, Any], global_batch: int, folder: Path) -> dict[str, Any]:
    """The saved data position, in batches of this run's global batch (same global samples)."""
    consumed, saved_batch = int(meta["consumed_samples"]), int(meta["global_batch"])
    if saved_batch == global_batch:
        cursor, skipped = int(meta["data_cursor"]), list(meta["skipped_batches"])
    else:
        if consumed % global_batch:
            raise CheckpointError(
                f"checkpoint '{folder}' stopped after {consumed} samples, not a whole number of"
                f" this run's global batches of {global_batch} sequences; use a global batch"
                f" that divides {consumed}"
            )
        cursor, skipped = consumed // global_batch, []
    return {
        "step": int(meta["step"]),
        "data_cursor": cursor,
        "consumed_samples": consumed,
        "skipped_batches": skipped,
    }
