"""Reading a checkpoint outside training, at the layout it was saved with.

Three depths: one (stage, TP rank)'s own weights (`rank_weights`, for a reader at the saved
layout); the full weights of the whole model (`read_full_state_dict`, for export and
evaluation at another layout, also of a universal checkpoint); and one pipeline stage's full
weights with their Adam moments (`read_stage`, for writing the universal form).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from megatron_dyt.checkpoint import deepspeed_state as ds
from megatron_dyt.checkpoint.format import (
    UNIVERSAL_FORMAT,
    UNIVERSAL_META,
    UNIVERSAL_VERSION,
    WEIGHTS_ONLY,
    CheckpointError,
    is_universal,
    layer_file,
    load_file,
    model_file,
    optim_file,
    read_complete,
    saved_grouping,
    universal_param_file,
)
from megatron_dyt.config import Config
from megatron_dyt.fileio import read_text
from megatron_dyt.layout import RunLayout
from megatron_dyt.model.groups import group_key, is_trainable
from megatron_dyt.model.sharding import (
    FittedVocab,
    layer_prefix,
    merge_shards,
    stage_layers,
    tp_split,
)


@dataclass
class ParamState:
    """One canonical parameter, full size: fp32 weight, Adam moments (None before step 1)."""

    weight: torch.Tensor
    exp_avg: torch.Tensor | None
    exp_avg_sq: torch.Tensor | None
    step: int
    group: dict[str, float] | None  # None: not trained (no optimizer state)


def _canonical(local: str, cfg: Config) -> str:
    """A name in a DeepSpeed file as its canonical name (a PipelineModule prefixes the layer)."""
    if cfg.parallel.pipeline == 1:
        return local
    index, _, rest = local.partition(".")
    return layer_prefix(int(index), cfg.model.num_layers) + rest


def rank_weights(folder: Path, cfg: Config, stage: int, tp_rank: int) -> dict[str, torch.Tensor]:
    """The model weights one (stage, TP rank) saved, by canonical name, in parameter order:
    that rank's shards as they are (a reader at the saved layout needs nothing else)."""
    if cfg.parallel.pipeline == 1:
        items = ds.module_items(load_file(folder / model_file(tp_rank), mmap=True))
    else:
        items = []
        for index in stage_layers(cfg, stage):
            layer = load_file(folder / layer_file(index, tp_rank), mmap=True)
            items += [(f"{index}.{k}", v) for k, v in layer.items()]
    return {
        _canonical(k, cfg): v
        for k, v in items
        if torch.is_tensor(v) and not k.endswith("_extra_state")
    }


def read_full_state_dict(
    folder: Path, cfg: Config, vocab_rows: int | None = None
) -> dict[str, torch.Tensor]:
    """The full (TP-merged, all stages) model weights of a checkpoint, by canonical name.

    `cfg` is the checkpoint's own config. The embedding and output head come back with
    `vocab_rows` rows (default: `cfg`'s padded vocabulary): the padding depends on the TP size,
    so a model built at another one needs other padding rows (no token maps to them).
    """
    weights = full_weights(folder, cfg, vocab_rows)
    return {name: weights[name] for name in weights}


def full_weights(
    folder: Path, cfg: Config, vocab_rows: int | None = None
) -> Mapping[str, torch.Tensor]:
    """`read_full_state_dict` read lazily: each tensor is merged from its TP shards when asked
    for (`FullWeights`), so exporting or loading a 70B model holds one full tensor at a time."""
    return FittedVocab(FullWeights(folder, cfg), vocab_rows or cfg.padded_vocab_size)


