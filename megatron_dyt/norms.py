"""The norm factory: every normalization site of the model is built by `build_norm`.

Kinds: RMSNorm, LayerNorm, DyT (`γ·f(α·x)+β`, f = tanh or an ablation) and Derf
(`γ·erf(α·x+s)+β`). Initial values live in `reset_parameters`, so a model materialised from
the meta device or partitioned by ZeRO-3 starts from the same α₀, γ and β as an eager one.
Scalars have shape (1,), not (): DeepSpeed cannot broadcast 0-dim tensors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megatron_dyt.config import NormConfig, NormSite


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """fp32 math for half-precision activations; float64 stays float64 (gradcheck)."""
    return torch.promote_types(x.dtype, torch.float32)


SQUASH = {
    "tanh": torch.tanh,
    "hardtanh": F.hardtanh,
    "sigmoid": torch.sigmoid,
    "identity": lambda x: x,
}


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(hidden_size))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Statistics in fp32 whatever the activation dtype, as LLaMA does.
        ct = _compute_dtype(x)
        xf = x.to(ct)
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.to(ct)).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class LayerNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(hidden_size))
        self.bias = nn.Parameter(torch.empty(hidden_size))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)
        nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ct = _compute_dtype(x)
        y = F.layer_norm(x.to(ct), x.shape[-1:], self.weight.to(ct), self.bias.to(ct), self.eps)
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class DyT(nn.Module):
    """Dynamic Tanh: an element-wise stand-in for a norm, `γ·f(α·x)+β` with one scalar α."""

    def __init__(
        self,
        hidden_size: int,
        alpha0: float,
        *,
        beta: bool = True,
        learnable_alpha: bool = True,
        squash: str = "tanh",
    ):
        super().__init__()
        self.alpha0 = alpha0
        self.squash = squash
        self._f = SQUASH[squash]
        self.alpha = nn.Parameter(torch.empty(1), requires_grad=learnable_alpha)
        self.weight = nn.Parameter(torch.empty(hidden_size))
        self.bias = nn.Parameter(torch.empty(hidden_size)) if beta else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.alpha.fill_(self.alpha0)
        nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ct = _compute_dtype(x)
        y = self._f(self.alpha.to(ct) * x.to(ct)) * self.weight.to(ct)
        if self.bias is not None:
            y = y + self.bias.to(ct)
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return (
            f"{self.weight.shape[0]}, alpha0={self.alpha0}, squash={self.squash},"
            f" beta={self.bias is not None}, learnable_alpha={self.alpha.requires_grad}"
        )


class Derf(nn.Module):
    """Dynamic erf (Stronger Normalization-Free Transformers): `γ·erf(α·x+s)+β`."""

    def __init__(
        self,
        hidden_size: int,
        alpha0: float,
        *,
        shift0: float = 0.0,
        beta: bool = True,
        learnable_alpha: bool = True,
    ):
        super().__init__()
        self.alpha0 = alpha0
        self.shift0 = shift0
        self.alpha = nn.Parameter(torch.empty(1), requires_grad=learnable_alpha)
        self.shift = nn.Parameter(torch.empty(1))
        self.weight = nn.Parameter(torch.empty(hidden_size))
        self.bias = nn.Parameter(torch.empty(hidden_size)) if beta else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.alpha.fill_(self.alpha0)
            self.shift.fill_(self.shift0)
        nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ct = _compute_dtype(x)
        y = torch.erf(self.alpha.to(ct) * x.to(ct) + self.shift.to(ct)) * self.weight.to(ct)
        if self.bias is not None:
            y = y + self.bias.to(ct)
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return (
            f"{self.weight.shape[0]}, alpha0={self.alpha0}, shift0={self.shift0},"
            f" beta={self.bias is not None}, learnable_alpha={self.alpha.requires_grad}"
        )


def build_norm(site: NormSite, hidden_size: int, cfg: NormConfig) -> nn.Module:
    """The norm in front of attention (`attention`), the FFN (`mlp`) or the output head (`final`)."""
    if site not in ("attention", "mlp", "final"):
        raise ValueError(f"unknown norm site {site!r}; allowed: attention, mlp, final")
    if cfg.kind == "rmsnorm":
        return RMSNorm(hidden_size, cfg.eps)
    if cfg.kind == "layernorm":
        return LayerNorm(hidden_size, cfg.eps)
    if cfg.kind == "dyt":
        return DyT(
            hidden_size,
            cfg.alpha(site),
            beta=cfg.beta,
            learnable_alpha=cfg.learnable_alpha,
            squash=cfg.squash,
        )
    if cfg.kind == "derf":
        return Derf(
            hidden_size,
            cfg.alpha(site),
            shift0=cfg.derf_shift,
            beta=cfg.beta,
            learnable_alpha=cfg.learnable_alpha,
        )
    raise ValueError(f"unknown norm kind {cfg.kind!r}; allowed: rmsnorm, layernorm, dyt, derf")


def describe_norm(site: NormSite, cfg: NormConfig) -> str:
    """One line for `info`: the norm at a site with its α₀."""
    if cfg.kind in ("rmsnorm", "layernorm"):
        return f"{cfg.kind}(eps={cfg.eps:g})"
    beta = "+β" if cfg.beta else ""
    if cfg.kind == "dyt":
        return f"dyt γ·{cfg.squash}(α·x){beta}, α₀={cfg.alpha(site):g}"
    return f"derf γ·erf(α·x+s){beta}, α₀={cfg.alpha(site):g}, s₀={cfg.derf_shift:g}"
