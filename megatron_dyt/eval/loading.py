"""A training checkpoint rebuilt for evaluation, at its own layout or merged in one process.

Shared by `megatron-dyt eval` and the lm-eval model built from `--model_args` (`adapter`), so
both load the same weights at the same layout and dtype and therefore score alike.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from megatron_dyt.errors import EvalError

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


@dataclass
class LoadedCheckpoint:
    """This rank's piece of the model, ready to evaluate, and where it came from."""

    module: nn.Module
    cfg: Any  # the resolved Config at the evaluation layout
    tokenizer: Any
    folder: Path
    step: int | None
    device: torch.device
    dtype: torch.dtype


def _at_saved_layout(folder: Path, saved, cfg) -> bool:
    """Whether each rank can load its own shard as saved: same TP and PP (any DP), and a
    checkpoint of per-rank files (not ZeRO-3 partitions or a layout-free universal one)."""
    from megatron_dyt.checkpoint import is_universal

    s, c = saved.parallel, cfg.parallel
    return (
        (s.tensor, s.pipeline) == (c.tensor, c.pipeline)
        and s.zero_stage < 3
        and saved.padded_vocab_size == cfg.padded_vocab_size
        and not is_universal(folder)
    )


def resolve_dtype(name: str | None, cfg) -> torch.dtype:
    """`None`/`auto`: the checkpoint's training precision (`train.precision`); else a name of
    `DTYPES`."""
    from megatron_dyt.layout import precision

    if name is None or name == "auto":
        return precision(cfg)
    if name not in DTYPES:
        raise EvalError(f"dtype {name!r} is not allowed; allowed: auto, {', '.join(DTYPES)}")
    dtype = DTYPES[name]
    if dtype == torch.float16 and not torch.cuda.is_available():
        raise EvalError("dtype float16 needs a GPU; on CPU use float32 or bfloat16")
    return dtype


def load_checkpoint(
    checkpoint: str | Path,
    *,
    overrides: Iterable[str] | Mapping[str, Any] = (),
    dtype: str | None = None,
    device: str | None = None,
) -> LoadedCheckpoint:
    """Set up the process groups and load this rank's piece of `checkpoint`.

    Launched with as many processes as the checkpoint's TP × PP (or a multiple: data-parallel
    replicas), every rank reads only its own shard; one process merges the model to TP=PP=1.
    `overrides` (config keys, e.g. `parallel.tensor=1`) choose another layout. `device`: `cpu`,
    or `cuda` (this rank's GPU, from LOCAL_RANK), falling back to the CPU where there is none.
    """
    from megatron_dyt import checkpoint as ckpt
    from megatron_dyt import parallel
    from megatron_dyt.config import apply_overrides, config_from_dict
    from megatron_dyt.data import Tokenizer
    from megatron_dyt.model import (
        LlamaModel,
        load_full_state_dict,
        load_local_state_dict,
        stage_module,
    )

    if device is not None and device != "cpu" and not str(device).startswith("cuda"):
        raise EvalError(f"device {device!r} is not allowed; allowed: cuda, cpu")
    use_cuda = torch.cuda.is_available() and device != "cpu"
    folder = ckpt.resolve(checkpoint)
    saved = ckpt.read_config(folder)
    tree = saved.to_dict()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    layout = tree["parallel"]
    if world % (layout["tensor"] * layout["pipeline"]) and world != 1:
        raise EvalError(
            f"{world} processes cannot hold the checkpoint's layout TP {layout['tensor']} ×"
            f" PP {layout['pipeline']}; launch a multiple of {layout['tensor'] * layout['pipeline']}"
            " processes, or one process (TP=PP=1)"
        )
    if world == 1:
        layout.update(tensor=1, pipeline=1)
    layout.update(zero_stage=0, sequence_parallel=False)
    apply_overrides(tree, overrides)
    cfg = config_from_dict(tree, f"{folder / 'config.yaml'} + overrides", saved=True)
    torch_dtype = resolve_dtype(dtype, cfg)

    parallel.setup(cfg.parallel, backend=None if use_cuda else "gloo")
    from megatron.core import parallel_state as ps

    where = torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")
    stage = ps.get_pipeline_model_parallel_rank()
    module = LlamaModel(cfg) if cfg.parallel.pipeline == 1 else stage_module(cfg, stage)
    if _at_saved_layout(folder, saved, cfg):
        # every rank reads its own shard only: a 70B model is never whole in one process
        shard = ckpt.rank_weights(folder, saved, stage, ps.get_tensor_model_parallel_rank())
        load_local_state_dict(module, shard)
        del shard
    else:
        full = ckpt.read_full_state_dict(folder, saved, vocab_rows=cfg.padded_vocab_size)
        load_full_state_dict(module, full)
        del full
    module = module.to(device=where, dtype=torch_dtype).eval()
    return LoadedCheckpoint(
        module=module,
        cfg=cfg,
        tokenizer=Tokenizer(folder / "tokenizer.model"),
        folder=folder,
        step=ckpt.read_complete(folder).get("step"),
        device=where,
        dtype=torch_dtype,
    )
