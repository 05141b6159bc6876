"""Host-side cost of calling the DyT kernels eagerly: what a step pays before any GPU work.

    python -m megatron_dyt.kernels.bench_host [--calls 2000] [--json PATH]

At small and middle shapes an eager forward + backward is bound by the host, not the GPU
(benchmarks/README.md), so this times the Python side alone: the kernel launches are replaced by
no-ops and the tensors are tiny CPU tensors, so no GPU is needed and the figures do not depend
on one. It compares the two ways into the kernels, the plain autograd Functions used eagerly and
the `torch.library` custom ops used under torch.compile, against `F.rms_norm` (C++ autograd,
real math on a 16 × 64 tensor) as the reference measured in the same run.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F

from megatron_dyt.arguments import positive_int
from megatron_dyt.kernels.bench import write_json

KERNELS = ("_fwd_kernel", "_fwd_flat_kernel", "_bwd_kernel", "_finish_kernel")


class _NoLaunch:
    """Stands in for a Triton kernel: `kernel[grid](...)` does nothing."""

    def __getitem__(self, grid) -> Callable:
        return lambda *args, **kwargs: None


@contextlib.contextmanager
def _launches_stubbed(ops) -> Iterator[None]:
    saved = {name: getattr(ops, name) for name in (*KERNELS, "wrap_triton")}
    for name in KERNELS:
        setattr(ops, name, _NoLaunch())
    ops.wrap_triton = lambda kernel: kernel
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(ops, name, value)


def _time_us(fn: Callable[[], object], calls: int) -> float:
    for _ in range(max(10, calls // 10)):
        fn()
    best = float("inf")
    for _ in range(3):  # best of three: the least disturbed by other work on the machine
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls)
    return best * 1e6


def run(calls: int = 2000) -> dict:
    from megatron_dyt.kernels import ops

    x = torch.randn(16, 64, requires_grad=True)
    alpha = torch.tensor([0.5], requires_grad=True)
    weight = torch.ones(64, requires_grad=True)
    dy = torch.randn(16, 64)

    def eager(*args):
        return ops.dyt(*args)

    def custom_op(*args):
        return ops._dyt(args[0], args[1], None, args[2], None, ops.SQUASH_CODES["tanh"])

    def rms_norm(*args):
        return F.rms_norm(args[0], (64,), args[2], 1e-5)

    def fwd(f):
        def step():
            with torch.no_grad():
                f(x, alpha, weight)

        return step

    def fwd_bwd(f):
        def step():
            x.grad = None
            f(x, alpha, weight).backward(dy)

        return step

    rows = []
    with _launches_stubbed(ops):
        for name, f in (("rms_norm", rms_norm), ("custom_op", custom_op), ("eager", eager)):
            for pass_, make in (("fwd", fwd), ("fwd+bwd", fwd_bwd)):
                rows.append({"path": name, "pass": pass_, "us": _time_us(make(f), calls)})
    for row in rows:
        ref = next(r for r in rows if r["path"] == "rms_norm" and r["pass"] == row["pass"])
        row["ratio_to_rms_norm"] = row["us"] / ref["us"]
    return {"device": _cpu_name(), "torch": torch.__version__, "calls": calls, "rows": rows}


def _cpu_name() -> str:
    """The host CPU, which is what this benchmark measures."""
    try:
        with open("/proc/cpuinfo") as fh:
            model = next(line.split(":", 1)[1].strip() for line in fh if "model name" in line)
    except (OSError, StopIteration):
        model = platform.processor() or platform.machine()
    return f"{model}, {os.cpu_count()} CPUs"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m megatron_dyt.kernels.bench_host", description=__doc__
    )
    parser.add_argument(
        "--calls", type=positive_int, default=2000, help="calls per timing (best of 3)"
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    result = run(args.calls)
    print(f"{'path':<10} {'pass':<8} {'host µs':>9} {'× rms_norm':>11}")
    for r in result["rows"]:
        print(f"{r['path']:<10} {r['pass']:<8} {r['us']:>9.1f} {r['ratio_to_rms_norm']:>10.2f}×")
    if args.json:
        write_json(args.json, result)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
