"""Every norm kind against its closed form, forward and gradients, at every site."""

from __future__ import annotations

import math

import pytest
import torch
from torch.func import functional_call

from megatron_dyt.config import NormConfig
from megatron_dyt.norms import Derf, DyT, LayerNorm, RMSNorm, build_norm

SITES = ("attention", "mlp", "final")
H = 12


def _randomise(norm: torch.nn.Module, gen: torch.Generator) -> None:
    """Move every parameter off its initial value so the closed form is really exercised."""
    with torch.no_grad():
        for p in norm.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.5 + p)


def _closed_form(
    kind: str, norm: torch.nn.Module, x: torch.Tensor, squash: str = "tanh"
) -> torch.Tensor:
    if kind == "rmsnorm":
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + norm.eps) * norm.weight
    if kind == "layernorm":
        mu = x.mean(-1, keepdim=True)
        var = ((x - mu) ** 2).mean(-1, keepdim=True)
        return (x - mu) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias
    if kind == "dyt":
        z = norm.alpha * x
        f = {
            "tanh": (torch.exp(z) - torch.exp(-z)) / (torch.exp(z) + torch.exp(-z)),
            "hardtanh": z.clamp(-1, 1),
            "sigmoid": 1 / (1 + torch.exp(-z)),
            "identity": z,
        }[squash]
        y = norm.weight * f
        return y + norm.bias if norm.bias is not None else y
    if kind == "derf":
        z = norm.alpha * x + norm.shift
        y = norm.weight * torch.erf(z)
        return y + norm.bias if norm.bias is not None else y
    raise AssertionError(kind)


CASES = [
    ("rmsnorm", {}),
    ("layernorm", {}),
    ("dyt", {"squash": "tanh", "beta": False}),
    ("dyt", {"squash": "tanh", "beta": True}),
    ("dyt", {"squash": "hardtanh", "beta": True}),
    ("dyt", {"squash": "sigmoid", "beta": True}),
    ("dyt", {"squash": "identity", "beta": False}),
    ("derf", {"beta": True, "derf_shift": 0.25}),
    ("derf", {"beta": False}),
]


@pytest.mark.parametrize("site", SITES)
@pytest.mark.parametrize("kind,opts", CASES)
def test_forward_and_gradients_match_closed_form(kind, opts, site):
    cfg = NormConfig(kind=kind, alpha_attn=0.7, alpha_mlp=0.3, alpha_final=1.3, **opts)
    norm = build_norm(site, H, cfg).double()
    gen = torch.Generator().manual_seed(hash((kind, site, tuple(opts.items()))) % 2**31)
    _randomise(norm, gen)
    x = torch.randn(3, 5, H, generator=gen, dtype=torch.float64, requires_grad=True)
    squash = opts.get("squash", "tanh")

    expected = _closed_form(kind, norm, x, squash)
    got = norm(x)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)

    # Gradients w.r.t. the input and every parameter equal the closed form's...
    gy = torch.randn(got.shape, generator=gen, dtype=torch.float64)
    params = [x, *norm.parameters()]
    g_got = torch.autograd.grad(got, params, gy)
    g_ref = torch.autograd.grad(_closed_form(kind, norm, x, squash), params, gy)
    for a, b in zip(g_got, g_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # ... and finite differences (hardtanh is not differentiable at ±1; random points avoid it).
    assert torch.autograd.gradcheck(lambda inp: norm(inp), (x,), eps=1e-6, atol=1e-8)
    for name, p in norm.named_parameters():
        if p.requires_grad:
            value = p.detach().clone().requires_grad_(True)
            assert torch.autograd.gradcheck(
                lambda v, name=name: functional_call(norm, {name: v}, (x.detach(),)),
                (value,),
                eps=1e-6,
                atol=1e-8,
            )


@pytest.mark.parametrize("site,alpha", [("attention", 0.8), ("mlp", 0.2), ("final", 0.05)])
def test_factory_uses_the_site_alpha_and_initial_values(site, alpha):
    cfg = NormConfig(kind="dyt", alpha_attn=0.8, alpha_mlp=0.2, alpha_final=0.05, beta=False)
    norm = build_norm(site, H, cfg)
    assert isinstance(norm, DyT)
    assert norm.alpha.shape == (1,)  # DeepSpeed cannot broadcast 0-dim tensors
    assert norm.alpha.item() == pytest.approx(alpha)
    assert torch.equal(norm.weight, torch.ones(H))
    assert norm.bias is None

    derf = build_norm(
        site,
        H,
        NormConfig(
            kind="derf", alpha_attn=alpha, alpha_mlp=alpha, alpha_final=alpha, derf_shift=0.1
        ),
    )
    assert isinstance(derf, Derf)
    assert derf.alpha.item() == pytest.approx(alpha)
    assert derf.shift.item() == pytest.approx(0.1)
    assert torch.equal(derf.bias, torch.zeros(H))


def test_kinds_and_learnable_alpha():
    assert isinstance(build_norm("mlp", H, NormConfig(kind="rmsnorm")), RMSNorm)
    assert isinstance(build_norm("mlp", H, NormConfig(kind="layernorm")), LayerNorm)
    frozen = build_norm("mlp", H, NormConfig(kind="dyt", learnable_alpha=False))
    assert not frozen.alpha.requires_grad
    with pytest.raises(ValueError, match="unknown norm site 'ffn'"):
        build_norm("ffn", H, NormConfig())


@pytest.mark.interpreter  # backend 'triton', the default
def test_identity_squash_is_identity():
    norm = build_norm(
        "attention", H, NormConfig(kind="dyt", squash="identity", alpha_attn=1.0, beta=True)
    )
    x = torch.randn(4, H)
    assert torch.equal(norm(x), x)


@pytest.mark.parametrize("kind", ["dyt", "derf", "rmsnorm", "layernorm"])
def test_meta_construction_then_reset_gives_the_same_initial_values(kind):
    cfg = NormConfig(kind=kind, alpha_attn=0.6, derf_shift=0.2)
    eager = build_norm("attention", H, cfg)
    with torch.device("meta"):
        meta = build_norm("attention", H, cfg)
    materialised = meta.to_empty(device="cpu")
    materialised.reset_parameters()
    for (name, a), (_, b) in zip(
        eager.named_parameters(), materialised.named_parameters(), strict=True
    ):
        assert torch.equal(a, b), name


@pytest.mark.interpreter  # backend 'triton', the default
def test_half_precision_math_is_fp32():
    norm = build_norm("attention", H, NormConfig(kind="dyt", alpha_attn=0.5))
    x = torch.randn(8, H, dtype=torch.bfloat16)
    y = norm(x)
    assert y.dtype == torch.bfloat16
    expected = (torch.tanh(0.5 * x.float())).to(torch.bfloat16)
    assert torch.equal(y, expected)
    assert math.isclose(norm.alpha.item(), 0.5)
