"""AdamW parameter groups: the weight-decay policy and the DyT-scalar learning-rate multiplier."""

from __future__ import annotations

import torch
from torch import nn

from megatron_dyt.config import Config
from megatron_dyt.model import canonical_parameters
from megatron_dyt.model.groups import group_key


def param_groups(model: nn.Module, cfg: Config) -> list[dict]:
    """Groups keyed by (weight decay, lr multiplier) (`model/groups.py`); `lr_mult` scales the
    scheduled lr."""
    t = cfg.train
    groups: dict[tuple[float, float], list[torch.nn.Parameter]] = {}
    names: dict[tuple[float, float], list[str]] = {}
    for name, param in canonical_parameters(model):
        if not param.requires_grad:
            continue
        decay, mult = group_key(name, param.dim(), cfg)
        groups.setdefault((decay, mult), []).append(param)
        names.setdefault((decay, mult), []).append(name)
    return [
        {
            "params": params,
            "weight_decay": decay,
            "lr": t.lr * mult,
            "lr_mult": mult,
            "names": names[(decay, mult)],
        }
        for (decay, mult), params in sorted(groups.items())
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
    )
