"""The fused Triton DyT / Derf kernels against the torch reference modules, and the factory's
backend switch. Without a GPU the kernels run through Triton's interpreter (tests/conftest.py
sets TRITON_INTERPRET=1), so shapes are small; the CUDA-graph tests and Inductor with the
real kernels need a GPU (tests/test_compile.py compiles the interpreter's on CPU)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import warnings

import pytest
import torch

from megatron_dyt import norms
from megatron_dyt.config import NormConfig
from megatron_dyt.norms import Derf, DyT, NormBackendNotice, build_norm

ops = pytest.importorskip("megatron_dyt.kernels.ops", reason="Triton is not installed")

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
pytestmark = pytest.mark.skipif(
    not (CUDA or ops.INTERPRET),
    reason="the kernels need CUDA or TRITON_INTERPRET=1 (tests/conftest.py sets it without a GPU)",
)

# Forces several column tiles (hidden 80 → 3 tiles of 32, the last one ragged) and several row
# programs with a ragged last one: the paths large hidden sizes and big batches take on a GPU.
SMALL_BLOCKS = dict(
    fwd_max_block_n=32,
    fwd_tile=128,
    bwd_max_block_n=32,
    bwd_tile=128,
    bwd_min_rows=8,
    bwd_programs_per_sm=4,
    sm_count=2,
)

# (kind, squash, beta)
VARIANTS = [
    ("dyt", "tanh", False),
    ("dyt", "tanh", True),
    ("dyt", "hardtanh", True),
    ("dyt", "sigmoid", False),
    ("dyt", "identity", True),
    ("derf", "erf", True),
    ("derf", "erf", False),
]
VARIANT_IDS = [f"{k}-{s}-{'beta' if b else 'nobeta'}" for k, s, b in VARIANTS]

# Tolerances against the fp32 reference on the same low-precision input: outputs and dx are
# rounded to the input dtype, so they may differ by one unit in the last place; parameter
# gradients are fp32 sums of products of the same rounded values.
TOL = {
    torch.float32: dict(out=(1e-5, 1e-5), param=(1e-5, 1e-5)),
    torch.bfloat16: dict(out=(1.6e-2, 1e-2), param=(1e-4, 1e-4)),
    torch.float16: dict(out=(2e-3, 1e-3), param=(1e-4, 1e-4)),
}


def _reference(kind: str, squash: str, beta: bool, hidden: int, seed: int = 0) -> torch.nn.Module:
    """A torch-backend module with every parameter moved off its initial value."""
    if kind == "dyt":
        norm = DyT(hidden, 0.7, beta=beta, squash=squash)
    else:
        norm = Derf(hidden, 0.6, shift0=0.2, beta=beta)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in norm.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.3)
    return norm.to(DEVICE)


def _kernel(norm: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    if isinstance(norm, Derf):
        return ops.derf(x, norm.alpha, norm.shift, norm.weight, norm.bias)
    return ops.dyt(x, norm.alpha, norm.weight, norm.bias, norm.squash)


def _residual_kernel(norm: torch.nn.Module, x: torch.Tensor, r: torch.Tensor):
    if isinstance(norm, Derf):
        return ops.residual_derf(x, r, norm.alpha, norm.shift, norm.weight, norm.bias)
    return ops.residual_dyt(x, r, norm.alpha, norm.weight, norm.bias, norm.squash)


def _inputs(shape, dtype, seed: int = 1, scale: float = 2.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen) * scale).to(DEVICE, dtype).requires_grad_(True)


def _assert_close(got: torch.Tensor, want: torch.Tensor, tol: tuple[float, float], what: str):
    assert got.dtype == want.dtype, what
    torch.testing.assert_close(got, want, rtol=tol[0], atol=tol[1], msg=lambda m: f"{what}: {m}")


def _check_against_reference(kind, squash, beta, shape, dtype) -> None:
    norm = _reference(kind, squash, beta, shape[-1])
    x = _inputs(shape, dtype)
    y = _kernel(norm, x)
    want = norm(x)
    tol = TOL[dtype]
    _assert_close(y, want, tol["out"], "y")

    dy = _inputs(shape, dtype, seed=2, scale=1.0).detach()
    params = [x, *(p for p in norm.parameters() if p.requires_grad)]
    got = torch.autograd.grad(y, params, dy)
    ref = torch.autograd.grad(want, params, dy)
    names = ["dx", *(n for n, p in norm.named_parameters() if p.requires_grad)]
    for name, g, r in zip(names, got, ref, strict=True):
        _assert_close(g, r, tol["out"] if name == "dx" else tol["param"], name)


@pytest.mark.parametrize("kind,squash,beta", VARIANTS, ids=VARIANT_IDS)
@pytest.mark.interpreter
def test_forward_and_gradients_match_the_reference_fp32(kind, squash, beta):
    # A 3-D input (any leading shape) with hidden 64, and hidden 80 (not a power of two) on the
    # many-tiles, many-programs path.
    _check_against_reference(kind, squash, beta, (3, 7, 64), torch.float32)
    with ops.tuning(**SMALL_BLOCKS):
        _check_against_reference(kind, squash, beta, (37, 80), torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize(
    "kind,squash,beta", [VARIANTS[0], VARIANTS[1], VARIANTS[5]], ids=["dyt", "dyt-beta", "derf"]
)
@pytest.mark.interpreter
def test_forward_and_gradients_match_the_reference_half(kind, squash, beta, dtype):
    _check_against_reference(kind, squash, beta, (4, 9, 80), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind,squash,beta", [VARIANTS[1], VARIANTS[5]], ids=["dyt", "derf"])
@pytest.mark.interpreter
def test_flat_forward_kernel_matches_the_reference(kind, squash, beta, dtype):
    # The flattened forward (a launch option): blocks of 64 elements straddle rows of 80, and
    # the last block is ragged (37 × 80 = 2960 = 46 × 64 + 16); the fused residual variant too.
    with ops.tuning(fwd_flat=1, fwd_tile=64):
        _check_against_reference(kind, squash, beta, (37, 80), dtype)
        norm = _reference(kind, squash, beta, 80)
        x, r = _inputs((37, 80), dtype), _inputs((37, 80), dtype, seed=3)
        h, y = _residual_kernel(norm, x, r)
    tol = TOL[dtype]["out"]
    _assert_close(h, x + r, (0, 0), "h")
    _assert_close(y, norm(x + r), tol, "y")


@pytest.mark.parametrize("hidden", [5120, 22016])
@pytest.mark.interpreter
def test_large_non_power_of_two_hidden_sizes(hidden):
    _check_against_reference("dyt", "tanh", False, (3, hidden), torch.float32)
    _check_against_reference("derf", "erf", True, (2, hidden), torch.bfloat16)


@pytest.mark.interpreter
def test_bf16_output_is_the_rounded_fp32_result():
    # All of bf16's normal numbers (and 0) through tanh(0.5·x): the kernel rounds its fp32
    # result to nearest even, like PyTorch, and its tanh is accurate enough that no rounding
    # lands elsewhere under the interpreter (numpy's exp). A GPU's exp is an approximation
    # (ex2.approx), so there a rare result may land one bf16 step away.
    bits = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    x = bits.view(torch.bfloat16)
    x = x[torch.isfinite(x) & ((x.float().abs() > 1e-37) | (x == 0))]
    x = x[: x.numel() // 128 * 128].reshape(-1, 128).to(DEVICE)
    y = ops.dyt(x, torch.tensor([0.5], device=DEVICE), torch.ones(128, device=DEVICE))
    want = torch.tanh(0.5 * x.float()).to(torch.bfloat16)
    off = y != want
    assert off.sum() <= (1e-3 * y.numel() if CUDA else 0)
    ulp = (want.float().abs() * 2.0**-7).clamp_min(2.0**-133)
    assert ((y.float() - want.float()).abs() <= ulp).all()


@pytest.mark.interpreter
def test_tanh_is_accurate_in_fp32():
    z = torch.linspace(-12, 12, 64 * 1000, dtype=torch.float64).reshape(64, 1000)
    y = ops.dyt(z.float().to(DEVICE), torch.ones(1, device=DEVICE), torch.ones(1000, device=DEVICE))
    exact = torch.tanh(z.float().double()).to(DEVICE)
    assert ((y.double() - exact).abs() / exact.abs().clamp_min(1e-30)).max() < 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind,squash,beta", [VARIANTS[1], VARIANTS[5]], ids=["dyt", "derf"])
@pytest.mark.interpreter
def test_fused_residual_matches_add_then_norm(kind, squash, beta, dtype):
    norm = _reference(kind, squash, beta, 80)
    x = _inputs((2, 11, 80), dtype, seed=3)
    r = _inputs((2, 11, 80), dtype, seed=4)
    with ops.tuning(**SMALL_BLOCKS):
        h, y = _residual_kernel(norm, x, r)
        h_ref = x + r
        y_ref = norm(h_ref)
        assert torch.equal(h, h_ref)  # the add is rounded to the input dtype exactly as torch's
        tol = TOL[dtype]
        _assert_close(y, y_ref, tol["out"], "y")

        # Both outputs feed the loss: the residual stream's gradient joins the norm's.
        dh = _inputs(h.shape, dtype, seed=5, scale=1.0).detach()
        dy = _inputs(h.shape, dtype, seed=6, scale=1.0).detach()
        params = [x, r, *norm.parameters()]
        got = torch.autograd.grad((h, y), params, (dh, dy))
        ref = torch.autograd.grad((h_ref, y_ref), params, (dh, dy))
    names = ["dx", "dr", *(n for n, _ in norm.named_parameters())]
    for name, g, w in zip(names, got, ref, strict=True):
        _assert_close(g, w, tol["out"] if name in ("dx", "dr") else tol["param"], name)


@pytest.mark.interpreter
def test_fused_residual_when_only_y_is_used():
    norm = _reference("dyt", "tanh", False, 64)
    x, r = _inputs((5, 64), torch.float32), _inputs((5, 64), torch.float32, seed=7)
    _, y = _residual_kernel(norm, x, r)
    gx, gr = torch.autograd.grad(y.sum(), [x, r])
    ref = torch.autograd.grad(norm(x + r).sum(), [x, r])
    torch.testing.assert_close(gx, ref[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gr, ref[1], rtol=1e-5, atol=1e-5)


@pytest.mark.interpreter
def test_gradients_are_bit_identical_run_to_run():
    norm = _reference("derf", "erf", True, 80)
    x = _inputs((45, 80), torch.bfloat16)
    dy = _inputs((45, 80), torch.bfloat16, seed=2).detach()
    params = [x, *norm.parameters()]
    with ops.tuning(**SMALL_BLOCKS):
        first = torch.autograd.grad(_kernel(norm, x), params, dy)
        second = torch.autograd.grad(_kernel(norm, x), params, dy)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


@pytest.mark.interpreter
def test_parameters_in_half_precision_get_gradients_in_their_dtype():
    # DeepSpeed bf16 keeps the module's parameters in bf16.
    norm = _reference("derf", "erf", True, 64).to(torch.bfloat16)
    x = _inputs((6, 64), torch.bfloat16)
    grads = torch.autograd.grad(_kernel(norm, x).float().sum(), [x, *norm.parameters()])
    assert all(g.dtype == torch.bfloat16 for g in grads)
    ref = torch.autograd.grad(norm(x).float().sum(), [x, *norm.parameters()])
    for g, r in zip(grads, ref, strict=True):
        torch.testing.assert_close(g, r, rtol=2e-2, atol=2e-2)


def _sum_in(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`values` added one after another in `dtype`: what partial sums kept in it would give."""
    total = torch.zeros((), dtype=dtype)
    for v in values.to(dtype):
        total = total + v
    return total


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("kind", ["dyt", "derf"])
@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")  # fp16's inf
@pytest.mark.interpreter
def test_scalar_gradients_are_summed_in_fp32(kind, dtype):
    # dα (and Derf's ds) sum one term per element of the activation: here 128 × 1024 terms of
    # about 1, about 1.3e5 in all, more than fp16 holds (65504). The kernel keeps its partial sums
    # and their reduction in fp32 and rounds once, to the parameter's dtype. With fp32 parameters
    # the result matches an fp64 sum of the same terms to 1e-5 relative, where even the 128 row
    # totals (each exact) summed in the input dtype do not: inf in fp16, ~1e-3 off in bf16.
    m, n = 128, 1024
    gen = torch.Generator().manual_seed(0)
    x = (torch.rand(m, n, generator=gen) + 0.5).to(DEVICE, dtype)  # 0.5 … 1.5
    dy = (torch.rand(m, n, generator=gen) + 0.5).to(DEVICE, dtype)
    w = torch.ones(n, device=DEVICE)

    def grads(param_dtype: torch.dtype) -> list[torch.Tensor]:
        alpha = torch.tensor([0.05], device=DEVICE, dtype=param_dtype, requires_grad=True)
        shift = torch.tensor([0.1], device=DEVICE, dtype=param_dtype, requires_grad=True)
        if kind == "dyt":
            return list(torch.autograd.grad(ops.dyt(x, alpha, w.to(param_dtype)), [alpha], dy))
        y = ops.derf(x, alpha, shift, w.to(param_dtype))
        return list(torch.autograd.grad(y, [alpha, shift], dy))

    # fp64 reference: g = dy·γ·f'(z) per element; dα = Σ g·x, ds = Σ g
    xd, a = x.double().cpu(), torch.tensor(0.05, dtype=torch.float32).double()
    z = a * xd + (torch.tensor(0.1, dtype=torch.float32).double() if kind == "derf" else 0)
    slope = 1 - torch.tanh(z) ** 2 if kind == "dyt" else 2 / math.sqrt(math.pi) * torch.exp(-z * z)
    g = dy.double().cpu() * slope
    terms = [g * xd] if kind == "dyt" else [g * xd, g]

    for got, t in zip(grads(torch.float32), terms, strict=True):
        want = t.sum().item()
        assert want > 1.2e5  # beyond fp16's range
        assert got.dtype == torch.float32
        assert abs(got.item() - want) <= 1e-5 * want
        low = _sum_in(t.sum(dim=1), dtype).item()
        assert not abs(low - want) <= 1e-5 * want, low  # inf fails the comparison too

    # With parameters in the input dtype (DeepSpeed keeps the module in it), the final rounding
    # is the only one: bf16 lands within half a unit in the last place (2⁻⁸ relative); fp16
    # cannot hold the sum at all, why train.precision=fp16 is refused with DyT/Derf
    # (docs/design.md §7).
    for got, t in zip(grads(dtype), terms, strict=True):
        assert got.dtype == dtype
        if dtype == torch.float16:
            assert torch.isinf(got).all()
        else:
            assert abs(got.item() - t.sum().item()) <= 2**-8 * t.sum().item()


