"""Fused Triton DyT / Derf: forward, backward and residual-add + norm, as PyTorch custom ops.

One kernel family covers both norms, `y = γ·f(α·x + s) + β`: DyT is f = tanh (or an ablation:
hardtanh, sigmoid, identity) with no shift s, Derf is f = erf with a learnable scalar s.

- Forward: a 2-D grid of (rows × columns) tiles; each tile reads x once and writes y once (the
  residual variant reads x and r, writes h = x + r and y). Nothing else touches memory.
- Backward: reads x (or h) and dy once, writes dx; f(α·x) is recomputed, never stored. dγ, dβ,
  dα and ds are reduced deterministically in two stages: every program owns a fixed block of rows
  of a column tile and writes its fp32 partial sums; a second small kernel sums the partials in
  a fixed order and writes the gradients in the parameters' dtypes: fp32 until that one final
  rounding (fp16 parameters cannot hold a large dα, so the config refuses fp16 with DyT/Derf).
  The grid depends only on the shape and the GPU, so gradients are bit-identical run to run.
- Inputs bf16 / fp16 / fp32, math in fp32, outputs in the input dtype; parameters may be any
  float dtype and their gradients come back in it.

Registered with `torch.library.triton_op`, so `torch.compile` sees custom ops (no graph break)
and Inductor can schedule the kernels itself. Eager calls skip the custom-op dispatcher and run
the same launches under plain autograd Functions, which cost the host less
(`python -m megatron_dyt.kernels.bench_host`). There are no host syncs (α and s stay on
device), so CUDA graphs capture either path. With `TRITON_INTERPRET=1` set before this module
is imported, the same kernels run on CPU tensors through Triton's interpreter (slow; for tests).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Callable, Iterator

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op, wrap_triton
from triton.runtime.interpreter import InterpretedFunction

# ---- the squashing functions ---------------------------------------------------------------

SQUASH_CODES = {"tanh": 0, "hardtanh": 1, "sigmoid": 2, "identity": 3, "erf": 4}
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _probe():
    pass


INTERPRET: bool = isinstance(_probe, InterpretedFunction)
"""True when the kernels were decorated under TRITON_INTERPRET=1: they then take CPU tensors."""

# The helpers below are jitted functions on a GPU. Under the interpreter they stay plain Python,
# called from inside the (interpreted) kernels: every jitted call costs the interpreter a few
# milliseconds of re-patching triton.language, which made the kernels ~3× slower on CPU.
_helper = (lambda fn: fn) if INTERPRET else triton.jit


@_helper
def _tanh_from_exp(z):
    # libdevice's tanh is not available to the interpreter, so there tanh is built from exp: an odd
    # Taylor polynomial below |z| = 0.4 (where 1 - 2/(e^2|z| + 1) would lose digits to
    # cancellation; the first omitted term is < 1e-8 relative there), the exp form above it.
    # |z| is capped at 15, where tanh is 1 in fp32 already, so exp never overflows.
    a = tl.minimum(tl.abs(z), 15.0)
    big = 1.0 - 2.0 / (tl.exp(2.0 * a) + 1.0)
    zs = tl.minimum(tl.maximum(z, -0.4), 0.4)  # the polynomial's branch only; no overflow
    z2 = zs * zs
    p = 0.0035921280365724810 * z2 - 0.0088632355299021966
    p = p * z2 + 0.021869488536155203
    p = p * z2 - 0.053968253968253968
    p = p * z2 + 0.13333333333333333
    p = p * z2 - 0.33333333333333333
    small = zs + zs * z2 * p
    return tl.where(a < 0.4, small, tl.where(z < 0.0, -big, big))


if INTERPRET:
    _tanh = _tanh_from_exp
else:
    from triton.language.extra import libdevice

    @triton.jit
    def _tanh(z):
        # On a GPU, libdevice's tanh: as accurate, and far fewer instructions than the exp
        # form (no IEEE division), which matters when bf16 traffic runs at 4 TB/s.
        return libdevice.tanh(z)


@_helper
def _squash(z, ACT: tl.constexpr):
    if ACT == 0:
        f = _tanh(z)
    elif ACT == 1:
        f = tl.minimum(tl.maximum(z, -1.0), 1.0)
    elif ACT == 2:
        f = 1.0 / (1.0 + tl.exp(-tl.maximum(z, -88.0)))  # capped: exp(88) is finite in fp32
    elif ACT == 3:
        f = z
    else:
        f = tl.erf(z)
    return f


@_helper
def _squash_grad(z, f, ACT: tl.constexpr):
    """f'(z), from z and the already computed f(z)."""
    if ACT == 0:
        d = 1.0 - f * f
    elif ACT == 1:
        d = tl.where((z > -1.0) & (z < 1.0), 1.0, 0.0)  # torch's hardtanh: 0 at the corners
    elif ACT == 2:
        d = f * (1.0 - f)
    elif ACT == 3:
        d = tl.full(z.shape, 1.0, tl.float32)
    else:
        d = 1.1283791670955126 * tl.exp(-z * z)  # 2/√π·e^(-z²)
    return d