class FullWeights(Mapping[str, torch.Tensor]):
    """A checkpoint's full (TP-merged, all stages) weights by canonical name, read one tensor
    at a time: the per-rank files are memory-mapped and a tensor's TP shards are merged only
    when it is asked for, so a reader holds one full tensor at a time, not the model (starting
    a run from another run's weights: `training/init_from.py`). `cfg` is the checkpoint's own
    config; vocabulary tensors come back with its padding. ZeRO-3 checkpoints (TP=1 only) are
    read whole: DeepSpeed's partitions are flat."""

    def __init__(self, folder: Path, cfg: Config):
        self.folder, self.cfg = folder, cfg
        self._whole: dict[str, torch.Tensor] | None = None
        self._universal = is_universal(folder)
        self._shards: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
        self._stage_of: dict[str, int] = {}
        tp = cfg.parallel.tensor
        if self._universal:
            self._names = dict.fromkeys(read_meta(folder)["params"])
        elif cfg.parallel.zero_stage == 3:
            if tp > 1:
                raise CheckpointError(
                    f"'{folder}': reading ZeRO-3 checkpoints with parallel.tensor={tp} is not"
                    " supported yet (ZeRO-3 with TP=1 is)"
                )
            self._whole = ds.zero3_fp32_weights(folder)
            self._names = dict.fromkeys(self._whole)
        else:
            for stage in range(cfg.parallel.pipeline):
                for name in self._rank(stage, 0):
                    self._stage_of[name] = stage
            self._names = dict.fromkeys(self._stage_of)

    def _rank(self, stage: int, tp_rank: int) -> dict[str, torch.Tensor]:
        key = (stage, tp_rank)
        if key not in self._shards:
            self._shards[key] = rank_weights(self.folder, self.cfg, stage, tp_rank)
        return self._shards[key]

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._names:
            raise KeyError(name)
        if self._whole is not None:
            return self._whole[name]
        if self._universal:
            return torch.load(universal_param_file(self.folder, name), weights_only=True)["weight"]
        stage, split = self._stage_of[name], tp_split(name)
        if split is None:
            return self._rank(stage, 0)[name]
        parts = [self._rank(stage, r)[name] for r in range(self.cfg.parallel.tensor)]
        return merge_shards(parts, split)

    def __contains__(self, name: object) -> bool:
        return name in self._names

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def read_meta(folder: Path) -> dict[str, Any]:
    """`universal.json` of a universal checkpoint: step, data position, every tensor's shape."""
    try:
        meta = json.loads(read_text(folder / UNIVERSAL_META, "checkpoint metadata"))
    except ValueError as exc:
        raise CheckpointError(f"'{folder / UNIVERSAL_META}' is not valid JSON: {exc}") from None
    if meta.get("format") != UNIVERSAL_FORMAT or meta.get("version") != UNIVERSAL_VERSION:
        raise CheckpointError(
            f"'{folder / UNIVERSAL_META}' is not a {UNIVERSAL_FORMAT} checkpoint of version {UNIVERSAL_VERSION}"
        )
    return meta


