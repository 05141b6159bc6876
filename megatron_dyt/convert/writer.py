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

from megatron_dyt.config import Config
from megatron_dyt.convert.mapping import ConvertError
from megatron_dyt.training import checkpoint as ckpt

WEIGHTS_ONLY = "weights_only"


def _mp_state(module: dict[str, Any] | None, mp_world: int, client: dict[str, Any]) -> dict:
    """What DeepSpeed's module-only load reads from an `mp_rank_*` file (no optimizer state)."""
    return {
        "module": module,
        "buffer_names": [],
        "optimizer": None,
        "lr_scheduler": None,
        "skipped_steps": 0,
        "global_steps": 0,
        "global_samples": 0,
        "dp_world_size": 1,
        "mp_world_size": mp_world,
        **client,
    }


def _shard(name: str, tensor: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    from megatron_dyt.model.init import tp_partition
    from megatron_dyt.parallel import split_shard

    split = tp_partition(name)
    if split is None or size == 1:
        return tensor.detach().to(torch.float32).contiguous().clone()
    return split_shard(tensor.detach().to(torch.float32), split[0], split[1], rank, size).clone()


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
            raise ConvertError(f"tensor '{name}' is missing from the weights to write")
        tensor = full[name]
        if list(tensor.shape) != list(value.shape):
            raise ConvertError(
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
    tokenizer: Path | None = None,
    info: Mapping[str, Any] | None = None,
    progress: bool = True,
) -> Path:
    """Write `full` (canonical names, TP=1) as step 0 of `run_dir/checkpoints`; returns the folder.

    Written under a temporary name and renamed into place, then `latest` is pointed at it.
    """
    from megatron_dyt.info import build_meta_model

    tp, pp = cfg.parallel.tensor, cfg.parallel.pipeline
    model = build_meta_model(cfg)
    stages: list[tuple[torch.nn.Module, str]] = [(model.embedding, "embedding.")]
    stages += [(layer, f"layers.{i}.") for i, layer in enumerate(model.layers)]
    stages.append((model.output, "output."))

    root = Path(run_dir) / "checkpoints"
    tag = ckpt.tag_for(0)
    folder = root / tag
    if folder.exists():
        raise ConvertError(f"'{folder}' already exists; remove it or choose another output")
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
        for rank in range(tp):
            if pp == 1:
                module = _stage_state(model, "", full, rank, tp)
                torch.save(
                    _mp_state(module, tp, client), tmp / f"mp_rank_{rank:02d}_model_states.pt"
                )
                bar.update(1)
                continue
            for index, (stage, prefix) in enumerate(stages):
                state = _stage_state(stage, prefix, full, rank, tp)
                torch.save(state, tmp / f"layer_{index:02d}-model_{rank:02d}-model_states.pt")
                bar.update(1)
            for stage_index in range(pp):
                mp_rank = stage_index * tp + rank
                torch.save(
                    _mp_state(None, tp * pp, client), tmp / f"mp_rank_{mp_rank:02d}_model_states.pt"
                )
        bar.close()
        saved = cfg
        if cfg.parallel.zero_stage == 3:  # the files are the ZeRO-0/1/2 layout
            saved = cfg.model_copy(
                update={"parallel": cfg.parallel.model_copy(update={"zero_stage": 1})}
            )
        (tmp / "config.yaml").write_text(saved.to_yaml())
        if tokenizer is not None:
            shutil.copy2(tokenizer, tmp / "tokenizer.model")
        (tmp / ckpt.COMPLETE).write_text(
            json.dumps({**client, "world_size": tp * pp, WEIGHTS_ONLY: True, **(info or {})})
        )
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    latest = root / ckpt.LATEST
    latest_tmp = root / f".{ckpt.LATEST}.tmp-{os.getpid()}"
    latest_tmp.write_text(tag)
    os.replace(latest_tmp, latest)
    return folder
