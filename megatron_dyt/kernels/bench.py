"""Time DyT / Derf implementations on one GPU against the memory-bandwidth floor.

    python -m megatron_dyt.kernels.bench [--shapes 4096x4096,16384x4096] [--json PATH]
                                         [--tune [--tune-shapes ...] [--tune-budget SECONDS]]

For every op (dyt, derf, residual_dyt), shape (tokens × hidden, bf16) and pass (fwd, fwd+bwd)
it times the eager torch reference module, the same module under `torch.compile`, `F.rms_norm`
(what DyT replaces), Liger-Kernel's `LigerDyT` (DyT ops only, when importable) and ours, twice:
with `triton.testing.do_bench` (median; eager launches, host overhead included) and replayed
from a CUDA graph (median; the GPU's own time). The floor is the bytes the op must move divided
by the copy bandwidth measured in the same run (a device-to-device `copy_`, read + write bytes /
time); "% floor" is floor / time, so 100% means running at copy speed.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from megatron_dyt.arguments import positive_float

DEFAULT_SHAPES = "4096x4096,16384x4096,32768x8192"
OPS = ("dyt", "derf", "residual_dyt")
PASSES = ("fwd", "fwd+bwd")

# Tensors of tokens × hidden each pass must read or write at least (parameters are negligible).
# dyt/derf fwd: read x, write y; bwd: read x and dy, write dx. residual fwd: read x and r,
# write h and y; bwd: read h, dy and dh (the residual stream's gradient), write dx (= dr).
TENSORS_MOVED = {
    ("dyt", "fwd"): 2,
    ("dyt", "fwd+bwd"): 5,
    ("derf", "fwd"): 2,
    ("derf", "fwd+bwd"): 5,
    ("residual_dyt", "fwd"): 4,
    ("residual_dyt", "fwd+bwd"): 8,
}


@dataclass
class Row:
    op: str
    shape: list[int]
    pass_: str
    impl: str
    us: float
    floor_us: float
    graph_us: float | None = None  # GPU time from a CUDA-graph replay; None where not measured

    def to_json(self) -> dict:
        d = asdict(self)
        d["pass"] = d.pop("pass_")
        return d


def parse_shapes(text: str) -> list[tuple[int, int]]:
    shapes = []
    for part in text.split(","):
        try:
            tokens, hidden = (int(v) for v in part.lower().split("x"))
        except ValueError:
            raise SystemExit(
                f"bench: bad shape {part!r}; expected TOKENSxHIDDEN, e.g. 4096x4096"
            ) from None
        if tokens <= 0 or hidden <= 0:
            raise SystemExit(f"bench: bad shape {part!r}; sizes must be positive")
        shapes.append((tokens, hidden))
    return shapes


def copy_bandwidth(do_bench: Callable, device: str = "cuda", n: int = 256 * 1024 * 1024) -> float:
    """Bytes per second of a large device-to-device copy (read + write); 512 MiB each way."""
    src = torch.empty(n, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src))
    return 2 * src.numel() * src.element_size() / (ms * 1e-3)


def _liger(hidden: int) -> torch.nn.Module | None:
    try:
        from liger_kernel.transformers import LigerDyT
    except ImportError:
        return None
    try:  # newer releases take `beta`; LLaMA-DyT has none
        return LigerDyT(hidden, beta=False, init_alpha=0.5)
    except TypeError:
        return LigerDyT(hidden, init_alpha=0.5)


def implementations(
    op: str, hidden: int, device: str = "cuda", dtype: torch.dtype = torch.bfloat16
) -> dict[str, Callable]:
    """impl name → function of (x, r) returning the tensors whose gradients flow back.

    Parameters are in the activation dtype, as under DeepSpeed bf16 (and F.rms_norm only takes
    its fused path when input and weight dtypes match).
    """
    eager = _norm(op, hidden, "torch", device, dtype)
    torch._dynamo.reset()  # each compiled function starts from a clean cache (no recompile limit)
    compiled = torch.compile(eager)
    rms_weight = torch.ones(hidden, device=device, dtype=dtype, requires_grad=True)
    liger = _liger(hidden) if op in ("dyt", "residual_dyt") else None
    norms: dict[str, Callable] = {
        "eager": eager,
        "compile": compiled,
        "rms_norm": lambda h: F.rms_norm(h, (hidden,), rms_weight, 1e-5),
    }
    if liger is not None:
        norms["liger"] = liger.to(device, dtype)
    if op != "residual_dyt":
        impls = {name: _single(f) for name, f in norms.items()}
        impls["ours"] = ours(op, hidden, device, dtype)
        return impls
    impls = {name: _add_then(f) for name, f in norms.items()}
    impls["compile"] = torch.compile(_add_then(eager))  # the add is fused by Inductor too
    impls["ours"] = ours(op, hidden, device, dtype)
    return impls


def _norm(op: str, hidden: int, backend: str, device: str, dtype: torch.dtype) -> torch.nn.Module:
    from megatron_dyt.norms import Derf, DyT

    cls = Derf if op == "derf" else DyT
    return cls(hidden, 0.5, beta=False, backend=backend).to(device, dtype)


def ours(
    op: str, hidden: int, device: str = "cuda", dtype: torch.dtype = torch.bfloat16
) -> Callable:
    """Our kernels alone, called as `implementations` calls them (what `--tune` times)."""
    norm = _norm(op, hidden, "triton", device, dtype)
    return norm.forward_residual if op == "residual_dyt" else _single(norm)


def _single(norm: Callable) -> Callable:
    def fn(x: torch.Tensor, r: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (norm(x),)

    return fn


def _add_then(norm: Callable) -> Callable:
    def fn(x: torch.Tensor, r: torch.Tensor) -> tuple[torch.Tensor, ...]:
        h = x + r
        return h, norm(h)

    return fn


def time_impl(
    fn: Callable, x: torch.Tensor, r: torch.Tensor, pass_: str, do_bench: Callable
) -> float:
    """Median µs of one forward, or forward + backward to x, r and every parameter."""
    if pass_ == "fwd":

        def step():
            with torch.no_grad():
                fn(x, r)

    else:
        grads = None

        def step():
            nonlocal grads
            outs = fn(x, r)
            if grads is None:
                grads = [torch.randn_like(o) for o in outs]
            torch.autograd.backward(outs, grads)

    step()  # compile / autotune outside the timing
    return do_bench(step, grad_to_none=[x, r]) * 1e3


def _median_do_bench(fn: Callable, grad_to_none: list[torch.Tensor] | None = None) -> float:
    from triton.testing import do_bench

    return do_bench(fn, grad_to_none=grad_to_none, return_mode="median")


def cuda_graph_median(
    fn: Callable, grad_to_none: list[torch.Tensor] | None = None, reps: int = 100
) -> float:
    """Median ms of `fn` replayed from a CUDA graph, with L2 flushed before every replay.

    `do_bench` times what an eager caller waits for: when the host takes longer to launch the
    kernels than the GPU to run them (small shapes, Python autograd), it measures the host.
    A graph replay launches everything at once, so this is the GPU's own time, which is what
    the bandwidth floor is about and what a compiled or CUDA-graphed model sees."""

    def step():
        for t in grad_to_none or ():
            t.grad = None
        fn()

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up off the capture: allocator, autotuning, guards
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    flush = torch.empty(256 * 1024 * 1024, dtype=torch.int8, device="cuda")
    events = [
        (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
        for _ in range(reps)
    ]
    for start, end in events:
        flush.zero_()  # the GPU is busy with this while the host records and replays
        start.record()
        graph.replay()
        end.record()
    torch.cuda.synchronize()
    for t in grad_to_none or ():
        t.grad = None  # drop the graph's memory with the graph
    del graph
    return statistics.median(start.elapsed_time(end) for start, end in events)


def run(
    shapes: list[tuple[int, int]],
    ops: list[str],
    device: str = "cuda",
    do_bench: Callable = _median_do_bench,
    copy_elements: int = 256 * 1024 * 1024,
    graph_bench: Callable | None = cuda_graph_median,
    on_row: Callable[[dict], None] | None = None,
) -> dict:
    """Every (op, shape, pass, impl) timing, eager (`us`) and from a CUDA graph (`graph_us`);
    `device`, `do_bench`, `copy_elements` and `graph_bench` are parameters only so a CPU test
    can run this code path. `on_row` gets the results so far after every row (the script
    saves them, so a run stopped at its time limit keeps what it measured)."""
    bandwidth = copy_bandwidth(do_bench, device, copy_elements)
    rows: list[Row] = []

    def result() -> dict:
        return {
            "device": torch.cuda.get_device_name() if device == "cuda" else device,
            "copy_bandwidth_tbs": bandwidth / 1e12,
            "torch": torch.__version__,
            "triton": _triton_version(),
            "rows": [row.to_json() for row in rows],
        }

    for op in ops:
        for tokens, hidden in shapes:
            x = torch.randn(tokens, hidden, device=device, dtype=torch.bfloat16)
            r = torch.randn_like(x)
            x.requires_grad_(True)
            r.requires_grad_(True)
            impls = implementations(op, hidden, device)
            for pass_ in PASSES:
                moved = TENSORS_MOVED[(op, pass_)] * x.numel() * x.element_size()
                floor_us = moved / bandwidth * 1e6
                for impl, fn in impls.items():
                    us = time_impl(fn, x, r, pass_, do_bench)
                    graph_us = None
                    if graph_bench is not None:
                        try:
                            graph_us = time_impl(fn, x, r, pass_, graph_bench)
                        except Exception as exc:  # e.g. an implementation that syncs
                            print(f"{op} {impl} {pass_}: no CUDA-graph timing ({exc})")
                    rows.append(Row(op, [tokens, hidden], pass_, impl, us, floor_us, graph_us))
                    print(_format_row(rows[-1]), flush=True)
                    if on_row is not None:
                        on_row(result())
            del x, r, impls
            if device == "cuda":
                torch.cuda.empty_cache()
    return result()


# --tune: launch configurations of ours to try (forward knobs for fwd, backward knobs for fwd+bwd).
FWD_GRID = [
    dict(fwd_flat=0, fwd_tile=tile, fwd_max_block_n=bn, fwd_warps=w)
    for tile in (2048, 4096, 8192)
    for bn in (512, 1024, 2048)
    for w in (4, 8)
    if bn <= tile
] + [
    dict(fwd_flat=1, fwd_tile=tile, fwd_warps=w)
    for tile in (1024, 2048, 4096, 8192)
    for w in (4, 8)
]
BWD_GRID = [
    dict(bwd_tile=tile, bwd_max_block_n=bn, bwd_warps=w, bwd_programs_per_sm=8, bwd_stages=st)
    for tile in (2048, 4096)
    for bn in (256, 512, 1024, 2048)
    for w in (4, 8)
    for st in (0, 3)
] + [  # whole rows of up to 8192 per step, one row at a time (what Liger's DyT does)
    dict(bwd_tile=8192, bwd_max_block_n=8192, bwd_warps=w, bwd_programs_per_sm=p, bwd_stages=st)
    for w in (8, 16)
    for p in (1, 2)
    for st in (0, 3)
]


def tune(
    shapes: list[tuple[int, int]],
    ops: list[str],
    device: str = "cuda",
    do_bench: Callable | None = None,
    budget_s: float | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> list[dict]:
    """Time ours under the configurations of the grids; returns the cases, each with its
    timings best first.

    Timed from CUDA graphs: the launch configuration changes the GPU's time, not the host's,
    and at the smaller shapes eager timings would only measure the host. Each configuration is
    timed on every case before the next one starts, so when `budget_s` (seconds, shared by the
    passes in proportion to their grids) runs out, every case has timings for the same
    configurations, the current defaults first among them."""
    from megatron_dyt.kernels.ops import tuning

    do_bench = do_bench or functools.partial(cuda_graph_median, reps=30)
    inputs = {}
    for tokens, hidden in shapes:
        x = torch.randn(tokens, hidden, device=device, dtype=torch.bfloat16)
        inputs[(tokens, hidden)] = (
            x.requires_grad_(True),
            torch.randn_like(x).requires_grad_(True),
        )
    fns = {(op, shape): ours(op, shape[1], device) for op in ops for shape in inputs}
    grids = {"fwd": _defaults_first(FWD_GRID), "fwd+bwd": _defaults_first(BWD_GRID)}
    total = sum(map(len, grids.values()))
    results = []
    for pass_, grid in grids.items():
        timings: dict[tuple, list] = {case: [] for case in fns}
        deadline = None if budget_s is None else clock() + budget_s * len(grid) / total
        for i, config in enumerate(grid):
            if i > 0 and deadline is not None and clock() > deadline:
                print(f"tune {pass_}: time budget spent after {i} of {len(grid)} configurations")
                break
            with tuning(**config):
                for (op, shape), fn in fns.items():
                    try:
                        us = time_impl(fn, *inputs[shape], pass_, do_bench)
                    except Exception as exc:  # a configuration that does not compile / run
                        print(f"{op} {_shape(shape)} {pass_} {config}: failed ({exc})")
                        continue
                    timings[(op, shape)].append((us, config))
        for (op, shape), case in timings.items():
            case.sort(key=lambda t: t[0])
            for us, config in case[:3]:
                print(f"{op:<13} {_shape(shape):<12} {pass_:<8} {us:>9.1f} µs  {config}")
            results.append(
                {
                    "op": op,
                    "shape": list(shape),
                    "pass": pass_,
                    "timings": [{"us": us, "config": c} for us, c in case],
                }
            )
    return results


def _defaults_first(grid: list[dict]) -> list[dict]:
    """The grid with the configuration closest to today's defaults first: a tuning cut short by
    its time budget still compares everything it timed against them."""
    from megatron_dyt.kernels.ops import Tuning

    defaults = asdict(Tuning())
    matches = [sum(defaults.get(k) == v for k, v in c.items()) - len(c) for c in grid]
    first = max(range(len(grid)), key=lambda i: matches[i])
    return [grid[first], *grid[:first], *grid[first + 1 :]]


def _shape(shape: tuple[int, int] | list[int]) -> str:
    return "x".join(map(str, shape))


def best_configs(cases: list[dict]) -> dict[str, dict]:
    """Per pass, the configuration with the smallest geometric-mean time over all tuned cases
    (one global choice: the backward grid must not depend on timing, see `ops.Tuning`)."""
    chosen = {}
    for pass_ in PASSES:
        scores: dict[str, list[float]] = {}
        configs: dict[str, dict] = {}
        for case in cases:
            if case["pass"] != pass_:
                continue
            for t in case["timings"]:
                key = json.dumps(t["config"], sort_keys=True)
                scores.setdefault(key, []).append(math.log(t["us"]))
                configs[key] = t["config"]
        complete = {k: v for k, v in scores.items() if len(v) == max(map(len, scores.values()))}
        if complete:
            best = min(complete, key=lambda k: sum(complete[k]) / len(complete[k]))
            chosen[pass_] = configs[best]
    return chosen


def write_json(path: Path, data: dict) -> None:
    """Results file, written whole or not at all (a run killed at its time limit keeps the old)."""
    from megatron_dyt.fileio import atomic_write

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps(data, indent=1) + "\n")


def _triton_version() -> str:
    import triton

    return triton.__version__


HEADER = (
    f"{'op':<13} {'shape':<12} {'pass':<8} {'impl':<9} {'floor µs':>9}"
    f" {'eager µs':>9} {'% floor':>8} {'graph µs':>9} {'% floor':>8}"
)


def _format_row(row: Row) -> str:
    shape = _shape(row.shape)
    graph = "—" if row.graph_us is None else f"{row.graph_us:.1f}"
    graph_pct = "—" if row.graph_us is None else f"{100 * row.floor_us / row.graph_us:.1f}%"
    return (
        f"{row.op:<13} {shape:<12} {row.pass_:<8} {row.impl:<9} {row.floor_us:>9.1f}"
        f" {row.us:>9.1f} {100 * row.floor_us / row.us:>7.1f}% {graph:>9} {graph_pct:>8}"
    )


def markdown(result: dict, field: str = "us") -> str:
    """The results as a Markdown table: µs and % of the floor per implementation, best in bold;
    `field` is "us" (eager launches) or "graph_us" (CUDA-graph replay)."""
    rows_with = [r for r in result["rows"] if r.get(field) is not None]
    impls = [i for i in ("ours", "liger", "compile", "rms_norm", "eager")
             if any(r["impl"] == i for r in rows_with)]  # fmt: skip
    cases: dict[tuple, dict[str, dict]] = {}
    for row in rows_with:
        key = (row["op"], "×".join(map(str, row["shape"])), row["pass"])
        cases.setdefault(key, {})[row["impl"]] = row
    lines = [
        "| op | shape | pass | floor µs | " + " | ".join(impls) + " |",
        "|---|---|---|---:|" + "---:|" * len(impls),
    ]
    for (op, shape, pass_), rows in cases.items():
        best = min(r[field] for r in rows.values())
        floor = next(iter(rows.values()))["floor_us"]
        cells = []
        for impl in impls:
            r = rows.get(impl)
            if r is None:
                cells.append("—")
                continue
            text = f"{r[field]:.1f} ({100 * floor / r[field]:.0f}%)"
            cells.append(f"**{text}**" if r[field] == best else text)
        lines.append(f"| {op} | {shape} | {pass_} | {floor:.1f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m megatron_dyt.kernels.bench", description=__doc__
    )
    parser.add_argument("--shapes", default=DEFAULT_SHAPES, help="TOKENSxHIDDEN,... (bf16)")
    parser.add_argument("--ops", default=",".join(OPS), help=f"subset of {','.join(OPS)}")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument(
        "--tune",
        action="store_true",
        help="first time ours under a grid of block sizes / warps (megatron_dyt.kernels.ops"
        ".Tuning), then run the table with the configuration of best geometric mean"
        " (several minutes)",
    )
    parser.add_argument(
        "--tune-shapes", help="shapes to tune on (default: --shapes); TOKENSxHIDDEN,..."
    )
    parser.add_argument(
        "--tune-budget",
        type=positive_float,
        metavar="SECONDS",
        help="stop trying new configurations after this long (default: the whole grid)",
    )
    parser.add_argument(
        "--table", type=Path, metavar="JSON", help="print a results file as Markdown and exit"
    )
    args = parser.parse_args(argv)
    if args.table:
        try:
            result = json.loads(args.table.read_text())
            result["rows"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            parser.error(f"--table {args.table}: not a results file of this script ({exc})")
        print(markdown(result), end="")
        if any(r.get("graph_us") is not None for r in result["rows"]):
            print("\nGPU time (CUDA-graph replay):\n")
            print(markdown(result, "graph_us"), end="")
        return 0
    shapes = parse_shapes(args.shapes)
    ops = args.ops.split(",")
    unknown = sorted(set(ops) - set(OPS))
    if unknown:
        parser.error(f"unknown op(s) {', '.join(unknown)}; choose from {', '.join(OPS)}")
    if not args.tune and (args.tune_shapes or args.tune_budget):
        parser.error("--tune-shapes and --tune-budget go with --tune")
    if not torch.cuda.is_available():
        print("bench: needs a CUDA GPU; none is available here", file=sys.stderr)
        return 2
    try:
        import triton  # noqa: F401
    except ImportError:
        print("bench: needs Triton, which is not installed", file=sys.stderr)
        return 2
    tuned: dict = {}
    chosen: dict = {}
    if args.tune:
        tune_shapes = parse_shapes(args.tune_shapes) if args.tune_shapes else shapes
        cases = tune(tune_shapes, ops, budget_s=args.tune_budget)
        chosen = best_configs(cases)
        print(f"chosen launch configuration: {chosen}", flush=True)
        tuned = {"tuning": {"chosen": chosen, "cases": cases}}
        if args.json:
            write_json(args.json, {**tuned, "rows": [], "complete": False})

    def save(partial: dict) -> None:
        if args.json:
            write_json(args.json, {**partial, **tuned, "complete": False})

    from megatron_dyt.kernels.ops import tuning

    with tuning(**chosen.get("fwd", {}), **chosen.get("fwd+bwd", {})):
        print(HEADER, flush=True)
        result = run(shapes, ops, on_row=save)
    result.update(tuned)
    print(f"device: {result['device']}, copy bandwidth {result['copy_bandwidth_tbs']:.2f} TB/s")
    if args.json:
        write_json(args.json, {**result, "complete": True})
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
