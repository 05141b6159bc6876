"""`train.compile`: transformer blocks compiled with fullgraph=True (Inductor on CPU) against the
eager blocks, alone and through the real trainer (docs/design.md §3, "Compilation").

Inductor compiles C++ on CPU, seconds per graph, so every test here compiles as few distinct
graphs as it can: one per block configuration, which every layer reuses."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import distributed
import pytest
import torch
from common import STEPS, tiny, tiny_dict, train_dict
from common import train_worker as _train

from megatron_dyt import parallel
from megatron_dyt.config import config_from_dict
from megatron_dyt.errors import UsageError
from megatron_dyt.model.layers import BuildSpec
from megatron_dyt.model.llama import TransformerBlock
from megatron_dyt.training.compile import compile_blocks, compile_wanted, compiled_forward

try:
    from megatron_dyt.kernels import ops
except Exception:  # no triton
    ops = None
CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
KERNELS = CUDA or (ops is not None and ops.INTERPRET)


@pytest.fixture(scope="module", autouse=True)
def process_group():
    parallel.init_distributed("gloo")


def _block(norm_backend: str = "torch", recompute: str = "none") -> TransformerBlock:
    cfg = tiny("dyt")
    parallel.initialize_model_parallel(cfg.parallel)
    norm = cfg.model.norm.model_copy(update={"backend": norm_backend})
    spec = dataclasses.replace(BuildSpec.of(cfg), recompute=recompute)
    with torch.device(DEVICE):
        block = TransformerBlock(cfg.model.model_copy(update={"norm": norm}), spec, 0)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in block.parameters():
            noise = torch.randn(p.shape, generator=generator).to(DEVICE) * 0.05
            if p.numel() == 1:  # α
                p.copy_(noise.abs() + 0.5)
            elif p.dim() == 1:  # γ
                p.copy_(noise + 1)
            else:
                p.copy_(noise)
    return block


def _forward_backward(fn, block: TransformerBlock, x: torch.Tensor):
    """Output, gradients (input and parameters), and the elements of the tensors saved for the
    backward other than the input, the parameters and the RNG state a recompute replays."""
    kept = {t.data_ptr() for t in (x, *block.parameters())}
    saved = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.data_ptr() not in kept and t.dtype != torch.uint8:
            saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = fn(x)
    grads = torch.autograd.grad(y.square().sum(), [x, *block.parameters()])
    return y, grads, sum(saved)


# One Inductor compile each (10-25 s cold on 2 cores, a few seconds from Inductor's cache).
# fp32 on both sides: Inductor fuses the element-wise work and may round differently (~1e-7
# relative here), well inside assert_close's fp32 tolerances (1.3e-6 relative, 1e-5 absolute).
@pytest.mark.parametrize(
    "norm_backend,recompute",
    [("torch", "none"), ("torch", "full"), ("torch", "selective"), ("triton", "full")],
)
@pytest.mark.slow
def test_compiled_block_fullgraph_matches_eager(norm_backend, recompute):
    if norm_backend == "triton" and not KERNELS:
        pytest.skip("the Triton kernels need CUDA or TRITON_INTERPRET=1")
    block = _block(norm_backend, recompute)
    x = torch.randn(16, 2, 64, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    x.requires_grad_()
    y, grads, eager_saved = _forward_backward(block.forward, block, x)
    compiled = compiled_forward(block).compiled  # fullgraph=True: a graph break is an error
    for _ in range(2):  # the second call runs the cached graph
        y_c, grads_c, compiled_saved = _forward_backward(compiled, block, x)
        torch.testing.assert_close(y_c, y)
        for g_c, g in zip(grads_c, grads, strict=True):
            torch.testing.assert_close(g_c, g)
    # Recompute composes with the compiler: under `full` the compiled block keeps nothing but
    # its input for the backward, as the eager checkpoint; otherwise no more than eagerly.
    assert compiled_saved <= eager_saved
    if recompute == "full":
        assert compiled_saved == 0


def test_hooked_block_runs_eagerly():
    # Hooks inside a block (the trainer's norm statistics) see the eager forward; nothing is
    # compiled for it (torch.compile is lazy, so this costs no compile).
    block = _block()
    forward = compiled_forward(block)
    seen = []
    handle = block.mlp_norm.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    x = torch.randn(16, 2, 64, device=DEVICE)
    torch._dynamo.utils.counters.clear()
    try:
        torch.testing.assert_close(forward(x), block._forward(x), rtol=0, atol=0)
    finally:
        handle.remove()
    assert len(seen) == 2
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 0


def _with(compile: str, **parallel) -> dict:
    d = tiny_dict()
    d["train"]["compile"] = compile
    d["parallel"].update(parallel)
    return config_from_dict(d)


def test_compile_setting():
    assert compile_wanted(tiny()) is CUDA  # auto: on CUDA only
    assert compile_wanted(_with("blocks")) is True
    assert compile_wanted(_with("none")) is False
    assert compile_blocks(torch.nn.Sequential(), _with("none")) == 0
    assert compile_wanted(_with("auto", tensor=2, sequence_parallel=True)) is False
    with pytest.raises(UsageError, match="train.compile=blocks does not work with parallel"):
        compile_wanted(_with("blocks", tensor=2, sequence_parallel=True))


# ---- through the trainer --------------------------------------------------------------------


def _compiled_dict(corpus: dict, compile: str, **kwargs) -> dict:
    """The trainer tests' tiny DyT run on the torch backend; norm statistics every 4 steps."""
    d = train_dict(corpus, **kwargs)
    d["model"]["norm"]["backend"] = "torch"
    d["train"].update(compile=compile, log_interval=4, stats_interval=4)
    return d


