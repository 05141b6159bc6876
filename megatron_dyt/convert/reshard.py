"""Resharding: resume a checkpoint saved at one TP/PP/DP/ZeRO layout at another one.

A saved checkpoint is read at its own layout (TP shards merged, pipeline stages joined, ZeRO
partitions concatenated) into a layout-free "universal" form: per canonical parameter its full
fp32 weight and Adam moments, plus the optimizer step, the lr-schedule position and the data
position in global samples. Any layout loads that form: each rank takes the tensors of its
pipeline stage, cuts its tensor-parallel slice, and writes weights and moments into the freshly
built DeepSpeed engine (the torch AdamW itself at ZeRO-0 fp32, the flat fp32 partitions of the
ZeRO-1/2 and bf16 optimizers), so Adam goes on exactly where it stopped.

`megatron-dyt convert reshard` writes the universal form as a new run folder; `megatron-dyt train
… resume.reshard=true` converts a checkpoint of another layout while resuming (rank 0 writes the
universal form inside the checkpoint folder, then every rank loads its part of it).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from megatron_dyt.arguments import positive_int
from megatron_dyt.config import Config, config_from_dict
from megatron_dyt.convert.mapping import fit_rows
from megatron_dyt.training.checkpoint import (
    COMPLETE,
    LATEST,
    CheckpointError,
    _layer_prefix,
    atomic_write,
    read_config,
    resolve,
    tag_for,
)

FORMAT = "megatron-dyt-universal"
VERSION = 1
META = "universal.json"
PARAMS = "params"
CACHE = "universal"  # a step folder's own universal form, written by `resume.reshard=true`
_VOCAB_TENSORS = ("embedding.word.weight", "output.head.weight")
_MOMENTS = ("exp_avg", "exp_avg_sq")


# ---- layouts -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """Where a run's weights and optimizer state live: the parallel sizes and the optimizer kind.

    `optimizer` names the files the state is in: 'torch' (ZeRO-0 fp32: the AdamW state dict in
    mp_rank_XX files), 'bf16' (ZeRO-0 bf16: DeepSpeed's bf16 optimizer, partitioned over DP) or
    'zero' (ZeRO-1/2/3 partitions).
    """

    tensor: int
    pipeline: int
    data: int
    zero_stage: int
    optimizer: str

    def describe(self) -> str:
        extra = " (bf16 optimizer)" if self.optimizer == "bf16" else ""
        return f"TP={self.tensor}/PP={self.pipeline}/DP={self.data}, ZeRO-{self.zero_stage}{extra}"

    def loads_natively(self, saved: Layout) -> bool:
        """Whether DeepSpeed can load a checkpoint of layout `saved` into this one as it is."""
        same = (self.tensor, self.pipeline, self.zero_stage, self.optimizer) == (
            saved.tensor,
            saved.pipeline,
            saved.zero_stage,
            saved.optimizer,
        )
        # Only the plain torch optimizer state is not partitioned over data-parallel ranks.
        return same and (self.optimizer == "torch" or self.data == saved.data)


def run_layout(cfg: Config, world_size: int) -> Layout:
    """The layout a run of `cfg` on `world_size` processes has."""
    from megatron_dyt.training.engine import precision

    p = cfg.parallel
    dtype = precision(cfg)
    if p.zero_stage:
        kind = "zero"
    elif dtype == torch.float32:
        kind = "torch"
    elif dtype == torch.bfloat16:
        kind = "bf16"
    else:
        kind = "fp16"
    return Layout(p.tensor, p.pipeline, world_size // (p.tensor * p.pipeline), p.zero_stage, kind)


def saved_layout(folder: Path, cfg: Config | None = None) -> Layout:
    """The layout checkpoint `folder` was written at (from complete.json, else its files)."""
    done = _complete(folder)
    if isinstance(done.get("layout"), dict):
        return Layout(**done["layout"])
    cfg = cfg or read_config(folder)
    p = cfg.parallel
    world = int(done.get("world_size", p.tensor * p.pipeline))
    if any(folder.glob("bf16_zero_pp_rank_*_optim_states.pt")):
        kind = "bf16"
    elif any(folder.glob("zero_pp_rank_*_optim_states.pt")) or p.zero_stage:
        kind = "zero"
    else:
        kind = "torch"
    return Layout(p.tensor, p.pipeline, world // (p.tensor * p.pipeline), p.zero_stage, kind)


def _complete(folder: Path) -> dict[str, Any]:
    path = folder / COMPLETE
    if not path.is_file():
        raise CheckpointError(
            f"checkpoint '{folder}' is incomplete (no {COMPLETE}): it was interrupted while being"
            " written; use an earlier one"
        )
    return json.loads(path.read_text())


def is_universal(folder: Path) -> bool:
    """A layout-free checkpoint (written by `convert reshard`), loadable at any layout."""
    return (folder / META).is_file()


# ---- reading a checkpoint at its own layout ------------------------------------------------------


@dataclass
class ParamState:
    """One canonical parameter, full size: fp32 weight, Adam moments (None before step 1)."""

    weight: torch.Tensor
    exp_avg: torch.Tensor | None
    exp_avg_sq: torch.Tensor | None
    step: int
    group: dict[str, float] | None  # None: not trained (no optimizer state)


def _load(path: Path) -> Any:
    if not path.is_file():
        raise CheckpointError(f"checkpoint file '{path}' is missing")
    try:
        return torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as exc:
        raise CheckpointError(f"cannot read checkpoint file '{path}': {exc}") from exc


def _stage_layers(cfg: Config, stage: int) -> list[int]:
    """Pipeline layer indices (0 embedding, 1..L blocks, L+1 output) of `stage`."""
    layers, pp = cfg.model.num_layers, cfg.parallel.pipeline
    per = layers // pp
    out = list(range(1 + stage * per, 1 + (stage + 1) * per))
    if stage == 0:
        out = [0, *out]
    if stage == pp - 1:
        out.append(layers + 1)
    return out


def _canonical(local: str, cfg: Config) -> str:
    """A name in a DeepSpeed file as its canonical name (PipelineModule prefixes the layer index)."""
    if cfg.parallel.pipeline == 1:
        return local
    index, _, rest = local.partition(".")
    return _layer_prefix(int(index), cfg.model.num_layers) + rest


def rank_weights(folder: Path, cfg: Config, stage: int, tp_rank: int) -> dict[str, torch.Tensor]:
    """The model weights one (stage, TP rank) saved, by canonical name, in parameter order:
    that rank's shards as they are (a reader at the saved layout needs nothing else)."""
    mp = stage * cfg.parallel.tensor + tp_rank
    if cfg.parallel.pipeline == 1:
        state = _load(folder / f"mp_rank_{mp:02d}_model_states.pt")
        module, buffers = state.get("module") or {}, set(state.get("buffer_names") or [])
        items = [(k, v) for k, v in module.items() if k not in buffers]
    else:
        items = []
        for index in _stage_layers(cfg, stage):
            layer = _load(folder / f"layer_{index:02d}-model_{tp_rank:02d}-model_states.pt")
            items += [(f"{index}.{k}", v) for k, v in layer.items()]
    return {
        _canonical(k, cfg): v
        for k, v in items
        if torch.is_tensor(v) and not k.endswith("_extra_state")
    }


def _torch_optimizer(
    folder: Path, cfg: Config, stage: int, tp_rank: int, weights: dict[str, torch.Tensor]
) -> dict[str, ParamState]:
    """ZeRO-0 fp32: the AdamW state dict in mp_rank_XX, indexed in our param-group order."""
    from megatron_dyt.training.optimizer import group_key

    mp = stage * cfg.parallel.tensor + tp_rank
    path = folder / f"mp_rank_{mp:02d}_model_states.pt"
    saved = _load(path).get("optimizer") or {"state": {}, "param_groups": []}
    out = _frozen(weights, cfg)
    trained = {n: w for n, w in weights.items() if n not in out}
    keys = sorted({group_key(n, w.dim(), cfg) for n, w in trained.items()})
    names = [[n for n, w in trained.items() if group_key(n, w.dim(), cfg) == k] for k in keys]
    groups = saved.get("param_groups", [])
    if len(groups) != len(keys):
        raise CheckpointError(
            f"'{path}': the optimizer has {len(groups)} parameter groups, the config's"
            f" weight-decay / DyT lr policy gives {len(keys)}; the checkpoint does not match"
            " its config.yaml"
        )
    for (decay, mult), group_names, group in zip(keys, names, groups, strict=True):
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
            moments = [state.get(k) for k in _MOMENTS]
            for key, m in zip(_MOMENTS, moments, strict=True):
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


def _frozen(weights: dict[str, torch.Tensor], cfg: Config) -> dict[str, ParamState]:
    """The parameters the optimizer does not hold (a fixed α): weights only, no step or group."""
    from megatron_dyt.training.optimizer import is_trainable

    return {
        name: ParamState(w.float(), None, None, step=0, group=None)
        for name, w in weights.items()
        if not is_trainable(name, cfg)
    }


def _weights_only(weights: dict[str, torch.Tensor], cfg: Config) -> dict[str, ParamState]:
    """An imported checkpoint (`convert from-hf`): weights, and the groups they will train in."""
    from megatron_dyt.training.optimizer import group_key

    out = _frozen(weights, cfg)
    for name, w in weights.items():
        if name not in out:
            decay, mult = group_key(name, w.dim(), cfg)
            group = {"weight_decay": decay, "lr_mult": mult}
            out[name] = ParamState(w.float(), None, None, step=0, group=group)
    return out


def _flat_optimizer(
    folder: Path, cfg: Config, layout: Layout, stage: int, tp_rank: int, weights: dict
) -> dict[str, ParamState]:
    """ZeRO-1/2 and the bf16 optimizer: flat fp32 partitions, one file per data-parallel rank.

    `param_slice_mappings` says where each tensor's piece lies in a rank's partition; the pieces
    of consecutive ranks follow each other, so concatenating them in rank order gives the tensor
    (the same for the Adam moments, which are laid out like the partition).
    """
    mp = stage * cfg.parallel.tensor + tp_rank
    prefix = "bf16_zero_pp_rank" if layout.optimizer == "bf16" else "zero_pp_rank"
    pieces: dict[str, dict[str, list[torch.Tensor]]] = {}
    steps: dict[str, int] = {}
    groups: dict[str, dict[str, float]] = {}
    for dp in range(layout.data):
        path = folder / f"{prefix}_{dp}_mp_rank_{mp:02d}_optim_states.pt"
        osd = _load(path)["optimizer_state_dict"]
        counts = osd.get("partition_count")
        count = max(counts) if isinstance(counts, list) else counts
        if count != layout.data:
            raise CheckpointError(
                f"'{path}' is one of {count} data-parallel partitions; complete.json says"
                f" the run had DP={layout.data}"
            )
        base = osd["base_optimizer_state"]
        for g, (flat, mapping) in enumerate(
            zip(osd["single_partition_of_fp32_groups"], osd["param_slice_mappings"], strict=True)
        ):
            state = base["state"].get(g, {})
            for local, frag in mapping.items():
                name = _canonical(local, cfg)
                parts = pieces.setdefault(name, {"weight": [], **{k: [] for k in _MOMENTS}})
                parts["weight"].append(flat.narrow(0, frag.start, frag.numel))
                for key in _MOMENTS:
                    if key in state:
                        parts[key].append(state[key].narrow(0, frag.start, frag.numel))
                steps[name] = int(state["step"]) if "step" in state else 0
                group = base["param_groups"][g]
                groups[name] = {
                    "weight_decay": group.get("weight_decay"),
                    "lr_mult": group.get("lr_mult", 1.0),
                }
    out = _frozen(weights, cfg)
    for name, weight in weights.items():
        if name in out:
            continue
        if name not in pieces:
            raise CheckpointError(
                f"tensor '{name}' has no optimizer state in '{folder}' ({prefix}_*_mp_rank_{mp:02d})"
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


def read_stage(folder: Path, cfg: Config, layout: Layout, stage: int) -> dict[str, ParamState]:
    """Full (TP-merged) tensors and moments of one pipeline stage of a saved checkpoint."""
    from megatron_dyt.model.init import tp_partition
    from megatron_dyt.parallel import merge_shards

    if layout.zero_stage == 3:
        raise CheckpointError(
            f"'{folder}' is a ZeRO-3 checkpoint; resharding ZeRO-3 optimizer state is not"
            " supported yet (ZeRO stages 0, 1 and 2 are)"
        )
    if layout.optimizer == "fp16":
        raise CheckpointError(f"'{folder}': resharding fp16 checkpoints is not supported")
    weights_only = bool(_complete(folder).get("weights_only", False))
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
        split = tp_partition(name)
        if split is None or layout.tensor == 1:
            out[name] = first
            continue

        def merged(key: str, name: str = name, split: tuple[int, int] = split):
            parts = [getattr(s[name], key) for s in shards]
            return None if any(p is None for p in parts) else merge_shards(parts, *split)

        out[name] = ParamState(
            merged("weight"), merged("exp_avg"), merged("exp_avg_sq"), first.step, first.group
        )
    return out


# ---- the universal form --------------------------------------------------------------------------


def _param_file(folder: Path, name: str) -> Path:
    return folder / PARAMS / f"{name}.pt"


def _check_shape(name: str, shape: list[int], expected: list[int], vocab: int, where: str) -> None:
    """A saved full shape against the one the model expects; vocab padding may differ."""
    if shape == expected:
        return
    if (
        name in _VOCAB_TENSORS
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

    from megatron_dyt.training.engine import batch_layout

    folder, out = Path(folder), Path(out)
    cfg = read_config(folder)
    done = _complete(folder)
    layout = saved_layout(folder, cfg)
    vocab = vocab_size or cfg.model.vocab_size
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / PARAMS).mkdir(parents=True)
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
                for key in _MOMENTS:
                    value = getattr(st, key)
                    record[key] = None if value is None else value.float()
                torch.save(record, _param_file(tmp, name))
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
            "format": FORMAT,
            "version": VERSION,
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
        atomic_write(tmp / META, json.dumps(meta, indent=1) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        bar.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return meta


def read_meta(folder: Path) -> dict[str, Any]:
    meta = json.loads((folder / META).read_text())
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise CheckpointError(
            f"'{folder / META}' is not a {FORMAT} checkpoint of version {VERSION}"
        )
    return meta


def read_universal_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The full fp32 weights of a universal checkpoint (evaluation, export)."""
    meta = read_meta(folder)
    return {
        name: torch.load(_param_file(folder, name), weights_only=True)["weight"]
        for name in meta["params"]
    }


def universal_of(folder: Path, progress: bool = True) -> Path:
    """The universal form of checkpoint `folder`, written next to its files on first use.

    Collective: rank 0 converts (every rank gets its error, if any), the others wait for it.
    """
    import torch.distributed as dist

    if is_universal(folder):
        return folder
    out = folder / CACHE
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


def fit_vocab_rows(full: dict[str, Any], rows: int) -> dict[str, Any]:
    """`full` with its vocabulary-sized tensors cut or zero-padded to `rows` rows."""
    return {k: fit_rows(v, rows) if k in _VOCAB_TENSORS else v for k, v in full.items()}


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

    from megatron_dyt.model.init import canonical_parameters, full_shape
    from megatron_dyt.parallel import is_sharded, split_shard, tp_rank, tp_size

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
                name, saved[name]["shape"], full_shape(param, size), cfg.model.vocab_size, where
            )
        except CheckpointError as exc:
            problems.append(str(exc))
    names: list[list[str] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(names, [n for n, _ in local])
    used = {n for ns in names if ns for n in ns}
    extra = sorted(set(saved) - used)
    if extra:
        problems.append(f"tensor '{extra[0]}' of checkpoint {where} is not in the model")
    kind = _engine_kind(engine)
    if kind is None:
        problems.append(
            f"cannot load {where} into a {type(engine.optimizer).__name__}: resharded resume"
            " supports ZeRO stages 0-2 (fp32 or bf16)"
        )
    _collective_check(problems)

    values: dict[int, dict[str, Any]] = {}
    bar = tqdm(local, desc="load", unit="tensor", disable=not progress, dynamic_ncols=True)
    for name, param in bar:
        record = torch.load(_param_file(folder, name), weights_only=True, mmap=True)
        rows = full_shape(param, size)[0]
        entry = {}
        for key in ("weight", *_MOMENTS):
            value = record[key]
            if value is not None:
                if name in _VOCAB_TENSORS:
                    value = fit_rows(value, rows)
                if is_sharded(param):
                    value = split_shard(
                        value, param.partition_dim, param.partition_stride, rank, size
                    )
                value = value.to(torch.float32).contiguous()
            entry[key] = value
        values[id(param)] = entry
    step = int(meta["optimizer_step"])
    with torch.no_grad():
        if kind == "torch":
            _load_torch(engine.optimizer, local, values, step)
        else:
            _load_flat(engine.optimizer, values, step)
        for _, param in local:  # not in the optimizer's partitions: set directly
            if not param.requires_grad:
                param.data.copy_(values[id(param)]["weight"].to(param.dtype))
    _set_schedule(engine, int(meta["lr_scheduler_last_epoch"]))
    engine.global_steps = int(meta["step"])
    engine.global_samples = int(meta["consumed_samples"])
    return _client_state(meta, global_batch, folder)


def _engine_kind(engine) -> str | None:
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    opt = engine.optimizer
    if isinstance(opt, (DeepSpeedZeroOptimizer, BF16_Optimizer)):
        return "flat"
    if isinstance(opt, torch.optim.Optimizer) and type(opt).__module__.startswith("torch."):
        return "torch"
    return None


def _adam_state(step: int, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor) -> dict[str, Any]:
    return {"step": torch.tensor(float(step)), "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}


def _load_torch(optimizer, local: list, values: dict, step: int) -> None:
    """ZeRO-0 fp32: the model parameters are the master weights; AdamW state keyed by them."""
    for _, param in local:
        entry = values[id(param)]
        param.data.copy_(entry["weight"].to(param.dtype))
        if entry["exp_avg"] is not None and step > 0:
            optimizer.state[param] = _adam_state(
                step, entry["exp_avg"].clone(), entry["exp_avg_sq"].clone()
            )
        else:
            optimizer.state.pop(param, None)


def _load_flat(optimizer, values: dict, step: int) -> None:
    """ZeRO-1/2 and bf16: fill this rank's flat fp32 partition and its moments, then the model.

    Each model parameter's `_hp_mapping` says which piece of it this rank's partition holds;
    `update_lp_params` copies the partitions back into the (all-gathered) model weights.
    """
    lp_groups = getattr(optimizer, "bit16_groups", None) or optimizer.bf16_groups
    hp_groups = (
        getattr(optimizer, "single_partition_of_fp32_groups", None)
        or optimizer.fp32_groups_flat_partition
    )
    base = optimizer.optimizer
    for lps, hp in zip(lp_groups, hp_groups, strict=True):
        moments = {k: torch.zeros_like(hp) for k in _MOMENTS}
        have_moments = step > 0
        for lp in lps:
            mapping = getattr(lp, "_hp_mapping", None)
            if mapping is None:
                continue
            entry = values[id(lp)]
            lo, hi = mapping.lp_fragment_address, mapping.hp_fragment_address
            hp.data.narrow(0, hi.start, hi.numel).copy_(
                entry["weight"].flatten().narrow(0, lo.start, lo.numel)
            )
            for key in _MOMENTS:
                if entry[key] is None:
                    have_moments = False
                    continue
                moments[key].narrow(0, hi.start, hi.numel).copy_(
                    entry[key].flatten().narrow(0, lo.start, lo.numel)
                )
        if have_moments:
            base.state[hp] = _adam_state(step, moments["exp_avg"], moments["exp_avg_sq"])
        else:
            base.state.pop(hp, None)
    optimizer._hp_optimizer_states_linked = False  # re-link the fragments to the new state
    optimizer.update_lp_params()


def _set_schedule(engine, last_epoch: int) -> None:
    """Put the LambdaLR schedule at the saved step (the same lr as an unresharded resume)."""
    sched = engine.lr_scheduler
    if sched is None:
        return
    sched.last_epoch = last_epoch
    sched._step_count = last_epoch + 1
    lrs = [base * fn(last_epoch) for base, fn in zip(sched.base_lrs, sched.lr_lambdas, strict=True)]
    for group, lr in zip(sched.optimizer.param_groups, lrs, strict=True):
        group["lr"] = lr
    sched._last_lr = lrs


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


# ---- `megatron-dyt convert reshard` --------------------------------------------------------------


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
        raise ValueError(f"output '{out}' exists and is not an empty folder; give a new folder")
    expected = {n: list(p.shape) for n, p in canonical_parameters(build_meta_model(target))}
    done = _complete(folder)
    tag = tag_for(int(done["step"]))
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        step_dir = tmp / "checkpoints" / tag
        step_dir.parent.mkdir(parents=True)
        meta = convert_to_universal(
            folder, step_dir, expected=expected, vocab_size=cfg.model.vocab_size, progress=progress
        )
        (tmp / "config.yaml").write_text(target.to_yaml())
        (step_dir / "config.yaml").write_text(target.to_yaml())
        if (folder / "tokenizer.model").is_file():
            shutil.copy2(folder / "tokenizer.model", step_dir / "tokenizer.model")
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