@_helper
def _cast(y, DTYPE: tl.constexpr, EXACT_BF16: tl.constexpr):
    """fp32 → the output dtype, rounding to nearest even as GPUs do.

    Triton's interpreter truncates fp32 → bf16 casts; with EXACT_BF16 (set only when
    interpreting) the value is first rounded in fp32 bits, so CPU tests see GPU rounding.
    """
    if EXACT_BF16:
        bits = y.to(tl.uint32, bitcast=True)
        bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
        y = bits.to(tl.float32, bitcast=True)
    return y.to(DTYPE)


# ---- kernels --------------------------------------------------------------------------------


@_helper
def _forward_values(
    X,
    R,
    H,
    Y,
    ALPHA,
    SHIFT,
    W,
    B,
    offs,
    mask,
    cols,
    col_mask,
    ACT: tl.constexpr,
    HAS_SHIFT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    EXACT_BF16: tl.constexpr,
):
    """y = γ·f(α·x + s) + β (and h = x + r first) for the elements at `offs`; `cols` are their
    columns, shaped to broadcast against `offs` (a row of a 2-D tile, or one per element)."""
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        # h is rounded to the activation dtype before the norm sees it, exactly as `x + r` then
        # DyT(h) would do in PyTorch.
        h = _cast(
            x + tl.load(R + offs, mask=mask, other=0.0).to(tl.float32),
            H.dtype.element_ty,
            EXACT_BF16,
        )
        tl.store(H + offs, h, mask=mask)
        x = h.to(tl.float32)
    z = tl.load(ALPHA).to(tl.float32) * x
    if HAS_SHIFT:
        z = z + tl.load(SHIFT).to(tl.float32)
    y = _squash(z, ACT) * tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        y = y + tl.load(B + cols, mask=col_mask, other=0.0).to(tl.float32)
    tl.store(Y + offs, _cast(y, Y.dtype.element_ty, EXACT_BF16), mask=mask)


