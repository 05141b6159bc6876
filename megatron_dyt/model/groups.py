"""Which AdamW group a parameter trains in, by canonical name: the weight-decay policy and the
DyT-scalar learning-rate multiplier.

The optimizer builds its groups from this, and the checkpoint readers use it to find a tensor's
place in a saved optimizer's groups without building a model.
"""

from __future__ import annotations

from megatron_dyt.config import Config


def is_dyt_scalar(name: str) -> bool:
    """DyT/Derf α and s, and the embedding scale: the scalars the paper adds."""
    return name.endswith((".alpha", ".shift")) or name == "embedding.scale"


def is_trainable(name: str, cfg: Config) -> bool:
    """Whether the optimizer holds this parameter: with `learnable_alpha: false` the DyT/Derf α
    stay at α₀ and have no optimizer state."""
    return cfg.model.norm.learnable_alpha or not name.endswith(".alpha")


def group_key(name: str, ndim: int, cfg: Config) -> tuple[float, float]:
    """(weight decay, lr multiplier) of a parameter: which AdamW group it belongs to.

    `all` decays every parameter, α, γ, β and the embedding scale included (the paper);
    `matrices` decays only 2-D weights (Megatron's habit).
    """
    t = cfg.train
    decay = t.weight_decay if (t.weight_decay_policy == "all" or ndim >= 2) else 0.0
    mult = t.dyt_lr_multiplier if is_dyt_scalar(name) else 1.0
    return decay, mult
