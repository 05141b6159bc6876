"""Write full (unsharded) weights as our checkpoint at any TP/PP layout, without a process group.

The files are the ones DeepSpeed writes (so `megatron-dyt train`, `eval` and DeepSpeed's loaders
read them): at PP=1 `mp_rank_TT_model_states.pt` holding each TP rank's module state dict; at
PP>1 `layer_LL-model_TT-model_states.pt` per pipeline layer and TP rank, plus one small
`mp_rank_MM_model_states.pt` per model-parallel rank (MM = stage·TP + TP rank). The key set of
every file is taken from the real modules (built on the meta device), so it is exactly what
`load_state_dict` wants. The checkpoint is weights only: `complete.json` says so, and the trainer
then starts a fresh optimizer and learning-rate schedule from these weights at step 0.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from megatron_dyt.checkpoint.deepspeed_state import module_only_state
from megatron_dyt.checkpoint.format import (
    COMPLETE,
    CONFIG,
    LATEST,
    WEIGHTS_ONLY,
    CheckpointError,
    layer_file,
    model_file,
    tag_for,
)
from megatron_dyt.config import Config
from megatron_dyt.data.tokenizer import Tokenizer
from megatron_dyt.fileio import atomic_write
from megatron_dyt.model.sharding import layer_prefix, split_shard, tp_split


def _shard(name: str, tensor: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    split = tp_split(name)
    tensor = tensor.detach().to(torch.float32)
    if split is None or size == 1:
        return tensor.contiguous().clone()
    return split_shard(tensor, split, rank, size).clone()


def _read_layer(
    module: torch.nn.Module, prefix: str, full: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The full tensors of one pipeline layer (read once from a lazy `full`, for every rank)."""
    names = [prefix + k for k, v in module.state_dict().items() if torch.is_tensor(v)]
    return {name: full[name] for name in names if name in full}


def _stage_state(
    module: torch.nn.Module, prefix: str, full: Mapping[str, torch.Tensor], rank: int, size: int
) -> dict[str, Any]:
    """`module.state_dict()` with this TP rank's slices of the full tensors."""
    out: dict[str, Any] = {}
    for key, value in module.state_dict().items():
        if not torch.is_tensor(value):  # megatron-core's `_extra_state` entries
            out[key] = value
            continue
        name = prefix + key
        if name not in full:
            raise CheckpointError(f"tensor '{name}' is missing from the weights to write")
        tensor = full[name]
        if list(tensor.shape) != list(value.shape):
            raise CheckpointError(
                f"tensor '{name}' has shape {list(tensor.shape)}, the model expects"
                f" {list(value.shape)}"
            )
        out[key] = _shard(name, tensor, rank, size)
    return out


def write_checkpoint(
    full: Mapping[str, torch.Tensor],
    cfg: Config,
    run_dir: Path,
    *,
    tokenizer: Tokenizer | None = None,
    info: Mapping[str, Any] | None = None,
    progress: bool = True,
) -> Path:
    """Write `full` (canonical names, TP=1) as step 0 of `run_dir/checkpoints`; returns the folder.

    Written under a temporary name and renamed into place, then `latest` is pointed at it.
    `full` may be lazy (a tensor made when asked for, as an import's is): at PP>1 the writer
    holds one pipeline layer's full tensors at a time; at PP=1 one TP rank's file, 1/TP of the
    model, each rank reading `full` once.
    """
    from megatron_dyt.info import build_meta_model

    tp, pp = cfg.parallel.tensor, cfg.parallel.pipeline
    model = build_meta_model(cfg)
    layers = [model.embedding, *model.layers, model.output]  # pipeline layers 0 … L+1
    stages = [(m, layer_prefix(i, cfg.model.num_layers)) for i, m in enumerate(layers)]

    root = Path(run_dir) / "checkpoints"
    tag = tag_for(0)
    folder = root / tag
    if folder.exists():
        raise CheckpointError(f"'{folder}' already exists; remove it or choose another output")
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{tag}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    client = {"step": 0, "data_cursor": 0, "consumed_samples": 0, "skipped_batches": []}
    try:
        bar = tqdm(
            total=tp * (1 if pp == 1 else len(stages)),
            desc="write",
            unit="file",
            disable=not progress,
        )
        if pp == 1:  # one file per TP rank holds the whole model: each rank reads `full`
            for rank in range(tp):
                module = _stage_state(model, "", full, rank, tp)
                torch.save(module_only_state(module, tp, client), tmp / model_file(rank))
                bar.update(1)
        else:  # a file per layer and TP rank: each layer is read once, for all its ranks
            for index, (stage, prefix) in enumerate(stages):
                layer = _read_layer(stage, prefix, full)
                for rank in range(tp):
                    state = _stage_state(stage, prefix, layer, rank, tp)
                    torch.save(state, tmp / layer_file(index, rank))
                    bar.update(1)
                del layer
            for mp_rank in range(tp * pp):
                torch.save(module_only_state(None, tp * pp, client), tmp / model_file(mp_rank))
        bar.close()
        saved = cfg
        if cfg.parallel.zero_stage == 3:  # the files are the ZeRO-0/1/2 layout
            saved = cfg.model_copy(
                update={"parallel": cfg.parallel.model_copy(update={"zero_stage": 1})}
            )
        (tmp / CONFIG).write_text(saved.to_yaml())
        if tokenizer is not None:
            tokenizer.save(tmp)
        (tmp / COMPLETE).write_text(
            json.dumps({**client, "world_size": tp * pp, WEIGHTS_ONLY: True, **(info or {})})
        )
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic_write(root / LATEST, tag)
    return folder
