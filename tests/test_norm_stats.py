"""The trainer's norm statistics (docs/design.md §1): recorded by the norms themselves, so the
fused residual kernels stay on; one collective per record; in metrics.jsonl every
`train.stats_interval` steps and at the last step."""

from __future__ import annotations

import json
import math
from pathlib import Path

import distributed
import pytest
import torch
from common import STEPS, tiny, train_dict
from common import train_worker as _train

from megatron_dyt.config import NormConfig, config_from_dict
from megatron_dyt.norms import SATURATION, build_norm, stat_names

H = 64


def _direct(kind: str, norm: torch.nn.Module, x: torch.Tensor) -> list[float]:
    """The statistics computed here, in float64, from the tensor the norm normalized."""
    xd = x.detach().double()
    std = xd.std().item()
    if kind in ("rmsnorm", "layernorm"):
        return [std]
    alpha = norm.alpha.detach().double().item()
    return [alpha, std, ((alpha * xd).abs() > SATURATION).double().mean().item()]


def _norm(kind: str, backend: str = "torch") -> torch.nn.Module:
    cfg = NormConfig(kind=kind, alpha_attn=0.7, alpha_mlp=1.3, derf_shift=0.2, backend=backend)
    return build_norm("mlp", H, cfg)


@pytest.mark.parametrize("kind", ["dyt", "derf", "rmsnorm", "layernorm"])
def test_a_norm_records_its_first_input_while_asked(kind):
    norm = _norm(kind)
    assert stat_names(kind) == norm.STATS
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, H, generator=gen) * 1.5  # about 30% of |1.3·x| above 2
    second = torch.randn(3, 5, H, generator=gen) * 9

    norm(x)
    assert norm.stats is None  # not asked: nothing kept

    norm.record_stats = True
    norm(x)
    norm(second)  # a second micro-batch: the first one's values stay
    norm.record_stats = False
    assert norm.stats.dtype == torch.float32 and norm.stats.shape == (len(norm.STATS),)
    want = _direct(kind, norm, x)
    assert norm.stats.tolist() == pytest.approx(want, rel=1e-6, abs=1e-7)
    if kind in ("dyt", "derf"):
        assert 0.1 < want[2] < 0.5  # the saturated fraction is really exercised

    # The unfused residual path (the torch backend, or any hooked norm) records h = x + r.
    norm.stats, norm.record_stats = None, True
    h, _ = norm.forward_residual(x, second)
    assert norm.stats.tolist() == pytest.approx(_direct(kind, norm, h), rel=1e-6, abs=1e-7)


@pytest.mark.parametrize("kind", ["dyt", "derf"])
@pytest.mark.interpreter
def test_the_fused_residual_kernel_records_the_h_it_returns(kind, monkeypatch):
    from megatron_dyt import norms
    from megatron_dyt.kernels import ops

    calls = []
    real = getattr(ops, f"residual_{kind}")
    monkeypatch.setattr(ops, f"residual_{kind}", lambda *a: calls.append(1) or real(*a))
    norms._load_kernels()
    norm = _norm(kind, backend="triton")
    gen = torch.Generator().manual_seed(1)
    x, r = (torch.randn(4, 7, H, generator=gen).bfloat16() for _ in range(2))
    norm.record_stats = True
    h, _ = norm.forward_residual(x, r)
    assert calls == [1]  # the fused kernel ran, and the statistics did not switch it off
    assert torch.equal(h, x + r)
    assert norm.stats.tolist() == pytest.approx(_direct(kind, norm, h), rel=1e-6, abs=1e-7)


class _CountingDist:
    """Stands in for `torch.distributed` in the metrics module: counts every function called."""

    def __init__(self):
        self.calls: list[str] = []

    def __getattr__(self, name: str):
        real = getattr(torch.distributed, name)
        if not callable(real):
            return real

        def call(*args, **kwargs):
            self.calls.append(name)
            return real(*args, **kwargs)

        return call


@pytest.mark.parametrize("kind", ["dyt", "rmsnorm"])
def test_a_record_is_one_collective_and_equals_the_direct_statistics(kind, monkeypatch):
    from megatron_dyt import parallel
    from megatron_dyt.model import LlamaModel, init_weights, norm_names
    from megatron_dyt.training import metrics

    cfg = tiny(kind)
    cfg.model.norm.backend = "torch"  # the unit tier: no Triton interpreter
    parallel.setup(cfg.parallel, backend="gloo")
    model = LlamaModel(cfg)
    init_weights(model, cfg.model, cfg.train.seed)
    stats = metrics.NormStats(model, cfg, torch.device("cpu"))
    names = norm_names(cfg.model)
    assert sorted(stats.local) == list(range(len(names)))  # one process: every norm is here

    # What each norm normalized, caught for the comparison only (the trainer uses no hooks). In
    # the unsplit model the canonical names are the module names.
    inputs: dict[str, torch.Tensor] = {}
    modules = dict(model.named_modules())
    for name in names:
        modules[name].register_forward_pre_hook(
            lambda m, args, name=name: inputs.setdefault(name, args[0].detach().clone())
        )
    tokens = torch.randint(0, cfg.model.vocab_size, (2, cfg.model.seq_length))
    with stats.recording():
        model(tokens)
        model(tokens.flip(1))  # a second micro-batch is not recorded
    assert not any(n.record_stats for n in stats.local.values())

    counting = _CountingDist()
    monkeypatch.setattr(metrics, "dist", counting)
    got = stats.gather()
    assert counting.calls == ["all_reduce"]

    fields = stat_names(kind)
    assert list(got) == [f"{n}/{f}" for n in names for f in fields]  # model order
    for name in names:
        want = _direct(kind, modules[name], inputs[name])
        assert [got[f"{name}/{f}"] for f in fields] == pytest.approx(want, rel=1e-5, abs=1e-7)
    assert all(n.stats is None for n in stats.local.values())  # handed over, not kept


