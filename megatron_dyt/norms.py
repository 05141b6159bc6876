"""The norm factory: every normalization site of the model is built by `build_norm`.

Kinds: RMSNorm, LayerNorm, DyT (`γ·f(α·x)+β`, f = tanh or an ablation) and Derf
(`γ·erf(α·x+s)+β`). Initial values live in `reset_parameters`, so a model materialised from
the meta device or partitioned by ZeRO-3 starts from the same α₀, γ and β as an eager one.
Scalars have shape (1,), not (): DeepSpeed cannot broadcast 0-dim tensors.

DyT and Derf have two backends (`NormConfig.backend`): `torch`, the reference below, and
`triton`, the fused kernels of `megatron_dyt.kernels` (one pass over memory each way, and a fused
residual add). The kernels run on CUDA tensors, and on CPU tensors only under Triton's
interpreter (`TRITON_INTERPRET=1`, the tests); elsewhere on CPU the reference runs, with a
one-time `NormBackendNotice`. Float64 inputs (gradcheck) always take the reference.

Statistics for the trainer (docs/design.md §1): with `record_stats` on, a norm keeps the
statistics of the first input it sees (`stats`, one fp32 tensor on the input's device, in the
order of its `STATS`). The norm computes them itself, from what it normalizes (for the fused
residual path, the h the kernel returns), so no hook is needed and the fused kernels stay on.
"""

from __future__ import annotations

import warnings
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn

from megatron_dyt.config import NormBackend, NormConfig, NormKind, NormSite
from megatron_dyt.errors import UsageError


class NormBackendNotice(UserWarning):
    """backend 'triton' on CPU without Triton's interpreter: the torch reference runs instead."""


_kernels: ModuleType | None = None  # megatron_dyt.kernels.ops, once a triton-backend norm exists
_kernels_error: str | None = None
_cpu_notice_shown = False


def _load_kernels() -> None:
    """Import the Triton ops at construction, so they are registered before any torch.compile."""
    global _kernels, _kernels_error
    if _kernels is not None or _kernels_error is not None:
        return
    try:
        from megatron_dyt.kernels import ops
    except Exception as exc:  # no triton (macOS), or a broken install
        _kernels_error = f"{type(exc).__name__}: {exc}"
    else:
        _kernels = ops


def _use_kernels(backend: NormBackend, x: torch.Tensor) -> bool:
    """Whether this call runs the Triton kernels; never falls back silently on a GPU."""
    if backend != "triton" or x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    if x.device.type == "cuda":
        if _kernels is None:
            raise UsageError(
                f"model.norm.backend='triton' but the Triton kernels cannot be imported"
                f" ({_kernels_error}); install triton or set model.norm.backend=torch"
            )
        return True
    if x.device.type != "cpu":  # meta tensors and others: shapes only, the reference is exact
        return False
    if _kernels is not None and _kernels.INTERPRET:
        return True
    if not torch.compiler.is_compiling():  # a warning in a compiled block is a graph break;
        _cpu_notice()  # the final norm, never compiled, runs on the same backend and shows it
    return False


def _cpu_notice() -> None:
    global _cpu_notice_shown
    if not _cpu_notice_shown:
        _cpu_notice_shown = True
        warnings.warn(
            "model.norm.backend='triton': the DyT/Derf kernels need CUDA (or TRITON_INTERPRET=1);"
            " running the torch reference on CPU",
            NormBackendNotice,
            stacklevel=3,
        )


def _has_forward_hooks(module: nn.Module) -> bool:
    """Hooks expect to see the norm's input (ZeRO-3 fetches parameters in them), so a hooked
    norm takes the unfused residual path; the trainer's statistics use no hooks."""
    return bool(
        module._forward_pre_hooks
        or module._forward_hooks
        or nn.modules.module._global_forward_pre_hooks
        or nn.modules.module._global_forward_hooks
    )


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """fp32 math for half-precision activations; float64 stays float64 (gradcheck)."""
    return torch.promote_types(x.dtype, torch.float32)


SATURATION = 2.0
"""|α·x| above this counts as saturated: tanh(2) = 0.96, where tanh is flat and passes almost no
gradient (docs/design.md §1)."""


