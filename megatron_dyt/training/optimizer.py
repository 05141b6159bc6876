"""AdamW parameter groups: the weight-decay policy and the DyT-scalar learning-rate multiplier."""

from __future__ import annotations

import torch
from torch import nn

from megatron_dyt.config import Config
from megatron_dyt.model import canonical_parameters


def is_dyt_scalar(name: str) -> bool:
    """DyT/Derf α and s, and the embedding scale: the scalars the paper adds."""
    return name.endswith((".alpha", ".shift")) or name == "embedding.scale"


def is_trainable(name: str, cfg: Config) -> bool:
    """Whether the optimizer holds this parameter: with `learnable_alpha: false` the DyT/Derf α
    stay at α₀ and have no optimizer state (resharding needs to know without a model)."""
    return cfg.model.norm.learnable_alpha or not name.endswith(".alpha")


def group_key(name: str, ndim: int, cfg: Config) -> tuple[float, float]:
    """(weight decay, lr multiplier) of a parameter: which AdamW group it belongs to.

    Resharding uses it too, to find a parameter's place in a saved optimizer's groups.
    """
    t = cfg.train
    decay = t.weight_decay if (t.weight_decay_policy == "all" or ndim >= 2) else 0.0
    mult = t.dyt_lr_multiplier if is_dyt_scalar(name) else 1.0
    return decay, mult


def param_groups(model: nn.Module, cfg: Config) -> list[dict]:
    """Groups keyed by (weight decay, lr multiplier); `lr_mult` scales the scheduled lr.

    `all` decays every parameter, α, γ, β and the embedding scale included (the paper);
    `matrices` decays only 2-D weights (Megatron's habit).
    """
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