@pytest.mark.interpreter
def test_frozen_alpha_and_empty_input():
    norm = DyT(64, 0.5, beta=False, learnable_alpha=False).to(DEVICE)
    x = _inputs((4, 64), torch.float32)
    (gx,) = torch.autograd.grad(_kernel(norm, x).sum(), [x])
    assert torch.isfinite(gx).all()
    empty = torch.zeros(0, 3, 64, device=DEVICE, requires_grad=True)
    y = _kernel(norm, empty)
    assert y.shape == (0, 3, 64)
    y.sum().backward()
    assert empty.grad.shape == empty.shape


def test_bad_inputs_are_clear_errors():
    alpha, weight = torch.ones(1, device=DEVICE), torch.ones(64, device=DEVICE)
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        ops.dyt(torch.ones(2, 64, dtype=torch.float64, device=DEVICE), alpha, weight)
    with pytest.raises(ValueError, match="last dimension"):
        ops.dyt(torch.ones(2, 63, device=DEVICE), alpha, weight)
    with pytest.raises(ValueError, match="residual must match"):
        ops.residual_dyt(
            torch.ones(2, 64, device=DEVICE), torch.ones(1, 64, device=DEVICE), alpha, weight
        )
    with pytest.raises(ValueError, match="bias has 65 values, the weight 64"):
        ops.dyt(torch.ones(2, 64, device=DEVICE), alpha, weight, torch.ones(65, device=DEVICE))
    with pytest.raises(ValueError, match=r"shift must hold one value, got shape \(2,\)"):
        ops.derf(torch.ones(2, 64, device=DEVICE), alpha, torch.zeros(2, device=DEVICE), weight)


