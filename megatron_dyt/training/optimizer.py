"""AdamW parameter groups: the weight-decay policy and the DyT-scalar learning-rate multiplier."""

from __future__ import annotations

import torch
from torch import nn

from megatron_dyt.config import Config
from megatron_dyt.model import canonical_parameters
from megatron_dyt.model.groups import group_key, shape_of


def param_groups(model: nn.Module, cfg: Config) -> list[dict]:
    """Groups keyed by (weight decay, lr multiplier, apart) (`model/groups.py`); `lr_mult`
    scales the scheduled lr."""
    t = cfg.train
    groups: dict[tuple[float, float, bool], list[torch.nn.Parameter]] = {}
    names: dict[tuple[float, float, bool], list[str]] = {}
    for name, param in canonical_parameters(model):
        if not param.requires_grad:
            continue
        key = group_key(name, shape_of(param), cfg)
        groups.setdefault(key, []).append(param)
        names.setdefault(key, []).append(name)
    return [
        {
            "params": params,
            "weight_decay": decay,
            "lr": t.lr * mult,
            "lr_mult": mult,
            "names": names[(decay, mult, apart)],
        }
        for (decay, mult, apart), params in sorted(groups.items())
    ]


def build_optimizer(model: nn.Module, cfg: Config) -> torch.optim.Optimizer:
    t = cfg.train
    groups = param_groups(model, cfg)
    for g in groups:
        g.pop("names")
    return torch.optim.AdamW(
        groups,
        lr=t.lr,
        betas=(t.adam_beta1, t.adam_beta2),
        eps=t.adam_eps,
        weight_decay=t.weight_decay,
        # one multi-tensor kernel per step (on CUDA and on CPU), not a loop of foreach ops
        fused=True,
    )
