"""Every weight matrix starts on a 16-byte boundary after `deepspeed.initialize`, in every ZeRO
stage: ZeRO and the bf16 optimizer pack a parameter group into one flat buffer with no padding
between tensors, so one-element parameters (DyT's α, the embedding scale) in a group of matrices
would shift every matrix after them off alignment (slow GEMMs; measured 2.2× on an H200:
benchmarks/README.md). The optimizer keeps such tensors in groups of their own."""

from __future__ import annotations

import distributed
import pytest
from common import tiny_dict

pytestmark = pytest.mark.slow  # one spawned process each (a clean DeepSpeed state)


def _misaligned(kind: str, zero: int) -> dict[str, int]:
    """Canonical name → data_ptr % 16 of every ≥2-D parameter that is not 16-byte aligned."""
    import deepspeed

    from megatron_dyt import parallel
    from megatron_dyt.config import config_from_dict
    from megatron_dyt.layout import batch_layout, data_parallel_size
    from megatron_dyt.model import canonical_parameters, init_weights
    from megatron_dyt.training.engine import build_model, deepspeed_config, initialize

    tree = tiny_dict(kind, num_layers=2)
    tree["parallel"].update(zero_stage=zero, zero3_param_persistence_threshold=0)
    tree["train"].update(micro_batch_size=1, global_batch_tokens=16, precision="fp32")
    cfg = config_from_dict(tree)
    parallel.setup(cfg.parallel)
    parallel.init_deepspeed_comm()
    layout = batch_layout(cfg, data_parallel_size(cfg.parallel, 1))
    ds_config = deepspeed_config(cfg, layout)
    model = build_model(cfg, ds_config)
    init_weights(model, cfg.model, cfg.train.seed)
    engine = initialize(model, cfg, ds_config, lambda s: 1.0)
    out = {}
    params = list(canonical_parameters(engine.module))
    with deepspeed.zero.GatheredParameters([p for _, p in params], enabled=zero == 3):
        for name, p in params:
            if p.dim() >= 2 and p.data_ptr() % 16:
                out[name] = p.data_ptr() % 16
    return out


@pytest.mark.parametrize("zero", [0, 1, 2, 3])
@pytest.mark.parametrize("kind", ["dyt", "rmsnorm"])
def test_weight_matrices_are_16_byte_aligned(kind, zero, tmp_path):
    assert distributed.run(_misaligned, 1, kind, zero, tmp_path=tmp_path)[0] == {}