@triton.jit
def _fwd_kernel(
    X,
    R,
    H,
    Y,
    ALPHA,
    SHIFT,
    W,
    B,
    M,
    N,
    ACT: tl.constexpr,
    HAS_SHIFT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    EXACT_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """One (BLOCK_M × BLOCK_N) tile: y = γ·f(α·x + s) + β, or h = x + r first (then y of h)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    mask = (rows < M)[:, None] & col_ok[None, :]
    offs = rows.to(tl.int64)[:, None] * N + cols[None, :]
    _forward_values(
        X, R, H, Y, ALPHA, SHIFT, W, B, offs, mask, cols[None, :], col_ok[None, :],
        ACT, HAS_SHIFT, HAS_BIAS, HAS_RESIDUAL, EXACT_BF16,
    )  # fmt: skip


@triton.jit
def _fwd_flat_kernel(
    X,
    R,
    H,
    Y,
    ALPHA,
    SHIFT,
    W,
    B,
    TOTAL,
    N,
    ACT: tl.constexpr,
    HAS_SHIFT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    EXACT_BF16: tl.constexpr,
    WIDE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """The forward over the flattened tensor: BLOCK contiguous elements per program, γ and β
    gathered by column (they stay in L1/L2). Long contiguous runs per program, no 2-D tiling."""
    # 32-bit offsets while the last program's end stays below 2³¹ (a wrapped offset would pass
    # the mask): the column gather's `offs % N` in 64 bits made the kernel ~50% longer (1592 vs
    # 1084 PTX instructions for bf16 DyT on sm_90). The tiled kernels gain nothing from it.
    if WIDE:
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    else:
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < TOTAL
    _forward_values(
        X, R, H, Y, ALPHA, SHIFT, W, B, offs, mask, offs % N, mask,
        ACT, HAS_SHIFT, HAS_BIAS, HAS_RESIDUAL, EXACT_BF16,
    )  # fmt: skip


@triton.jit
def _bwd_kernel(
    DY,
    X,
    DH,
    DX,
    ALPHA,
    SHIFT,
    W,
    PART_W,
    PART_B,
    PART_AS,
    M,
    N,
    ROWS_PER_PROGRAM,
    ACT: tl.constexpr,
    HAS_SHIFT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_DH: tl.constexpr,
    EXACT_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    STAGES: tl.constexpr,
):
    """dx for ROWS_PER_PROGRAM rows of one column tile, and this program's partial sums.

    g = dy·γ·f'(z) is dL/dz; dx = α·g (+ dh, the residual stream's own gradient), and the
    partials are Σdy·f(z) (dγ), Σdy (dβ), Σg·x (dα), Σg (ds). dγ and dβ accumulate
    element-wise over the row loop and are reduced over the tile's rows once at the end; dα and
    ds are summed over each row step's columns as they go (one register per row, not a tile).
    Every sum has a fixed order.
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    alpha = tl.load(ALPHA).to(tl.float32)
    if HAS_SHIFT:
        shift = tl.load(SHIFT).to(tl.float32)
    acc_w = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_b = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_a = tl.zeros((BLOCK_M,), dtype=tl.float32)  # per row of the tile: few registers
    acc_s = tl.zeros((BLOCK_M,), dtype=tl.float32)
    first_row = pid_m * ROWS_PER_PROGRAM
    # STAGES > 1 software-pipelines the row loop (the next steps' loads are issued before this
    # step's math); None leaves it to the compiler.
    for start in tl.range(0, ROWS_PER_PROGRAM, BLOCK_M, num_stages=STAGES):
        rows = first_row + start + tl.arange(0, BLOCK_M)
        mask = (rows < M)[:, None] & col_ok[None, :]
        offs = rows.to(tl.int64)[:, None] * N + cols[None, :]
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
        z = alpha * x
        if HAS_SHIFT:
            z = z + shift
        f = _squash(z, ACT)
        g = dy * w[None, :] * _squash_grad(z, f, ACT)
        dx = g * alpha
        if HAS_DH:
            dx = dx + tl.load(DH + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + offs, _cast(dx, DX.dtype.element_ty, EXACT_BF16), mask=mask)
        acc_w += dy * f  # masked lanes have dy = 0, so they add nothing anywhere
        if HAS_BIAS:
            acc_b += dy
        acc_a += tl.sum(g * x, axis=1)
        acc_s += tl.sum(g, axis=1)
    tl.store(PART_W + pid_m * N + cols, tl.sum(acc_w, axis=0), mask=col_ok)
    if HAS_BIAS:
        tl.store(PART_B + pid_m * N + cols, tl.sum(acc_b, axis=0), mask=col_ok)
    slot = (pid_m * tl.num_programs(1) + pid_n) * 2
    tl.store(PART_AS + slot, tl.sum(acc_a, axis=0))
    tl.store(PART_AS + slot + 1, tl.sum(acc_s, axis=0))