@pytest.mark.interpreter
def test_strided_weight_and_bias_are_read_as_their_values():
    x = _inputs((4, 80), torch.float32)
    alpha = torch.tensor([0.7], device=DEVICE)
    w = torch.randn(160, device=DEVICE)[::2].requires_grad_()  # a view with stride 2
    b = torch.randn(1, device=DEVICE).expand(80).requires_grad_()  # stride 0
    got = ops.dyt(x, alpha, w, b)
    want = torch.tanh(alpha * x) * w + b
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    grads = torch.autograd.grad(got.sum(), [x, w, b])
    for g, ref in zip(grads, torch.autograd.grad(want.sum(), [x, w, b]), strict=True):
        torch.testing.assert_close(g, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.interpreter
def test_double_backward_through_the_eager_kernels_is_an_error():
    # The kernels' backward is not itself differentiable: a second-order term must fail loudly,
    # not come out as if dx did not depend on x.
    norm = DyT(64, 0.5, beta=True).to(DEVICE)
    x = _inputs((4, 64), torch.float32)
    y = _kernel(norm, x)
    with pytest.raises(RuntimeError, match="no second derivative .* backend: torch"):
        torch.autograd.grad(y.sum(), [x], create_graph=True)
    h, y = ops.residual_dyt(x, x.detach(), norm.alpha, norm.weight, norm.bias)
    with pytest.raises(RuntimeError, match="no second derivative"):
        torch.autograd.grad((h + y).sum(), [x], create_graph=True)


_SYMBOLIC_TRACE = """
import torch
from torch.fx.experimental.proxy_tensor import make_fx
from megatron_dyt.kernels import ops  # noqa: F401  (registers the custom ops)

def backward(dy, x, alpha, w):
    return torch.ops.megatron_dyt.dyt_backward.default(dy, x, alpha, None, w, None, None, 0)

args = (torch.randn(6, 80), torch.randn(6, 80), torch.tensor([0.7]), torch.randn(80))
graph = make_fx(backward, tracing_mode="symbolic")(*args)
print("traced", sum("dyt_backward" in str(n.target) for n in graph.graph.nodes))
"""


@pytest.mark.slow  # a fresh interpreter: 3.5-6 s
def test_backward_traces_with_symbolic_shapes():
    # What torch.compile(dynamic=True) does with the custom ops: their fake implementations run
    # with symbolic sizes, so the launch grid must not need hashable ones. Traced without the
    # interpreter (in a subprocess), which cannot run on fake tensors.
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run(
        [sys.executable, "-c", _SYMBOLIC_TRACE], capture_output=True, text=True, env=env
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["traced", "1"]


# ---- custom ops and compilation -------------------------------------------------------------


@pytest.mark.interpreter
def test_opcheck():
    x = _inputs((6, 80), torch.float32)
    alpha = torch.tensor([0.6], device=DEVICE, requires_grad=True)
    shift = torch.tensor([0.1], device=DEVICE, requires_grad=True)
    w = torch.randn(80, device=DEVICE, requires_grad=True)
    b = torch.randn(80, device=DEVICE, requires_grad=True)
    # Every check, the fake-tensor and AOT-dispatch ones included: under the interpreter the
    # ops' fake implementations launch nothing (ops.py, "custom ops").
    for op, args in [
        (torch.ops.megatron_dyt.dyt.default, (x, alpha, None, w, b, 0)),
        (torch.ops.megatron_dyt.dyt.default, (x, alpha, shift, w, None, 4)),
        (torch.ops.megatron_dyt.residual_dyt.default, (x, x.detach() * 2, alpha, shift, w, b, 4)),
        (
            torch.ops.megatron_dyt.dyt_backward.default,
            (x.detach(), x.detach(), alpha.detach(), None, w.detach(), None, None, 0),
        ),
    ]:
        torch.library.opcheck(op, args, test_utils="ALL")


@pytest.mark.parametrize("kind,squash,beta", [VARIANTS[1], VARIANTS[5]], ids=["dyt", "derf"])
@pytest.mark.interpreter
def test_eager_calls_bypass_the_custom_ops_and_agree_with_them(monkeypatch, kind, squash, beta):
    # Eagerly the kernels run under plain autograd Functions (a custom op's dispatch costs more
    # host time than a small kernel); while torch.compile traces, they are the custom ops.
    # Same kernels either way: outputs and every gradient must be bit-identical.
    norm = _reference(kind, squash, beta, 80)
    x, r = _inputs((6, 80), torch.bfloat16), _inputs((6, 80), torch.bfloat16, seed=3)
    params = [x, r, *norm.parameters()]

    def run():
        h, y = _residual_kernel(norm, x, r)
        y2 = _kernel(norm, h)
        loss = (h.float() * 0.5).sum() + y.float().pow(2).sum() + y2.float().sum()
        return [h, y, y2, *torch.autograd.grad(loss, params)], {
            type(t.grad_fn).__name__ for t in (y, y2)
        }

    eager, eager_nodes = run()
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    traced, traced_nodes = run()
    assert eager_nodes == {"_ResidualDyTFunctionBackward", "_DyTFunctionBackward"}
    assert not traced_nodes & eager_nodes  # the custom ops' own autograd nodes
    for a, b in zip(eager, traced, strict=True):
        assert torch.equal(a, b)


class _Block(torch.nn.Module):
    """norm → linear → fused residual + norm: what a transformer block does with them."""

    def __init__(self, hidden: int):
        super().__init__()
        self.n1 = _reference("dyt", "tanh", False, hidden)
        self.n2 = _reference("derf", "erf", True, hidden, seed=1)
        self.n1.backend = self.n2.backend = "triton"
        self.lin = torch.nn.Linear(hidden, hidden, device=DEVICE, dtype=torch.bfloat16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, y = self.n2.forward_residual(x, self.lin(self.n1(x)))
        return h + y


@pytest.mark.skipif(
    not CUDA,
    reason="Inductor with the real kernels needs CUDA; tests/test_compile.py compiles a model"
    " block with the interpreter's kernels on CPU",
)
@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
@pytest.mark.interpreter  # the kernel tier (runs on a GPU only)
def test_compiled_block_has_no_graph_break_and_matches_eager(mode):
    norms._load_kernels()
    block = _Block(256)
    x = _inputs((4, 32, 256), torch.bfloat16)
    compiled = torch.compile(block, fullgraph=True, mode=mode)
    for _ in range(3):  # reduce-overhead: warm-up, then CUDA-graph replays
        y = compiled(x)
        (gx,) = torch.autograd.grad(y.float().sum(), [x])
    y_eager = block(x)
    (gx_eager,) = torch.autograd.grad(y_eager.float().sum(), [x])
    torch.testing.assert_close(y, y_eager, rtol=1.6e-2, atol=1e-2)
    torch.testing.assert_close(gx, gx_eager, rtol=1.6e-2, atol=1e-2)


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need CUDA")
@pytest.mark.interpreter  # the kernel tier (runs on a GPU only)
def test_eager_ops_can_be_captured_in_a_cuda_graph():
    norm = _reference("dyt", "tanh", False, 512)
    x = torch.randn(64, 512, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up outside the graph (compiles the kernels)
        torch.autograd.grad(_kernel(norm, x).float().sum(), [x, norm.weight])
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = _kernel(norm, x)
        gx, gw = torch.autograd.grad(y.float().sum(), [x, norm.weight])
    with torch.no_grad():
        x.copy_(torch.randn_like(x))
    graph.replay()
    want = norm(x)
    want_gx, want_gw = torch.autograd.grad(want.float().sum(), [x, norm.weight])
    torch.testing.assert_close(y, want, rtol=1.6e-2, atol=1e-2)
    torch.testing.assert_close(gx, want_gx, rtol=1.6e-2, atol=1e-2)
    torch.testing.assert_close(gw, want_gw, rtol=1e-3, atol=1e-3)


# Compiles the kernels for an H100 (sm_90) with Triton's bundled ptxas, no GPU needed: catches
# what the interpreter does not check (types, layouts, constexpr branches). Run in a fresh
# process because this one decorated the kernels for the interpreter.
_AOT = """
import itertools
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from megatron_dyt.kernels import ops

def build(fn, pointers, ints, flags, blocks, warps):
    sig = {**pointers, **{k: "i32" for k in ints}, **{k: "constexpr" for k in (*flags, *blocks)}}
    values = {**flags, **blocks}
    constexprs = {(list(sig).index(k),): v for k, v in values.items()}
    src = ASTSource(fn=fn, signature=sig, constexprs=constexprs)
    triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})

t = ops.Tuning()
# (squash, shift, bias, residual/dh): LLaMA DyT, its fused-residual form, Derf with everything
variants = [(0, False, False, False), (0, False, False, True), (4, True, True, True)]
for dt, (act, shift, bias, extra) in itertools.product(["bf16", "fp16", "fp32"], variants):
    fwd = {k: f"*{dt}" for k in "X R H Y".split()} | {k: "*fp32" for k in "ALPHA SHIFT W B".split()}
    flags = dict(ACT=act, HAS_SHIFT=shift, HAS_BIAS=bias, HAS_RESIDUAL=extra, EXACT_BF16=False)
    build(ops._fwd_kernel, fwd, ["M", "N"], flags, dict(BLOCK_M=4, BLOCK_N=1024), t.fwd_warps)
    for wide in (False, True):  # 32- and 64-bit element offsets
        flat = dict(BLOCK=4096)
        build(ops._fwd_flat_kernel, fwd, ["TOTAL", "N"], {**flags, "WIDE": wide}, flat, t.fwd_warps)
    fin = {k: "*fp32" for k in "PART_W PART_B PART_AS".split()}
    fin |= {k: f"*{dt}" for k in "DW DB DA DS".split()}
    exact = dict(EXACT_W=False, EXACT_B=False, EXACT_A=False, EXACT_S=False)
    flags = dict(HAS_SHIFT=shift, HAS_BIAS=bias, **exact)
    build(ops._finish_kernel, fin, ["ROWS", "N", "SLOTS"], flags, dict(BLOCK_N=1024, BLOCK_S=256), 4)
    bwd = {k: f"*{dt}" for k in "DY X DH DX".split()}
    bwd |= {k: "*fp32" for k in "ALPHA SHIFT W PART_W PART_B PART_AS".split()}
    flags = dict(ACT=act, HAS_SHIFT=shift, HAS_BIAS=bias, HAS_DH=extra, EXACT_BF16=False)
    for stages in (None, 3):  # the compiler's loop, and a software-pipelined one
        blocks = dict(BLOCK_M=4, BLOCK_N=256, STAGES=stages)
        build(ops._bwd_kernel, bwd, ["M", "N", "ROWS_PER_PROGRAM"], flags, blocks, t.bwd_warps)
print("compiled")
"""


@pytest.mark.slow  # not the interpreter: ptxas compiles for sm_90, 4-6 s
def test_kernels_compile_for_sm90_without_a_gpu():
    import os
    import subprocess
    import sys

    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"this Triton has no ahead-of-time compile API ({exc})")
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1"}
    done = subprocess.run(
        [sys.executable, "-c", _AOT], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0 and "compiled" in done.stdout, done.stderr[-3000:]


# ---- the norm factory -----------------------------------------------------------------------


class _Spy:
    """Stands in for the kernels module: records calls, optionally forwards to the real one."""

    def __init__(self, interpret: bool, forward: bool = True):
        self.INTERPRET = interpret
        self.calls: list[str] = []
        self._forward = forward

    def __getattr__(self, name: str):
        def call(*args, **kwargs):
            self.calls.append(name)
            if not self._forward:
                raise AssertionError(f"kernel {name} called")
            return getattr(ops, name)(*args, **kwargs)

        return call


@pytest.fixture
def spy(monkeypatch):
    def install(interpret: bool = True, forward: bool = True) -> _Spy:
        s = _Spy(interpret, forward)
        monkeypatch.setattr(norms, "_kernels", s)
        monkeypatch.setattr(norms, "_cpu_notice_shown", False)
        return s

    return install


def _cfg(kind: str, backend: str) -> NormConfig:
    return NormConfig(kind=kind, alpha_attn=0.6, beta=True, derf_shift=0.1, backend=backend)


def test_default_backend_is_triton():
    assert NormConfig().backend == "triton"
    with pytest.raises(ValueError):
        NormConfig(backend="cuda")


@pytest.mark.parametrize("kind", ["dyt", "derf"])
@pytest.mark.interpreter
def test_triton_backend_runs_the_kernels_where_they_can_run(kind, spy):
    s = spy(interpret=True)
    norm = build_norm("attention", 64, _cfg(kind, "triton")).to(DEVICE)
    x = _inputs((3, 64), torch.float32)
    norm(x)
    norm.forward_residual(x, x)
    assert s.calls == [kind, f"residual_{kind}"]


@pytest.mark.skipif(CUDA, reason="the CPU fallback: a GPU machine always runs the kernels")
@pytest.mark.parametrize("kind", ["dyt", "derf"])
def test_triton_backend_on_cpu_without_interpreter_falls_back_with_one_notice(kind, spy):
    s = spy(interpret=False, forward=False)
    norm = build_norm("attention", 64, _cfg(kind, "triton"))
    reference = build_norm("attention", 64, _cfg(kind, "torch"))
    x = torch.randn(3, 64)
    with pytest.warns(NormBackendNotice, match="running the torch reference on CPU"):
        y = norm(x)
    assert torch.equal(y, reference(x))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per process
        h, y = norm.forward_residual(x, x)
    assert torch.equal(y, reference(x + x))
    assert s.calls == []


@pytest.mark.parametrize("kind", ["dyt", "derf", "rmsnorm", "layernorm"])
def test_torch_backend_never_runs_a_kernel(kind, spy):
    spy(interpret=True, forward=False)
    norm = build_norm("mlp", 64, _cfg(kind, "torch")).to(DEVICE)
    x = _inputs((3, 64), torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        norm(x)
        h, y = norm.forward_residual(x, x)
    assert torch.equal(h, x + x) and torch.equal(y, norm(x + x))


def test_rmsnorm_and_layernorm_ignore_the_backend(spy):
    spy(interpret=True, forward=False)
    for kind in ("rmsnorm", "layernorm"):
        build_norm("final", 64, _cfg(kind, "triton")).to(DEVICE)(_inputs((2, 64), torch.float32))


def test_float64_takes_the_reference(spy):
    s = spy(interpret=True, forward=False)
    norm = build_norm("attention", 64, _cfg("dyt", "triton")).double().to(DEVICE)
    norm(torch.randn(2, 64, dtype=torch.float64, device=DEVICE))
    assert s.calls == []


@pytest.mark.interpreter
def test_hooked_norm_sees_its_input_unfused(spy):
    # Forward hooks (ZeRO-3's parameter fetch, a user's hook) must see h = x + r, so a hooked
    # norm adds in torch and runs its (kernel) forward through __call__. The trainer's norm
    # statistics use no hooks (tests/test_norm_stats.py).
    s = spy(interpret=True)
    norm = build_norm("mlp", 64, _cfg("dyt", "triton")).to(DEVICE)
    seen = []
    handle = norm.register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    x, r = _inputs((3, 64), torch.float32), _inputs((3, 64), torch.float32, seed=3)
    h, y = norm.forward_residual(x, r)
    handle.remove()
    assert s.calls == ["dyt"] and torch.equal(seen[0], h)
    h2, y2 = norm.forward_residual(x, r)
    assert s.calls == ["dyt", "residual_dyt"]
    assert torch.equal(h, h2) and torch.equal(y, y2)


@pytest.mark.parametrize("kind", ["dyt", "derf"])
@pytest.mark.interpreter
def test_transformer_block_backends_agree(kind, spy):
    # The block's residual add + MLP norm goes through forward_residual: fused on the triton
    # backend, `h = x + r; norm(h)` on the torch one, with the same numbers.
    from common import tiny

    from megatron_dyt import parallel
    from megatron_dyt.model.layers import BuildSpec
    from megatron_dyt.model.llama import TransformerBlock

    s = spy(interpret=True)
    cfg = tiny(kind)
    parallel.setup(cfg.parallel, backend="gloo")  # TP=1: no collectives; gloo like test_model
    cfg_torch = cfg.model_copy(deep=True)
    cfg_torch.model.norm.backend = "torch"
    fused = TransformerBlock(cfg.model, BuildSpec.of(cfg), 0).to(DEVICE)
    plain = TransformerBlock(cfg_torch.model, BuildSpec.of(cfg_torch), 0).to(DEVICE)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in fused.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2 + (p.numel() == 1))
    plain.load_state_dict(fused.state_dict())
    x = _inputs((8, 2, cfg.model.hidden_size), torch.float32)
    y_fused, y_plain = fused(x), plain(x)
    assert s.calls == [kind, f"residual_{kind}"]
    torch.testing.assert_close(y_fused, y_plain, rtol=1e-5, atol=1e-5)
    g_fused = torch.autograd.grad(y_fused.sum(), [x, *fused.parameters()])
    g_plain = torch.autograd.grad(y_plain.sum(), [x, *plain.parameters()])
    for a, b in zip(g_fused, g_plain, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


# ---- the benchmark script -------------------------------------------------------------------


@pytest.mark.interpreter
def test_benchmark_code_path_runs(monkeypatch):
    # Not a timing: the script's own logic on a tiny shape, with torch.compile left out and a
    # do_bench that calls the step once (on CPU the interpreter runs our kernels).
    from megatron_dyt.kernels import bench

    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: fn)
    calls = []

    def fake_do_bench(fn, grad_to_none=None):
        fn()
        calls.append(fn)
        return 0.5  # ms

    saved = []  # what the script writes after every row, so a killed run keeps its rows
    result = bench.run(
        [(8, 64)],
        list(bench.OPS),
        DEVICE.type,
        fake_do_bench,
        1024,
        graph_bench=fake_do_bench,
        on_row=saved.append,
    )
    assert [len(s["rows"]) for s in saved] == list(range(1, len(result["rows"]) + 1))
    assert saved[-1] == result
    assert result["copy_bandwidth_tbs"] == pytest.approx(2 * 1024 * 2 / 0.5e-3 / 1e12)
    rows = result["rows"]
    impls = {"eager", "compile", "rms_norm", "ours"}
    assert {(r["op"], r["pass"]) for r in rows} == set(bench.TENSORS_MOVED)
    for row in rows:
        assert set(row) == {"op", "shape", "pass", "impl", "us", "floor_us", "graph_us"}
        assert row["shape"] == [8, 64] and row["us"] == row["graph_us"] == 500.0
        assert row["impl"] in impls | {"liger"}
        moved = bench.TENSORS_MOVED[(row["op"], row["pass"])] * 8 * 64 * 2
        assert row["floor_us"] == pytest.approx(moved / (result["copy_bandwidth_tbs"] * 1e12) * 1e6)
    assert impls <= {r["impl"] for r in rows}


@pytest.mark.interpreter
def test_benchmark_tune_code_path_runs(monkeypatch):
    from megatron_dyt.kernels import bench

    monkeypatch.setattr(bench, "FWD_GRID", [dict(fwd_tile=64), dict(fwd_tile=128)])
    monkeypatch.setattr(bench, "BWD_GRID", [dict(bwd_tile=64), dict(bwd_tile=128, bwd_warps=8)])
    times = iter(range(100, 0, -1))
    result = bench.tune(
        [(8, 64)], ["residual_dyt"], DEVICE.type, lambda fn, grad_to_none: next(times)
    )
    assert [(r["op"], r["pass"]) for r in result] == [
        ("residual_dyt", "fwd"),
        ("residual_dyt", "fwd+bwd"),
    ]
    assert result[0]["timings"][0]["config"] == dict(fwd_tile=128)  # the faster one first


def test_tuning_within_a_time_budget_times_the_same_configurations_everywhere(monkeypatch):
    from megatron_dyt.kernels import bench

    fwd = [dict(fwd_tile=64), dict(fwd_tile=128), dict(fwd_tile=256), dict(fwd_tile=512)]
    monkeypatch.setattr(bench, "FWD_GRID", fwd)
    monkeypatch.setattr(bench, "BWD_GRID", [dict(bwd_tile=64), dict(bwd_tile=128)])
    monkeypatch.setattr(bench, "time_impl", lambda fn, x, r, pass_, do_bench: 1.0)
    now = iter(range(1000))  # the clock: one second per reading
    cases = bench.tune(
        [(8, 64), (4, 80)], ["dyt", "derf"], DEVICE.type, budget_s=3.0, clock=lambda: next(now)
    )
    assert [(c["op"], c["shape"], c["pass"]) for c in cases] == [
        (op, shape, pass_)
        for pass_ in bench.PASSES
        for op in ("dyt", "derf")
        for shape in ([8, 64], [4, 80])
    ]
    # fwd has 4 of the 6 configurations, so 2 s of the budget. The clock is read when the pass
    # starts (0 s) and before every configuration after the first (1 s, 2 s, 3 s: past it).
    for case in cases:
        timed = [t["config"] for t in case["timings"]]
        assert timed == (fwd[:3] if case["pass"] == "fwd" else bench.BWD_GRID)


def test_tuning_starts_from_the_current_defaults():
    from megatron_dyt.kernels import bench

    defaults = dataclasses.asdict(ops.Tuning())
    for grid in (bench.FWD_GRID, bench.BWD_GRID):
        first = bench._defaults_first(grid)[0]
        assert {k: defaults[k] for k in first} == first
        assert sorted(map(str, bench._defaults_first(grid))) == sorted(map(str, grid))


def test_tuning_picks_the_best_geometric_mean_over_cases():
    from megatron_dyt.kernels import bench

    a, b = dict(fwd_tile=1), dict(fwd_tile=2)
    cases = [  # a wins one case by a little, b the other by a lot: b has the better mean
        {"pass": "fwd", "timings": [{"us": 10.0, "config": a}, {"us": 11.0, "config": b}]},
        {"pass": "fwd", "timings": [{"us": 5.0, "config": b}, {"us": 20.0, "config": a}]},
        {"pass": "fwd+bwd", "timings": [{"us": 3.0, "config": a}, {"us": 4.0, "config": b}]},
    ]
    assert bench.best_configs(cases) == {"fwd": b, "fwd+bwd": a}


def test_results_table_marks_the_fastest_and_the_share_of_the_floor():
    from megatron_dyt.kernels import bench

    row = dict(op="dyt", shape=[8, 64], floor_us=10.0)
    result = {"rows": [{**row, "pass": "fwd", "impl": "ours", "us": 12.5},
                       {**row, "pass": "fwd", "impl": "eager", "us": 40.0}]}  # fmt: skip
    table = bench.markdown(result).splitlines()
    assert table[0] == "| op | shape | pass | floor µs | ours | eager |"
    assert table[2] == "| dyt | 8×64 | fwd | 10.0 | **12.5 (80%)** | 40.0 (25%) |"
    result["rows"][0]["graph_us"] = 20.0  # only ours has a CUDA-graph time
    graph = bench.markdown(result, "graph_us").splitlines()
    assert graph[0] == "| op | shape | pass | floor µs | ours |"
    assert graph[2] == "| dyt | 8×64 | fwd | 10.0 | **20.0 (50%)** |"


@pytest.mark.interpreter
def test_training_step_benchmark_code_path_runs(tmp_path):
    """The model-level benchmark on CPU with a tiny preset: every variant trains and the
    results merge into an existing results file."""
    from megatron_dyt.kernels import bench_step

    path = tmp_path / "results.json"
    path.write_text(json.dumps({"device": "x", "rows": []}))
    result = bench_step.run("tiny", steps=1, warmup=1, device="cpu")
    bench_step.write_json(path, result)
    data = json.loads(path.read_text())
    assert data["device"] == "x" and data["rows"] == []  # the kernel results are kept
    rows = {r["variant"]: r for r in data["train_step"]["rows"]}
    assert set(rows) == {"dyt-triton", "dyt-torch", "rmsnorm"}
    assert rows["rmsnorm"]["ratio_to_rmsnorm"] == 1.0
    # same init seed and data: both DyT backends start from the same loss
    assert rows["dyt-triton"]["first_loss"] == pytest.approx(
        rows["dyt-torch"]["first_loss"], rel=1e-5
    )
    assert all(math.isfinite(r["last_loss"]) and r["ms"] > 0 for r in rows.values())


@pytest.mark.slow
def test_compiled_training_step_benchmark_matches_eager(tmp_path):
    """The anchor the trainer is measured against (`--compile`: the whole model under
    torch.compile, Inductor on CPU) trains the same model: the same first loss as eager, and
    its results go under their own key."""
    from megatron_dyt.kernels import bench_step

    eager = bench_step.run("tiny", 1, 1, "cpu", variants=["rmsnorm", "dyt-torch"])
    compiled = bench_step.run("tiny", 1, 1, "cpu", compile=True, variants=["rmsnorm", "dyt-torch"])
    path = tmp_path / "results.json"
    bench_step.write_json(path, eager)
    bench_step.write_json(path, compiled)
    data = json.loads(path.read_text())
    assert not data["train_step"]["compiled"] and data["train_step_compiled"]["compiled"]
    for a, b in zip(eager["rows"], compiled["rows"], strict=True):
        assert a["variant"] == b["variant"] and b["compiled"]
        assert b["first_loss"] == pytest.approx(a["first_loss"], rel=1e-5)


def test_host_overhead_benchmark_code_path_runs():
    from megatron_dyt.kernels import bench_host

    kernels = {name: getattr(ops, name) for name in (*bench_host.KERNELS, "wrap_triton")}
    result = bench_host.run(calls=3)
    assert [(r["path"], r["pass"]) for r in result["rows"]] == [
        (path, pass_) for path in ("rms_norm", "custom_op", "eager") for pass_ in ("fwd", "fwd+bwd")
    ]
    assert all(r["us"] > 0 for r in result["rows"])
    assert [r["ratio_to_rms_norm"] for r in result["rows"][:2]] == [1.0, 1.0]
    assert {name: getattr(ops, name) for name in kernels} == kernels  # the real launches are back


@pytest.mark.skipif(CUDA, reason="checks the message on a machine without CUDA")
def test_benchmark_without_cuda_is_one_line(capsys):
    from megatron_dyt.kernels import bench

    assert bench.main(["--shapes", "64x64"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "bench: needs a CUDA GPU; none is available here"
