"""Everything that touches DeepSpeed's internals, for DeepSpeed 0.19 (the version pinned).

Resharding reads and writes optimizer state that DeepSpeed keeps in private structures: the flat
fp32 partitions of ZeRO-1/2 and of the bf16 optimizer, the per-parameter fragment maps, the
engine's step counters. Upgrading DeepSpeed means reading this file and its tests
(`tests/test_reshard.py`), nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

MOMENTS = ("exp_avg", "exp_avg_sq")


# ---- files -------------------------------------------------------------------------------------


def module_items(state: dict[str, Any]) -> list[tuple[str, Any]]:
    """The (name, tensor) pairs of the module in an `mp_rank_*_model_states.pt`, buffers left out."""
    module, buffers = state.get("module") or {}, set(state.get("buffer_names") or [])
    return [(k, v) for k, v in module.items() if k not in buffers]


def torch_optimizer_state(state: dict[str, Any]) -> dict[str, Any]:
    """The plain AdamW state dict an `mp_rank_*` file holds at ZeRO-0 fp32."""
    return state.get("optimizer") or {"state": {}, "param_groups": []}


def module_only_state(module: dict[str, Any] | None, mp_world: int, client: dict) -> dict:
    """An `mp_rank_*` file DeepSpeed's module-only load accepts (no optimizer state)."""
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


@dataclass
class FlatGroup:
    """One parameter group of one data-parallel rank's flat fp32 partition."""

    flat: torch.Tensor  # this rank's piece of the group's fp32 master weights
    fragments: dict[str, tuple[int, int]]  # file-local tensor name → (start, numel) in `flat`
    state: dict[str, Any]  # Adam state of the partition (exp_avg, exp_avg_sq, step)
    hyper: dict[str, Any]  # the group's hyper-parameters (weight_decay, lr_mult, ...)


def flat_partition(saved: dict[str, Any]) -> tuple[int, list[FlatGroup]]:
    """(number of data-parallel partitions, groups) of a loaded `*_optim_states.pt` file.

    The pieces of consecutive data-parallel ranks follow each other, so concatenating a tensor's
    pieces in rank order gives the tensor (the same for the moments, laid out like the partition).
    """
    osd = saved["optimizer_state_dict"]
    counts = osd.get("partition_count")
    count = max(counts) if isinstance(counts, list) else counts
    base = osd["base_optimizer_state"]
    groups = []
    for g, (flat, mapping) in enumerate(
        zip(osd["single_partition_of_fp32_groups"], osd["param_slice_mappings"], strict=True)
    ):
        fragments = {name: (frag.start, frag.numel) for name, frag in mapping.items()}
        groups.append(FlatGroup(flat, fragments, base["state"].get(g, {}), base["param_groups"][g]))
    return count, groups


def zero3_fp32_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The full fp32 weights of a ZeRO-3 checkpoint (DeepSpeed's own `zero_to_fp32`)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return dict(get_fp32_state_dict_from_zero_checkpoint(str(folder.parent), tag=folder.name))


# ---- a live engine -----------------------------------------------------------------------------


def engine_kind(engine) -> str | None:
    """'flat' (ZeRO-1/2 or the bf16 optimizer), 'torch' (ZeRO-0 fp32) or None (not supported)."""
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


def load_torch(optimizer, params: list[torch.nn.Parameter], values: dict, step: int) -> None:
    """ZeRO-0 fp32: the model parameters are the master weights; AdamW state keyed by them.

    `values[id(param)]` holds this rank's `weight`, `exp_avg`, `exp_avg_sq` (moments may be None).
    """
    for param in params:
        entry = values[id(param)]
        param.data.copy_(entry["weight"].to(param.dtype))
        if entry["exp_avg"] is not None and step > 0:
            optimizer.state[param] = _adam_state(
                step, entry["exp_avg"].clone(), entry["exp_avg_sq"].clone()
            )
        else:
            optimizer.state.pop(param, None)


def load_flat(optimizer, values: dict, step: int) -> None:
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
        moments = {k: torch.zeros_like(hp) for k in MOMENTS}
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
            for key in MOMENTS:
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


def set_position(engine, step: int, samples: int, schedule_epoch: int) -> None:
    """The engine's step and sample counters, and its LambdaLR schedule at `schedule_epoch`
    (the same lr as an unresharded resume)."""
    engine.global_steps = step
    engine.global_samples = samples
    sched = engine.lr_scheduler
    if sched is None:
        return
    sched.last_epoch = schedule_epoch
    sched._step_count = schedule_epoch + 1
    lrs = [
        base * fn(schedule_epoch) for base, fn in zip(sched.base_lrs, sched.lr_lambdas, strict=True)
    ]
    for group, lr in zip(sched.optimizer.param_groups, lrs, strict=True):
        group["lr"] = lr
    sched._last_lr = lrs