@triton.jit
def _finish_kernel(
    PART_W,
    PART_B,
    PART_AS,
    DW,
    DB,
    DA,
    DS,
    ROWS,
    N,
    SLOTS,
    HAS_SHIFT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    EXACT_W: tl.constexpr,
    EXACT_B: tl.constexpr,
    EXACT_A: tl.constexpr,
    EXACT_S: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    """Second stage of the reductions, in one launch: dγ (and dβ) = the column sums of the
    partials over the row programs, in a fixed order; program 0 also sums the dα / ds partials.
    Results are written in the parameters' dtypes."""
    pid = tl.program_id(0)
    cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    acc_w = tl.zeros((BLOCK_N,), dtype=tl.float32)
    acc_b = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for r in range(0, ROWS):
        acc_w += tl.load(PART_W + r * N + cols, mask=col_ok, other=0.0)
        if HAS_BIAS:
            acc_b += tl.load(PART_B + r * N + cols, mask=col_ok, other=0.0)
    tl.store(DW + cols, _cast(acc_w, DW.dtype.element_ty, EXACT_W), mask=col_ok)
    if HAS_BIAS:
        tl.store(DB + cols, _cast(acc_b, DB.dtype.element_ty, EXACT_B), mask=col_ok)
    if pid == 0:
        acc_a = tl.zeros((BLOCK_S,), dtype=tl.float32)
        acc_s = tl.zeros((BLOCK_S,), dtype=tl.float32)
        for start in range(0, SLOTS, BLOCK_S):
            slot = start + tl.arange(0, BLOCK_S)
            ok = slot < SLOTS
            acc_a += tl.load(PART_AS + slot * 2, mask=ok, other=0.0)
            acc_s += tl.load(PART_AS + slot * 2 + 1, mask=ok, other=0.0)
        tl.store(DA, _cast(tl.sum(acc_a, axis=0), DA.dtype.element_ty, EXACT_A))
        if HAS_SHIFT:
            tl.store(DS, _cast(tl.sum(acc_s, axis=0), DS.dtype.element_ty, EXACT_S))


# ---- launch configuration -------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Tuning:
    """Block sizes, warps and grid shape. The CUDA defaults are what `python -m
    megatron_dyt.kernels.bench --tune` chose on an H200 (best geometric mean over DyT, Derf and
    residual DyT at 16384×4096 and 32768×8192; benchmarks/results/kernels-h200.json).

    The backward grid (and so the reduction order) depends only on these, the shape and the
    GPU's SM count, never on timing: no autotuning, so gradients stay bit-identical.
    """

    fwd_tile: int = 4096  # elements per forward program (BLOCK_M·BLOCK_N): 32 per thread
    fwd_flat: int = 0  # 1: the flattened forward kernel (fwd_tile elements per program)
    fwd_max_block_n: int = 2048
    fwd_warps: int = 8
    bwd_tile: int = 2048  # elements per backward loop step: 16 per thread
    bwd_max_block_n: int = 256  # narrow column tiles: parallelism without bigger partials
    bwd_warps: int = 8
    bwd_programs_per_sm: int = 8
    bwd_min_rows: int = 64  # rows per program at least, so the partials stay ~2% of traffic
    bwd_stages: int = 3  # software-pipelining depth of the backward's row loop; 0: compiler's
    sm_count: int = 0  # 0: ask the GPU
    finish_block_n: int = 1024  # columns per program of the second reduction stage


# The interpreter pays per program and per jit-function call, not per element: big tiles.
_TUNING = {
    "cuda": Tuning(),
    "cpu": Tuning(
        fwd_tile=16384,
        fwd_max_block_n=4096,
        bwd_tile=16384,
        bwd_max_block_n=4096,
        bwd_programs_per_sm=1,
        sm_count=2,
    ),
}


@contextlib.contextmanager
def tuning(**changes: int) -> Iterator[None]:
    """Temporarily change the launch configuration on every device (tests: force column tiles
    and many programs on small shapes; benchmarks: try other blocks)."""
    previous = dict(_TUNING)
    _TUNING.update({k: dataclasses.replace(v, **changes) for k, v in previous.items()})
    try:
        yield
    finally:
        _TUNING.update(previous)


def _tuning_for(device: torch.device) -> Tuning:
    return _TUNING["cuda" if device.type == "cuda" else "cpu"]


# Host-side arithmetic in plain Python: `triton.cdiv` and `triton.next_power_of_2` are jitted
# functions whose every call costs microseconds, and a launch is on the eager critical path.
def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _fwd_config(n: int, device: torch.device) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps): several rows per program when the hidden size is small."""
    t = _tuning_for(device)
    block_n = min(_pow2(n), t.fwd_max_block_n)
    block_m = max(1, t.fwd_tile // block_n)
    return block_m, block_n, t.fwd_warps


def _bwd_config(m: int, n: int, device: torch.device) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, rows per program, row programs, num_warps) for the backward grid.

    Column tiles × row programs fill the GPU about `bwd_programs_per_sm` times; each program
    loops over at least `bwd_min_rows` rows (hidden 32768: 128 column tiles of 256, each looping
    over its rows), so the fp32 partials (row programs × hidden) stay small next to x, dy, dx.
    """
    t = _tuning_for(device)
    sms = t.sm_count or _sm_count(device.index if device.index is not None else 0)
    if isinstance(m, int) and isinstance(n, int):
        return _bwd_grid(m, n, t, sms)
    # torch.compile with dynamic shapes traces with symbolic sizes, which cannot be hashed
    return _bwd_grid.__wrapped__(m, n, t, sms)