GRAPHS = 3  # a block's compiled graphs in training (see below)


def _train_counting_graphs(cfg_dict: dict, run_dir: str) -> dict:
    out = _train(cfg_dict, run_dir)
    out["graphs"] = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    return out


@pytest.fixture(scope="module")
def eager(corpus, tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("eager")
    cfg = _compiled_dict(corpus, "none")
    return distributed.run(_train_counting_graphs, 1, cfg, str(tmp / "run"), tmp_path=tmp)[0]


def _assert_losses_close(got: dict, expected: dict) -> None:
    # Compiled and eager blocks differ only in rounding (Inductor fuses element-wise work; fp32).
    # Measured: at most 1e-7 relative over the 8 steps. 1e-5 is the bound the trainer tests
    # give a different DP/TP/PP layout (reordered sums); a wrong gradient or a lost recompute
    # moves the loss by far more (it falls ~0.1 per step here).
    assert sorted(got) == sorted(expected) == list(range(1, STEPS + 1))
    for step in expected:
        assert got[step] == pytest.approx(expected[step], rel=1e-5), f"step {step}"


@pytest.mark.parametrize(
    "zero,recompute", [(1, "none"), (3, "full")], ids=["zero1", "zero3-full-recompute"]
)
@pytest.mark.slow
def test_compiled_training_matches_eager(zero, recompute, corpus, eager, tmp_path):
    assert eager["graphs"] == 0
    cfg = _compiled_dict(corpus, "blocks", zero=zero, activation_checkpointing=recompute)
    run = tmp_path / "run"
    out = distributed.run(_train_counting_graphs, 1, cfg, str(run), tmp_path=tmp_path)[0]
    _assert_losses_close(out["losses"], eager["losses"])
    # Both layers share the compiled graphs (training; no evaluation here): one without
    # statistics, and on steps 4 and 8, which record them inside the graph, one for the first
    # micro-batch (which records) and one for the others.
    assert out["graphs"] == GRAPHS
    records = [json.loads(x) for x in Path(run, "metrics.jsonl").read_text().splitlines()]
    stats = [r["step"] for r in records if "norm/layers.1.mlp_norm/alpha" in r]
    assert stats == [4, 8]


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)])
@pytest.mark.distributed
def test_compiled_tensor_and_pipeline_parallel_match_eager(tp, pp, corpus, eager, tmp_path):
    cfg = _compiled_dict(corpus, "blocks", tp=tp, pp=pp, zero=1 if pp == 1 else 0)
    ranks = distributed.run(
        _train_counting_graphs, tp * pp, cfg, str(tmp_path / "run"), tmp_path=tmp_path
    )
    for r in ranks:
        _assert_losses_close(r["losses"], eager["losses"])
        assert r["graphs"] == GRAPHS