class _Norm(nn.Module):
    """A norm layer that can also take the residual add in front of it, and that records
    statistics of its input when asked (`record_stats`)."""

    STATS: tuple[str, ...] = ("input_std",)
    """What `stats` holds, in order; norms with an α add it and the saturated fraction."""

    def __init__(self) -> None:
        super().__init__()
        self.record_stats = False
        self.stats: torch.Tensor | None = None

    def _record(self, x: torch.Tensor) -> None:
        """Keep the statistics of `x` while recording, once (the first micro-batch): device
        tensors only, no host sync inside the step."""
        if self.record_stats and self.stats is None:
            with torch.no_grad():
                self.stats = self._input_stats(x.detach())

    def _input_stats(self, x: torch.Tensor) -> torch.Tensor:
        return x.float().std().reshape(1)

    def forward_residual(
        self, x: torch.Tensor, r: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`h = x + r` and `norm(h)`: returns (h, norm(h)); backends may fuse the two."""
        h = x + r
        return h, self(h)


SQUASH = {
    "tanh": torch.tanh,
    "hardtanh": F.hardtanh,
    "sigmoid": torch.sigmoid,
    "identity": lambda x: x,
}


class RMSNorm(_Norm):
    def __init__(self, hidden_size: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(hidden_size))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._record(x)
        # F.rms_norm: on CUDA one fused kernel whose statistics are fp32 whatever the activation
        # dtype (as LLaMA's), saving only its input and one statistic per row for the backward,
        # where the unfused form kept fp32 copies of the whole activation.
        return F.rms_norm(x, self.weight.shape, self.weight.to(x.dtype), self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class LayerNorm(_Norm):
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
        self._record(x)
        ct = _compute_dtype(x)
        y = F.layer_norm(x.to(ct), x.shape[-1:], self.weight.to(ct), self.bias.to(ct), self.eps)
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class DyT(_Norm):
    """Dynamic Tanh: an element-wise stand-in for a norm, `γ·f(α·x)+β` with one scalar α."""

    STATS = ("alpha", "input_std", "saturated")

    def __init__(
        self,
        hidden_size: int,
        alpha0: float,
        *,
        beta: bool = True,
        learnable_alpha: bool = True,
        squash: str = "tanh",
        backend: NormBackend = "torch",
    ):
        super().__init__()
        self.alpha0 = alpha0
        self.squash = squash
        self.backend = backend
        if backend == "triton":
            _load_kernels()
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
        self._record(x)
        if _use_kernels(self.backend, x):
            return _kernels.dyt(x, self.alpha, self.weight, self.bias, self.squash)
        ct = _compute_dtype(x)
        y = self._f(self.alpha.to(ct) * x.to(ct)) * self.weight.to(ct)
        if self.bias is not None:
            y = y + self.bias.to(ct)
        return y.to(x.dtype)

    def forward_residual(
        self, x: torch.Tensor, r: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`h = x + r` and DyT(h); one fused kernel on the triton backend (unless hooked)."""
        if not _has_forward_hooks(self) and _use_kernels(self.backend, x):
            h, y = _kernels.residual_dyt(x, r, self.alpha, self.weight, self.bias, self.squash)
            self._record(h)
            return h, y
        return super().forward_residual(x, r)

    def _input_stats(self, x: torch.Tensor) -> torch.Tensor:
        return _alpha_stats(self.alpha, x)

    def extra_repr(self) -> str:
        return (
            f"{self.weight.shape[0]}, alpha0={self.alpha0}, squash={self.squash},"
            f" beta={self.bias is not None}, learnable_alpha={self.alpha.requires_grad},"
            f" backend={self.backend}"
        )


class Derf(_Norm):
    """Dynamic erf (Stronger Normalization-Free Transformers): `γ·erf(α·x+s)+β`."""

    STATS = ("alpha", "input_std", "saturated")

    def __init__(
        self,
        hidden_size: int,
        alpha0: float,
        *,
        shift0: float = 0.0,
        beta: bool = True,
        learnable_alpha: bool = True,
        backend: NormBackend = "torch",
    ):
        super().__init__()
        self.alpha0 = alpha0
        self.shift0 = shift0
        self.backend = backend
        if backend == "triton":
            _load_kernels()
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
        self._record(x)
        if _use_kernels(self.backend, x):
            return _kernels.derf(x, self.alpha, self.shift, self.weight, self.bias)
        ct = _compute_dtype(x)
        y = torch.erf(self.alpha.to(ct) * x.to(ct) + self.shift.to(ct)) * self.weight.to(ct)
        if self.bias is not None:
            y = y + self.bias.to(ct)
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return (
            f"{self.weight.shape[0]}, alpha0={self.alpha0}, shift0={self.shift0},"
            f" beta={self.bias is not None}, learnable_alpha={self.alpha.requires_grad},"
            f" backend={self.backend}"
        )

    def forward_residual(
        self, x: torch.Tensor, r: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`h = x + r` and Derf(h); one fused kernel on the triton backend (unless hooked)."""
        if not _has_forward_hooks(self) and _use_kernels(self.backend, x):
            h, y = _kernels.residual_derf(x, r, self.alpha, self.shift, self.weight, self.bias)
            self._record(h)
            return h, y
        return super().forward_residual(x, r)

    def _input_stats(self, x: torch.Tensor) -> torch.Tensor:
        return _alpha_stats(self.alpha, x)


def _alpha_stats(alpha: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(α, std of x, fraction of |α·x| > SATURATION) as one fp32 tensor on x's device. For Derf
    too the measure is |α·x|, without the shift, so DyT and Derf runs compare directly."""
    xf = x.float()
    a = alpha.detach().float().reshape(())
    saturated = ((a * xf).abs() > SATURATION).float().mean()
    return torch.stack([a, xf.std(), saturated])


def stat_names(kind: NormKind) -> tuple[str, ...]:
    """What a norm of `kind` records (its `STATS`): the same on every rank, from the config."""
    classes = {"rmsnorm": RMSNorm, "layernorm": LayerNorm, "dyt": DyT, "derf": Derf}
    if kind not in classes:
        raise ValueError(f"unknown norm kind {kind!r}; allowed: {', '.join(classes)}")
    return classes[kind].STATS


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
            backend=cfg.backend,
        )
    if cfg.kind == "derf":
        return Derf(
            hidden_size,
            cfg.alpha(site),
            shift0=cfg.derf_shift,
            beta=cfg.beta,
            learnable_alpha=cfg.learnable_alpha,
            backend=cfg.backend,
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