def read_universal_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The full fp32 weights of a universal checkpoint (evaluation, export)."""
    meta = read_meta(folder)
    return {
        name: torch.load(universal_param_file(folder, name), weights_only=True)["weight"]
        for name in meta["params"]
    }


# ---- weights with optimizer state ----------------------------------------------------------


def _frozen(weights: dict[str, torch.Tensor], cfg: Config) -> dict[str, ParamState]:
    """The parameters the optimizer does not hold (a fixed α): weights only, no step or group."""
    return {
        name: ParamState(w.float(), None, None, step=0, group=None)
        for name, w in weights.items()
        if not is_trainable(name, cfg)
    }


def _weights_only(weights: dict[str, torch.Tensor], cfg: Config) -> dict[str, ParamState]:
    """An imported checkpoint (`convert from-hf`): weights, and the groups they will train in."""
    out = _frozen(weights, cfg)
    for name, w in weights.items():
        if name not in out:
            decay, mult, _ = group_key(name, w.shape, cfg)
            group = {"weight_decay": decay, "lr_mult": mult}
            out[name] = ParamState(w.float(), None, None, step=0, group=group)
    return out


def _torch_optimizer(
    folder: Path, cfg: Config, stage: int, tp_rank: int, weights: dict[str, torch.Tensor]
) -> dict[str, ParamState]:
    """ZeRO-0 fp32: the AdamW state dict in mp_rank_XX, indexed in our param-group order (the
    grouping the checkpoint was saved with)."""
    path = folder / model_file(stage * cfg.parallel.tensor + tp_rank)
    saved = ds.torch_optimizer_state(load_file(path, mmap=True))
    grouping = saved_grouping(folder)
    out = _frozen(weights, cfg)
    trained = {n: w for n, w in weights.items() if n not in out}
    key = {n: group_key(n, w.shape, cfg, grouping) for n, w in trained.items()}
    keys = sorted(set(key.values()))
    names = [[n for n in trained if key[n] == k] for k in keys]
    groups = saved.get("param_groups", [])
    if len(groups) != len(keys):
        raise CheckpointError(
            f"'{path}': the optimizer has {len(groups)} parameter groups, the config's"
            f" weight-decay / DyT lr policy gives {len(keys)}; the checkpoint does not match"
            " its config.yaml"
        )
    for (decay, mult, _), group_names, group in zip(keys, names, groups, strict=True):
        if len(group["params"]) != len(group_names) or (
            group.get("weight_decay"),
            group.get("lr_mult", 1.0),
        ) != (decay, mult):
            raise CheckpointError(
                f"'{path}': optimizer group (weight_decay={group.get('weight_decay')},"
                f" lr_mult={group.get('lr_mult')}, {len(group['params'])} tensors) does not match"
                f" the config's (weight_decay={decay}, lr_mult={mult}, {len(group_names)} tensors)"
            )
        for name, index in zip(group_names, group["params"], strict=True):
            state = saved["state"].get(index, {})
            moments = [state.get(k) for k in ds.MOMENTS]
            for key, m in zip(ds.MOMENTS, moments, strict=True):
                if m is not None and m.shape != weights[name].shape:
                    raise CheckpointError(
                        f"'{path}': {key} of tensor '{name}' has shape {list(m.shape)}, its weight"
                        f" has {list(weights[name].shape)}"
                    )
            out[name] = ParamState(
                weights[name].float(),
                *moments,
                step=int(state["step"]) if "step" in state else 0,
                group={"weight_decay": decay, "lr_mult": mult},
            )
    return out


def _flat_optimizer(
    folder: Path, cfg: Config, layout: RunLayout, stage: int, tp_rank: int, weights: dict
) -> dict[str, ParamState]:
    """ZeRO-1/2 and the bf16 optimizer: flat fp32 partitions, one file per data-parallel rank;
    a tensor's pieces of consecutive ranks concatenate to the tensor."""
    mp = stage * cfg.parallel.tensor + tp_rank
    pieces: dict[str, dict[str, list[torch.Tensor]]] = {}
    steps: dict[str, int] = {}
    groups: dict[str, dict[str, float]] = {}
    for dp in range(layout.data):
        path = folder / optim_file(layout.optimizer, dp, mp)
        count, flat_groups = ds.flat_partition(load_file(path, mmap=True))
        if count != layout.data:
            raise CheckpointError(
                f"'{path}' is one of {count} data-parallel partitions; complete.json says"
                f" the run had DP={layout.data}"
            )
        for group in flat_groups:
            for local, (start, numel) in group.fragments.items():
                name = _canonical(local, cfg)
                parts = pieces.setdefault(name, {"weight": [], **{k: [] for k in ds.MOMENTS}})
                parts["weight"].append(group.flat.narrow(0, start, numel))
                for key in ds.MOMENTS:
                    if key in group.state:
                        parts[key].append(group.state[key].narrow(0, start, numel))
                steps[name] = int(group.state["step"]) if "step" in group.state else 0
                groups[name] = {
                    "weight_decay": group.hyper.get("weight_decay"),
                    "lr_mult": group.hyper.get("lr_mult", 1.0),
                }
    out = _frozen(weights, cfg)
    for name, weight in weights.items():
        if name in out:
            continue
        if name not in pieces:
            raise CheckpointError(
                f"tensor '{name}' has no optimizer state in '{folder}'"
                f" ({optim_file(layout.optimizer, '*', mp)})"
            )
        parts = pieces[name]
        values = {}
        for key, chunks in parts.items():
            if key != "weight" and len(chunks) != len(parts["weight"]):
                values[key] = None  # state not created yet (saved before the first step)
                continue
            flat = torch.cat(chunks)
            if flat.numel() != weight.numel():
                raise CheckpointError(
                    f"tensor '{name}': its {key} in the optimizer partitions of '{folder}' has"
                    f" {flat.numel()} elements, the weight has shape {list(weight.shape)}"
                )
            values[key] = flat.view(weight.shape).clone()
        out[name] = ParamState(
            values["weight"], values["exp_avg"], values["exp_avg_sq"], steps[name], groups[name]
        )
    return out


def read_stage(folder: Path, cfg: Config, layout: RunLayout, stage: int) -> dict[str, ParamState]:
    """Full (TP-merged) tensors and moments of one pipeline stage of a saved checkpoint."""
    if layout.zero_stage == 3:
        raise CheckpointError(
            f"'{folder}' is a ZeRO-3 checkpoint; resharding ZeRO-3 optimizer state is not"
            " supported yet (ZeRO stages 0, 1 and 2 are)"
        )
    if layout.optimizer == "fp16":
        raise CheckpointError(f"'{folder}': resharding fp16 checkpoints is not supported")
    weights_only = bool(read_complete(folder).get(WEIGHTS_ONLY, False))
    shards = []
    for tp_rank in range(layout.tensor):
        weights = rank_weights(folder, cfg, stage, tp_rank)
        if weights_only:
            shards.append(_weights_only(weights, cfg))
        elif layout.optimizer == "torch":
            shards.append(_torch_optimizer(folder, cfg, stage, tp_rank, weights))
        else:
            shards.append(_flat_optimizer(folder, cfg, layout, stage, tp_rank, weights))
    out = {}
    for name, first in shards[0].items():
        split = tp_split(name)
        if split is None or layout.tensor == 1:
            out[name] = first
            continue

        def merged(key: str, name: str = name, split=split):
            parts = [getattr(s[name], key) for s in shards]
            return None if any(p is None for p in parts) else merge_shards(parts, split)

        out[name] = ParamState(
            merged("weight"), merged("exp_avg"), merged("exp_avg_sq"), first.step, first.group
        )
    return out
