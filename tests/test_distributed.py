"""Multi-process equivalence on CPU (gloo): TP=2 and the pipeline split against the TP=1 model."""

from __future__ import annotations

import distributed
import pytest
import torch
import torch.distributed as dist
from common import tiny_dict

from megatron_dyt import parallel
from megatron_dyt.config import config_from_dict
from megatron_dyt.model import (
    LlamaModel,
    canonical_parameters,
    full_state_dict,
    init_weights,
    lm_loss,
    load_full_state_dict,
    pipeline_module,
)

pytestmark = pytest.mark.distributed  # every test runs TP/PP ranks through tests/distributed.py


def _gather_vocab(logits: torch.Tensor) -> torch.Tensor:
    """Vocab-parallel logits [s, b, v/tp] -> full [s, b, v] (each rank holds a contiguous slice)."""
    group = parallel.tp_group()
    parts = [torch.empty_like(logits) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, logits.contiguous(), group=group)
    return torch.cat(parts, dim=-1)


def _run_unsplit(cfg_dict: dict, tokens: torch.Tensor, full: dict | None, steps: int) -> dict:
    """Forward, loss, backward of the unsplit model at the config's TP; then a few SGD steps.

    (SGD, not Adam, for the cross-layout comparison after steps: Adam divides by √v, which turns
    a rounding-level difference in a near-zero gradient into a full-size update difference.)
    """
    cfg = config_from_dict(cfg_dict)
    parallel.setup(cfg.parallel)
    model = LlamaModel(cfg)
    init_weights(model, cfg.model, cfg.train.seed)
    initial = full_state_dict(model)
    if full is not None:
        load_full_state_dict(model, full)
    logits = model(tokens[:, :-1])
    loss = lm_loss(logits, tokens[:, 1:])
    loss.backward()
    result = {
        "initial": initial,
        "logits": _gather_vocab(logits.detach()),
        "loss": loss.detach(),
        "grads": full_state_dict(model, grads=True),
    }
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
    for _ in range(steps):
        opt.step()
        opt.zero_grad()
        model(tokens[:, :-1], tokens[:, 1:]).backward()
    opt.step()
    result["replicated"] = {
        name: p.detach().clone()
        for name, p in canonical_parameters(model)
        if not parallel.is_sharded(p)
    }
    result["after_steps"] = full_state_dict(model)

    # Sequence-parallel gradient reduction (its forward is CUDA-only; the hook is not): each
    # rank sees other tokens, and the marked parameter's gradient is summed over the TP pair.
    from megatron_dyt.norms import DyT

    norm = DyT(8, 0.5)
    parallel.mark_replicated(norm, sequence_parallel=True)
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(parallel.tp_rank()))
    norm(x).pow(2).sum().backward()
    result["sp_grads"] = {n: p.grad.clone() for n, p in norm.named_parameters()}
    result["sp_input"] = x
    return result


def _run_pipeline(cfg_dict: dict, tokens: torch.Tensor, full: dict) -> dict:
    """The DeepSpeed PipelineModule of the stage layers, stages chained by hand with send/recv."""
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology
    from megatron.core import parallel_state as ps

    cfg = config_from_dict(cfg_dict)
    parallel.setup(cfg.parallel)
    parallel.init_deepspeed_comm()
    tp, pp = cfg.parallel.tensor, cfg.parallel.pipeline
    topo = PipeModelDataParallelTopology(
        num_pp=pp, num_mp=tp, num_dp=dist.get_world_size() // (tp * pp)
    )
    module = pipeline_module(cfg, topo)
    # The DeepSpeed topology and megatron's groups agree on who is which stage and TP rank.
    coord = topo.get_coord(dist.get_rank())
    assert (coord.pipe, coord.model) == (ps.get_pipeline_model_parallel_rank(), parallel.tp_rank())
    load_full_state_dict(module, full)

    stage = ps.get_pipeline_model_parallel_rank()
    first, last = stage == 0, stage == pp - 1
    s, b, h = tokens.shape[1] - 1, tokens.shape[0], cfg.model.hidden_size
    if first:
        inp = tokens[:, :-1]
    else:
        inp = torch.empty(s, b, h)
        dist.recv(inp, ps.get_pipeline_model_parallel_prev_rank())
        inp.requires_grad_(True)
    out = module(inp)
    result = {"stage": stage, "tp_rank": parallel.tp_rank()}
    if last:
        loss = lm_loss(out, tokens[:, 1:])
        loss.backward()
        result.update(logits=_gather_vocab(out.detach()), loss=loss.detach())
    else:
        dist.send(out.detach(), ps.get_pipeline_model_parallel_next_rank())
        grad = torch.empty_like(out)
        dist.recv(grad, ps.get_pipeline_model_parallel_next_rank())
        out.backward(grad)
    if not first:
        dist.send(inp.grad, ps.get_pipeline_model_parallel_prev_rank())
    result["grads"] = full_state_dict(module, grads=True)
    result["names"] = sorted(name for name, _ in canonical_parameters(module))
    return result


