"""`megatron-dyt convert reshard`: a checkpoint of one TP/PP/DP/ZeRO layout as a new run folder
for another, optimizer state included.

The work is the universal checkpoint form (`megatron_dyt/checkpoint/universal.py`): the source
is read at its own layout and written layout-free, with the target config beside it, so
`megatron-dyt train OUT/config.yaml --run-dir OUT` resumes it at the new layout. `megatron-dyt
train … resume.reshard=true` does the same inside the run folder while resuming.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

from megatron_dyt.arguments import positive_int
from megatron_dyt.checkpoint.format import (
    COMPLETE,
    CONFIG,
    LATEST,
    has_tokenizer,
    read_complete,
    read_config,
    read_tokenizer,
    resolve,
    tag_for,
)
from megatron_dyt.checkpoint.universal import convert_to_universal, read_meta
from megatron_dyt.config import config_from_dict
from megatron_dyt.errors import UsageError
from megatron_dyt.fileio import atomic_write


def reshard_checkpoint(
    source: str | Path,
    out: str | Path,
    *,
    tensor: int | None = None,
    pipeline: int | None = None,
    zero_stage: int | None = None,
    progress: bool = True,
) -> Path:
    """Write checkpoint `source` as a new run folder `out` for another TP/PP (any DP).

    The run folder holds the target config and one universal checkpoint, so `megatron-dyt train
    OUT/config.yaml --run-dir OUT` resumes it on TP×PP×DP processes for any DP.
    """
    from megatron_dyt.info import build_meta_model
    from megatron_dyt.model.init import canonical_parameters

    folder = resolve(source)
    cfg = read_config(folder)
    tree = cfg.to_dict()
    for key, value in (("tensor", tensor), ("pipeline", pipeline), ("zero_stage", zero_stage)):
        if value is not None:
            tree["parallel"][key] = value
    target = config_from_dict(
        tree,
        f"for the target layout (parallel.tensor={tree['parallel']['tensor']},"
        f" parallel.pipeline={tree['parallel']['pipeline']})",
        saved=True,
    )
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"output '{out}' exists and is not an empty folder; give a new folder")
    expected = {n: list(p.shape) for n, p in canonical_parameters(build_meta_model(target))}
    done = read_complete(folder)
    tag = tag_for(int(done["step"]))
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        step_dir = tmp / "checkpoints" / tag
        step_dir.parent.mkdir(parents=True)
        meta = convert_to_universal(
            folder, step_dir, expected=expected, vocab_size=cfg.model.vocab_size, progress=progress
        )
        (tmp / CONFIG).write_text(target.to_yaml())
        (step_dir / CONFIG).write_text(target.to_yaml())
        if has_tokenizer(folder):
            read_tokenizer(folder).save(step_dir)
        client = {
            k: meta[k] for k in ("step", "data_cursor", "consumed_samples", "skipped_batches")
        }
        atomic_write(
            step_dir / COMPLETE, json.dumps({**client, "universal": True, "source": str(folder)})
        )
        atomic_write(tmp / "checkpoints" / LATEST, tag)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out / "checkpoints" / tag


def add_reshard_parser(convert_subparsers) -> argparse.ArgumentParser:
    """`convert reshard CHECKPOINT OUT --tp T --pp P` under the `convert` command."""
    p = convert_subparsers.add_parser(
        "reshard",
        help="rewrite a checkpoint for another TP/PP/DP layout, optimizer state included",
        description="Read a checkpoint saved at any TP/PP/DP/ZeRO layout and write a new run"
        " folder OUT whose config has the target layout and whose checkpoint is layout-free:"
        " full fp32 weights, Adam moments and step, lr-schedule and data position. Resume it"
        " with `megatron-dyt train OUT/config.yaml --run-dir OUT` on TP×PP×DP processes.",
    )
    p.add_argument(
        "checkpoint", metavar="CHECKPOINT", help="run folder, its checkpoints/ or a step_* folder"
    )
    p.add_argument("out", metavar="OUT", help="new run folder to write")
    p.add_argument("--tp", type=positive_int, default=None, help="target tensor-parallel size")
    p.add_argument("--pp", type=positive_int, default=None, help="target pipeline-parallel size")
    p.add_argument(
        "--zero-stage",
        type=int,
        default=None,
        choices=[0, 1, 2],
        help="target ZeRO stage (resharded resume supports 0-2)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_reshard)
    return p


def cmd_reshard(args: argparse.Namespace) -> int:
    folder = reshard_checkpoint(
        args.checkpoint,
        args.out,
        tensor=args.tp,
        pipeline=args.pp,
        zero_stage=args.zero_stage,
        progress=not args.no_progress,
    )
    cfg = read_config(folder)
    meta = read_meta(folder)
    p = cfg.parallel
    print(
        f"wrote {folder} (step {meta['step']}, {len(meta['params'])} tensors"
        + (" with Adam moments," if meta["optimizer_step"] > 0 else ", no optimizer state yet,")
        + f" {meta['consumed_samples']} samples consumed) for TP={p.tensor}/PP={p.pipeline}, any DP"
    )
    print(
        f"resume: torchrun --nproc-per-node <{p.tensor * p.pipeline}×DP> -m megatron_dyt train"
        f" {Path(args.out) / 'config.yaml'} --run-dir {args.out}"
    )
    return 0
