"""bf16 gradients are summed over micro-batches in fp32 (`train.grad_accum_dtype`, docs/design.md
§3): measured against the exact sum of the same bf16 micro-batch gradients.

bf16 runs on CPU too (slowly), through the same DeepSpeed optimizers as on a GPU: ZeRO-1 with
fp32 accumulation is DeepSpeed's bf16 optimizer, ZeRO-2 its ZeRO optimizer with an fp32
accumulation buffer.
"""

from __future__ import annotations

import distributed
import pytest
import torch
from common import tiny_dict

pytestmark = pytest.mark.slow

MICRO_BATCHES = 16


def _accumulated_grads(zero: int, accum: str) -> dict:
    """Relative error of the gradient DeepSpeed accumulated over 16 micro-batches against the
    exact (fp64) sum of the per-micro-batch bf16 gradients, for the weight matrices and for α."""
    from deepspeed.utils import safe_get_full_grad

    from megatron_dyt import parallel
    from megatron_dyt.config import config_from_dict
    from megatron_dyt.layout import batch_layout, data_parallel_size, optimizer_kind
    from megatron_dyt.model import LlamaModel, canonical_parameters, init_weights, lm_loss
    from megatron_dyt.training.engine import build_model, deepspeed_config, initialize

    tree = tiny_dict("dyt", num_layers=2, seq_length=32)
    tree["model"]["norm"]["backend"] = "torch"
    tree["parallel"].update(zero_stage=zero)
    seq = tree["model"]["seq_length"]
    tree["train"].update(
        micro_batch_size=1,
        global_batch_tokens=MICRO_BATCHES * seq,
        precision="bf16",
        grad_accum_dtype=accum,
    )
    cfg = config_from_dict(tree)
    parallel.setup(cfg.parallel)
    parallel.init_deepspeed_comm()
    ds_config = deepspeed_config(cfg, batch_layout(cfg, data_parallel_size(cfg.parallel, 1)))
    model = build_model(cfg, ds_config)
    init_weights(model, cfg.model, cfg.train.seed)
    reference = LlamaModel(cfg).to(torch.bfloat16)
    reference.load_state_dict(model.state_dict())
    engine = initialize(model, cfg, ds_config, lambda s: 1.0)

    gen = torch.Generator().manual_seed(0)
    batches = [
        torch.randint(0, cfg.model.vocab_size, (1, seq + 1), generator=gen) for _ in range(16)
    ]
    exact = {
        name: torch.zeros(p.shape, dtype=torch.float64)
        for name, p in canonical_parameters(reference)
    }
    params = dict(canonical_parameters(reference))
    for tokens in batches:
        reference.zero_grad()
        (lm_loss(reference(tokens[:, :-1]), tokens[:, 1:]) / MICRO_BATCHES).backward()
        for name, p in params.items():
            exact[name] += p.grad.double()
    for i, tokens in enumerate(batches):
        engine.backward(engine(tokens[:, :-1], tokens[:, 1:]))
        if i < len(batches) - 1:
            engine.step()  # only counts the micro-batch: the last one is the boundary
    got = {name: safe_get_full_grad(p).double() for name, p in canonical_parameters(engine.module)}

    def rel(names: list[str]) -> float:
        err = sum((got[n] - exact[n]).pow(2).sum() for n in names)
        return float((err / sum(exact[n].pow(2).sum() for n in names)).sqrt())

    return {
        "ds_accum": ds_config["data_types"]["grad_accum_dtype"],
        "optimizer": type(engine.optimizer).__name__,
        "kind": optimizer_kind(cfg),
        "matrices": rel([n for n in exact if exact[n].dim() == 2]),
        "alpha": rel([n for n in exact if n.endswith(".alpha")]),
    }


@pytest.mark.parametrize("zero", [1, 2])
def test_bf16_gradients_accumulate_in_fp32(zero, tmp_path):
    fp32 = distributed.run(_accumulated_grads, 1, zero, "fp32", tmp_path=tmp_path / "fp32")[0]
    bf16 = distributed.run(_accumulated_grads, 1, zero, "bf16", tmp_path=tmp_path / "bf16")[0]
    print(
        f"ZeRO-{zero}: relative error of the summed gradient, fp32 / bf16 accumulation:"
        f" matrices {fp32['matrices']:.1e} / {bf16['matrices']:.1e},"
        f" α {fp32['alpha']:.1e} / {bf16['alpha']:.1e} ({fp32['optimizer']})"
    )
    assert fp32["ds_accum"] == "fp32" and bf16["ds_accum"] == "bf16"
    # fp32 sums of bf16 values: rounding of fp32 only.
    assert fp32["matrices"] < 1e-6 and fp32["alpha"] < 1e-6
    # bf16 sums: each add rounds to 8 bits of mantissa.
    assert bf16["matrices"] > 1e-3 and bf16["alpha"] > 1e-3
    assert fp32["kind"] == ("bf16" if zero == 1 else "zero")