@functools.lru_cache(maxsize=256)
def _bwd_grid(m: int, n: int, t: Tuning, sms: int) -> tuple[int, int, int, int, int]:
    block_n = min(_pow2(n), t.bwd_max_block_n)
    block_m = max(1, t.bwd_tile // block_n)
    col_blocks = _cdiv(n, block_n)
    wanted = _cdiv(t.bwd_programs_per_sm * sms, col_blocks)
    row_programs = max(1, min(wanted, _cdiv(m, max(t.bwd_min_rows, block_m))))
    rows_per_program = max(1, _cdiv(_cdiv(m, row_programs), block_m)) * block_m
    row_programs = _cdiv(m, rows_per_program)
    return block_m, block_n, rows_per_program, row_programs, t.bwd_warps


def _exact_bf16(x: Tensor) -> bool:
    return INTERPRET and x.dtype == torch.bfloat16


def _dtype(t: Tensor | None, default: Tensor) -> torch.dtype:
    return default.dtype if t is None else t.dtype


def _rows(x: Tensor) -> Tensor:
    return x.contiguous().view(-1, x.shape[-1])


# ---- launches -------------------------------------------------------------------------------
#
# The launch functions take `wrap`: `wrap_triton` inside the custom ops (so torch.compile traces
# the kernels), the identity on the eager path (a plain launch, no tracing machinery).

Wrap = Callable[[triton.JITFunction], object]


def _plain(kernel: triton.JITFunction) -> triton.JITFunction:
    return kernel


def _forward(
    x: Tensor,
    r: Tensor | None,
    alpha: Tensor,
    shift: Tensor | None,
    weight: Tensor,
    bias: Tensor | None,
    act: int,
    wrap: Wrap,
) -> tuple[Tensor | None, Tensor]:
    """(h, y): y = γ·f(α·h + s) + β with h = x + r (h is None without a residual)."""
    x2 = _rows(x)
    r2 = None if r is None else _rows(r)
    h = None if r is None else torch.empty_like(x2)
    y = torch.empty_like(x2)
    m, n = x2.shape
    if m > 0:
        t = _tuning_for(x2.device)
        common = dict(
            ACT=act,
            HAS_SHIFT=shift is not None,
            HAS_BIAS=bias is not None,
            HAS_RESIDUAL=r2 is not None,
            EXACT_BF16=_exact_bf16(x2),
            num_warps=t.fwd_warps,
        )
        # Unused pointers get stand-ins that are read-only inputs of the same dtype.
        args = (
            x2,
            x2 if r2 is None else r2,
            x2 if h is None else h,
            y,
            alpha,
            alpha if shift is None else shift,
            weight,
            weight if bias is None else bias,
        )
        if t.fwd_flat:
            grid = (_cdiv(m * n, t.fwd_tile),)
            wrap(_fwd_flat_kernel)[grid](
                *args, m * n, n, WIDE=m * n + t.fwd_tile >= 2**31, BLOCK=t.fwd_tile, **common
            )
        else:
            block_m, block_n, _ = _fwd_config(n, x2.device)
            grid = (_cdiv(m, block_m), _cdiv(n, block_n))
            wrap(_fwd_kernel)[grid](*args, m, n, BLOCK_M=block_m, BLOCK_N=block_n, **common)
    return (None if h is None else h.view(x.shape)), y.view(x.shape)


def _backward(
    dy: Tensor,
    x: Tensor,
    alpha: Tensor,
    shift: Tensor | None,
    weight: Tensor,
    bias: Tensor | None,
    dh: Tensor | None,
    act: int,
    wrap: Wrap,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dx [+ dh], dα, ds, dγ, dβ), each parameter gradient in its parameter's dtype; ds is
    empty without a shift and dβ without a bias (`bias` is passed only for its dtype)."""
    x2, dy2 = _rows(x), _rows(dy)
    dh2 = None if dh is None else _rows(dh)
    m, n = x2.shape
    dx = torch.empty_like(x2)
    block_m, block_n, rows_per_program, row_programs, warps = _bwd_config(m, n, x.device)
    col_blocks = _cdiv(n, block_n)
    f32 = {"device": x.device, "dtype": torch.float32}
    has_bias = bias is not None
    part_w = torch.empty((row_programs, n), **f32)
    part_b = torch.empty((row_programs if has_bias else 0, n), **f32)
    part_as = torch.empty((row_programs * col_blocks, 2), **f32)
    dalpha = torch.empty_like(alpha)
    dshift = torch.empty(0 if shift is None else 1, device=x.device, dtype=_dtype(shift, alpha))
    dweight = torch.empty_like(weight)
    dbias = torch.empty(0 if bias is None else n, device=x.device, dtype=_dtype(bias, weight))
    if m == 0:
        return dx.view(x.shape), dalpha.zero_(), dshift.zero_(), dweight.zero_(), dbias.zero_()
    wrap(_bwd_kernel)[(row_programs, col_blocks)](
        dy2,
        x2,
        x2 if dh2 is None else dh2,  # unused stand-ins are always read-only inputs
        dx,
        alpha,
        alpha if shift is None else shift,
        weight,
        part_w,
        weight if part_b.numel() == 0 else part_b,
        part_as,
        m,
        n,
        rows_per_program,
        ACT=act,
        HAS_SHIFT=shift is not None,
        HAS_BIAS=has_bias,
        HAS_DH=dh2 is not None,
        EXACT_BF16=_exact_bf16(x),
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        STAGES=_tuning_for(x.device).bwd_stages or None,
        num_warps=warps,
    )
    finish_n = min(_pow2(n), _tuning_for(x.device).finish_block_n)
    wrap(_finish_kernel)[(_cdiv(n, finish_n),)](
        part_w,
        part_w if part_b.numel() == 0 else part_b,
        part_as,
        dweight,
        dweight if dbias.numel() == 0 else dbias,
        dalpha,
        dalpha if dshift.numel() == 0 else dshift,
        row_programs,
        n,
        row_programs * col_blocks,
        HAS_SHIFT=shift is not None,
        HAS_BIAS=has_bias,
        EXACT_W=_exact_bf16(dweight),
        EXACT_B=_exact_bf16(dbias),
        EXACT_A=_exact_bf16(dalpha),
        EXACT_S=_exact_bf16(dshift),
        BLOCK_N=finish_n,
        BLOCK_S=256,
    )
    return dx.view(x.shape), dalpha, dshift, dweight, dbias


def _param_grads(ctx, dy: Tensor | None, dh: Tensor | None, backward) -> tuple:
    """(dL/d norm input [+ dh], dα, ds, dγ, dβ) from the saved tensors; None for the absent."""
    x, alpha, shift, weight, bias = ctx.saved_tensors  # unpacked once: checkpointing insists
    if dy is None:
        dy = torch.zeros_like(x)
    dx, da, ds, dw, db = backward(dy, x, alpha, shift, weight, bias, dh, ctx.act)
    return dx, da, None if shift is None else ds, dw, None if bias is None else db


# ---- eager autograd -------------------------------------------------------------------------
#
# Outside torch.compile the kernels run under plain autograd Functions. A custom op's dispatch
# (schema, autograd wrapper, redispatch, dynamo's disable wrapper) made an eager forward +
# backward cost 140-180 µs more host time on the CI machine (bench_host): more than the GPU needs
# for the whole DyT forward at 16384 × 4096, paid at every norm of every layer.


def _no_double_backward() -> None:
    # Grad mode is on inside a backward only with create_graph=True: the caller wants the
    # gradient to be differentiable, and the kernels' is not (it would silently act as a constant).
    if torch.is_grad_enabled():
        raise RuntimeError(
            "the DyT/Derf Triton kernels have no second derivative (create_graph=True);"
            " use the norm's backend: torch for double backward"
        )


def _eager_backward(dy, x, alpha, shift, weight, bias, dh, act):
    return _backward(dy, x, alpha, shift, weight, bias, dh, act, _plain)


class _DyTFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, alpha, shift, weight, bias, act):
        _, y = _forward(x, None, alpha, shift, weight, bias, act, _plain)
        ctx.save_for_backward(x, alpha, shift, weight, bias)
        ctx.act = act
        return y

    @staticmethod
    def backward(ctx, dy):
        _no_double_backward()
        return *_param_grads(ctx, dy, None, _eager_backward), None


class _ResidualDyTFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, r, alpha, shift, weight, bias, act):
        h, y = _forward(x, r, alpha, shift, weight, bias, act, _plain)
        ctx.save_for_backward(h, alpha, shift, weight, bias)  # only h is kept for backward
        ctx.act = act
        ctx.set_materialize_grads(False)  # an unused h: no zero dh to read
        return h, y

    @staticmethod
    def backward(ctx, dh, dy):
        _no_double_backward()
        dx, *params = _param_grads(ctx, dy, dh, _eager_backward)  # dL/dh: residual's + norm's
        return dx, dx, *params, None


# ---- custom ops (what torch.compile sees) ---------------------------------------------------
#
# On a GPU these are `triton_op`s: their fake implementations (what torch.compile traces with)
# are the functions themselves, whose launches `wrap_triton` records, so Inductor sees the
# kernels. Triton's interpreter cannot do that: `wrap_triton` hands its kernels back as they
# are, and they read every tensor's data, which fake tensors have none of. So under
# TRITON_INTERPRET=1 they are plain custom ops whose fake implementations allocate the outputs
# and launch nothing; the compiled graph calls them as opaque ops, which run the interpreter on
# real tensors. Either way `fullgraph=True` traces a block that calls them.


class _NoLaunch:
    """`kernel[grid](...)` that does nothing: shapes and dtypes only."""

    def __getitem__(self, grid) -> Callable[..., None]:
        return lambda *args, **kwargs: None


def _no_launch(kernel: triton.JITFunction) -> _NoLaunch:
    return _NoLaunch()


def _kernel_op(name: str) -> Callable:
    if not INTERPRET:
        return triton_op(name, mutates_args=())
    return torch.library.custom_op(name, mutates_args=())


@_kernel_op("megatron_dyt::dyt")
def _dyt(
    x: Tensor,
    alpha: Tensor,
    shift: Tensor | None,
    weight: Tensor,
    bias: Tensor | None,
    act: int,
) -> Tensor:
    return _forward(x, None, alpha, shift, weight, bias, act, wrap_triton)[1]


@_kernel_op("megatron_dyt::residual_dyt")
def _residual_dyt(
    x: Tensor,
    r: Tensor,
    alpha: Tensor,
    shift: Tensor | None,
    weight: Tensor,
    bias: Tensor | None,
    act: int,
) -> tuple[Tensor, Tensor]:
    return _forward(x, r, alpha, shift, weight, bias, act, wrap_triton)


@_kernel_op("megatron_dyt::dyt_backward")
def _dyt_backward(
    dy: Tensor,
    x: Tensor,
    alpha: Tensor,
    shift: Tensor | None,
    weight: Tensor,
    bias: Tensor | None,
    dh: Tensor | None,
    act: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _backward(dy, x, alpha, shift, weight, bias, dh, act, wrap_triton)


def _dyt_setup_context(ctx, inputs, output) -> None:
    x, alpha, shift, weight, bias, act = inputs
    ctx.save_for_backward(x, alpha, shift, weight, bias)
    ctx.act = act


def _dyt_autograd(ctx, dy: Tensor):
    return *_param_grads(ctx, dy, None, _dyt_backward), None


def _residual_setup_context(ctx, inputs, output) -> None:
    _, _, alpha, shift, weight, bias, act = inputs
    ctx.save_for_backward(output[0], alpha, shift, weight, bias)  # only h is kept for backward
    ctx.act = act


def _residual_autograd(ctx, dh: Tensor | None, dy: Tensor | None):
    dx, *params = _param_grads(ctx, dy, dh, _dyt_backward)
    return dx, dx, *params, None


_dyt.register_autograd(_dyt_autograd, setup_context=_dyt_setup_context)
_residual_dyt.register_autograd(_residual_autograd, setup_context=_residual_setup_context)

if INTERPRET:

    @_dyt.register_fake
    def _dyt_fake(x, alpha, shift, weight, bias, act):
        return _forward(x, None, alpha, shift, weight, bias, act, _no_launch)[1]

    @_residual_dyt.register_fake
    def _residual_dyt_fake(x, r, alpha, shift, weight, bias, act):
        return _forward(x, r, alpha, shift, weight, bias, act, _no_launch)

    @_dyt_backward.register_fake
    def _dyt_backward_fake(dy, x, alpha, shift, weight, bias, dh, act):
        return _backward(dy, x, alpha, shift, weight, bias, dh, act, _no_launch)


def _apply_dyt(x, alpha, shift, weight, bias, act: int) -> Tensor:
    if torch.compiler.is_compiling():
        return _dyt(x, alpha, shift, weight, bias, act)
    return _DyTFunction.apply(x, alpha, shift, weight, bias, act)


def _apply_residual_dyt(x, r, alpha, shift, weight, bias, act: int) -> tuple[Tensor, Tensor]:
    if torch.compiler.is_compiling():
        return _residual_dyt(x, r, alpha, shift, weight, bias, act)
    return _ResidualDyTFunction.apply(x, r, alpha, shift, weight, bias, act)


# ---- public functions -----------------------------------------------------------------------


def _check(
    x: Tensor,
    alpha: Tensor,
    weight: Tensor,
    shift: Tensor | None,
    bias: Tensor | None,
    r: Tensor | None = None,
) -> None:
    """Clear errors before a kernel sees the tensors."""
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"DyT/Derf kernels take float32, bfloat16 or float16 inputs, not {x.dtype}")
    if x.dim() == 0 or x.shape[-1] != weight.numel():
        raise ValueError(
            f"input's last dimension {tuple(x.shape)[-1:]} must equal the weight's size"
            f" {weight.numel()}"
        )
    for name, t in (("alpha", alpha), ("shift", shift)):
        if t is not None and t.numel() != 1:
            raise ValueError(f"{name} must hold one value, got shape {tuple(t.shape)}")
    if bias is not None and bias.numel() != weight.numel():
        raise ValueError(f"bias has {bias.numel()} values, the weight {weight.numel()}")
    for t in (alpha, weight, shift, bias, r):
        if t is not None and t.device != x.device:
            raise ValueError(f"all tensors must be on {x.device}, got one on {t.device}")


def _vectors(weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """γ and β as the kernels index them: contiguous (a no-op for parameters)."""
    return weight.contiguous(), None if bias is None else bias.contiguous()


def dyt(
    x: Tensor, alpha: Tensor, weight: Tensor, bias: Tensor | None = None, squash: str = "tanh"
) -> Tensor:
    """`weight·f(alpha·x) + bias` over the last dimension of x, f = tanh unless ablated."""
    _check(x, alpha, weight, None, bias)
    return _apply_dyt(x, alpha, None, *_vectors(weight, bias), SQUASH_CODES[squash])


def derf(
    x: Tensor, alpha: Tensor, shift: Tensor, weight: Tensor, bias: Tensor | None = None
) -> Tensor:
    """`weight·erf(alpha·x + shift) + bias` over the last dimension of x."""
    _check(x, alpha, weight, shift, bias)
    return _apply_dyt(x, alpha, shift, *_vectors(weight, bias), SQUASH_CODES["erf"])


def _check_residual(x: Tensor, r: Tensor) -> None:
    if r.shape != x.shape or r.dtype != x.dtype:
        raise ValueError(
            f"residual must match the input: got {tuple(r.shape)} {r.dtype}"
            f" and {tuple(x.shape)} {x.dtype}"
        )


def residual_dyt(
    x: Tensor,
    r: Tensor,
    alpha: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    squash: str = "tanh",
) -> tuple[Tensor, Tensor]:
    """`h = x + r` and `dyt(h)` in one pass: returns (h, y)."""
    _check(x, alpha, weight, None, bias, r)
    _check_residual(x, r)
    return _apply_residual_dyt(x, r, alpha, None, *_vectors(weight, bias), SQUASH_CODES[squash])


def residual_derf(
    x: Tensor,
    r: Tensor,
    alpha: Tensor,
    shift: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """`h = x + r` and `derf(h)` in one pass: returns (h, y)."""
    _check(x, alpha, weight, shift, bias, r)
    _check_residual(x, r)
    return _apply_residual_dyt(x, r, alpha, shift, *_vectors(weight, bias), SQUASH_CODES["erf"])