def _gather_on_two_ranks() -> dict:
    """Rank r holds pipeline stage r: different norms. Then both ranks hold stage 0 (as
    data-parallel ranks do) with different values: each norm is averaged over its holders."""
    import torch.distributed as dist

    from megatron_dyt import parallel
    from megatron_dyt.model import stage_module
    from megatron_dyt.training.metrics import NormStats

    cfg = tiny("dyt", pp=2)
    parallel.setup(cfg.parallel, backend="gloo")
    rank = dist.get_rank()
    out = {}
    for what, stage in (("stages", rank), ("copies", 0)):
        stats = NormStats(stage_module(cfg, stage), cfg, torch.device("cpu"))
        for row, norm in stats.local.items():
            norm.stats = torch.tensor([row + 0.5, 10.0 * (rank + 1), 0.25 * rank])
        out[what] = stats.gather()
    return out


@pytest.mark.distributed
def test_stages_and_copies_on_two_ranks(tmp_path):
    from megatron_dyt.model import norm_names

    cfg = tiny("dyt", pp=2)
    names = norm_names(cfg.model)
    ranks = distributed.run(_gather_on_two_ranks, 2, tmp_path=tmp_path)
    assert ranks[0] == ranks[1]
    stages = ranks[0]["stages"]
    assert len(stages) == 3 * len(names)  # every norm of both stages, on both ranks
    half = len(names) // 2  # stage 0: blocks 0-1; stage 1: blocks 2-3 and the final norm
    for row, name in enumerate(names):
        holder = 0 if row < half else 1
        assert stages[f"{name}/alpha"] == row + 0.5
        assert stages[f"{name}/input_std"] == 10.0 * (holder + 1)
        assert stages[f"{name}/saturated"] == 0.25 * holder
    copies = ranks[0]["copies"]
    assert len(copies) == 3 * half  # stage 0's norms only
    for name in names[:half]:
        assert copies[f"{name}/input_std"] == 15.0  # (10 + 20) / 2
        assert copies[f"{name}/saturated"] == 0.125


def _train_counting_fused_calls(cfg_dict: dict, run_dir: str) -> dict:
    """Train, counting the fused residual + DyT kernel's calls in every step."""
    from megatron_dyt.kernels import ops
    from megatron_dyt.training import trainer

    calls, per_step = [0], []
    real_kernel, real_step = ops.residual_dyt, trainer._train_step

    def residual_dyt(*args, **kwargs):
        calls[0] += 1
        return real_kernel(*args, **kwargs)

    def train_step(engine, batches, pipeline):
        before = calls[0]
        loss = real_step(engine, batches, pipeline)
        per_step.append(calls[0] - before)
        return loss

    ops.residual_dyt, trainer._train_step = residual_dyt, train_step
    return {**_train(cfg_dict, run_dir), "fused_calls": per_step}


@pytest.mark.slow  # trains (one spawned rank), with the kernels through the interpreter on CPU
def test_training_keeps_the_fused_kernel_on_and_records_at_the_stats_interval(corpus, tmp_path):
    ops = pytest.importorskip("megatron_dyt.kernels.ops", reason="Triton is not installed")
    if not (torch.cuda.is_available() or ops.INTERPRET):
        pytest.skip("the kernels need CUDA or TRITON_INTERPRET=1 (tests/conftest.py sets it)")
    cfg = train_dict(corpus, log_interval=1, stats_interval=3)
    norm = config_from_dict(cfg).model.norm
    assert (norm.kind, norm.backend) == ("dyt", "triton")
    run = tmp_path / "run"
    out = distributed.run(_train_counting_fused_calls, 1, cfg, str(run), tmp_path=tmp_path)[0]
    # 4 micro-batches × 2 blocks, every step, the statistics steps included
    assert out["fused_calls"] == [8] * STEPS

    lines = Path(run, "metrics.jsonl").read_text().splitlines()
    records = [r for r in map(json.loads, lines) if "event" not in r]  # not checkpoint events
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))  # log_interval 1
    assert all("loss" in r and "tokens_per_s" in r for r in records)
    with_stats = {r["step"]: r for r in records if any(k.startswith("norm/") for k in r)}
    assert sorted(with_stats) == [3, 6, STEPS]  # the interval, and the last step
    names = [f"layers.{i}.{s}_norm" for i in range(2) for s in ("attention", "mlp")]
    for r in with_stats.values():
        keys = {k for k in r if k.startswith("norm/")}
        fields = ("alpha", "input_std", "saturated")
        assert keys == {f"norm/{n}/{f}" for n in [*names, "output.norm"] for f in fields}
        for n in [*names, "output.norm"]:
            assert r[f"norm/{n}/alpha"] > 0 and r[f"norm/{n}/input_std"] > 0
            assert 0 <= r[f"norm/{n}/saturated"] <= 1 and math.isfinite(r[f"norm/{n}/alpha"])