def _assert_grads_close(got: dict, expected: dict) -> None:
    for name, g in got.items():
        torch.testing.assert_close(
            g, expected[name], rtol=1e-4, atol=2e-6, msg=lambda m, n=name: f"{n}: {m}"
        )


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """TP=1, one process: the model every layout is compared with, per norm kind."""
    tmp = tmp_path_factory.mktemp("ref")
    out = {}
    for kind in ("dyt", "rmsnorm"):
        cfg = tiny_dict(kind)
        tokens = torch.randint(
            0,
            cfg["model"]["vocab_size"],
            (2, cfg["model"]["seq_length"] + 1),
            generator=torch.Generator().manual_seed(0),
        )
        out[kind] = (
            cfg,
            tokens,
            distributed.run(_run_unsplit, 1, cfg, tokens, None, 3, tmp_path=tmp)[0],
        )
    return out


@pytest.mark.parametrize("kind", ["dyt", "rmsnorm"])
def test_tensor_parallel_equals_single_process(kind, reference, tmp_path):
    cfg, tokens, ref = reference[kind]
    ranks = distributed.run(
        _run_unsplit, 2, tiny_dict(kind, tp=2), tokens, ref["initial"], 3, tmp_path=tmp_path
    )
    for r in ranks:
        # Layout-invariant init: TP=2 built from the seed alone equals the TP=1 weights exactly.
        for name, tensor in ref["initial"].items():
            assert torch.equal(r["initial"][name], tensor), name
        torch.testing.assert_close(r["logits"], ref["logits"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(r["loss"], ref["loss"], rtol=1e-6, atol=1e-6)
        _assert_grads_close(r["grads"], ref["grads"])
    # Sequence-parallel replicated grads: the sum of what each rank's tokens contribute.
    from megatron_dyt.norms import DyT

    expected = {}
    for r in ranks:
        ref_norm = DyT(8, 0.5)
        ref_norm(r["sp_input"]).pow(2).sum().backward()
        for n, p in ref_norm.named_parameters():
            expected[n] = expected.get(n, 0) + p.grad
    for r in ranks:
        for n, g in r["sp_grads"].items():
            torch.testing.assert_close(g, expected[n], rtol=1e-6, atol=1e-6)
    # Replicated parameters (norm γ/α, embedding scale) stay bit-identical across TP ranks.
    a, b = ranks[0]["replicated"], ranks[1]["replicated"]
    assert set(a) == set(b) and a
    for name in a:
        assert torch.equal(a[name], b[name]), name
    # And the trained weights still agree with the single-process run after 4 SGD steps.
    for name, tensor in ref["after_steps"].items():
        torch.testing.assert_close(ranks[0]["after_steps"][name], tensor, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("tp,pp", [(1, 2), (2, 2)])
def test_pipeline_split_equals_unsplit_model(tp, pp, reference, tmp_path):
    cfg, tokens, ref = reference["dyt"]
    ranks = distributed.run(
        _run_pipeline,
        tp * pp,
        tiny_dict("dyt", tp=tp, pp=pp),
        tokens,
        ref["initial"],
        tmp_path=tmp_path,
    )
    names = set()
    for r in ranks:
        names |= set(r["names"])
        _assert_grads_close(r["grads"], ref["grads"])
        if r["stage"] == pp - 1:
            torch.testing.assert_close(r["logits"], ref["logits"], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(r["loss"], ref["loss"], rtol=1e-6, atol=1e-6)
    assert names == set(ref["initial"])  # the stages hold every tensor, under the same names
    # Blocks are spread evenly: stage 0 has the embedding and the first half of the blocks.
    first = next(r for r in ranks if r["stage"] == 0)["names"]
    assert any(n.startswith("embedding.") for n in first)
    assert not any(n.startswith("output.") or n.startswith(f"layers.{4 // pp}.") for n in first)
