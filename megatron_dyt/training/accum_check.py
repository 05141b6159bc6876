"""How exactly DeepSpeed sums bf16 gradients over micro-batches (`train.grad_accum_dtype`).

The measurement behind `tests/test_grad_accum.py` and the GPU benchmark
(`benchmarks/gpu_train.py accum`): the same bf16 model, once inside a DeepSpeed engine that
accumulates N micro-batches, once plain, whose N per-micro-batch gradients are summed exactly
(fp64). The relative error of the engine's sum is reported for the weight matrices and for DyT's
α, whose gradients are sums over every element of a norm's input and suffer most.
"""

from __future__ import annotations

from typing import Any

import torch

from megatron_dyt.config import config_from_dict


def accumulation_error(tree: dict[str, Any], micro_batches: int = 16) -> dict[str, Any]:
    """Relative error of the gradient DeepSpeed accumulated over `micro_batches` micro-batches
    of the config `tree` (bf16, one process, TP=PP=1) against the exact sum of the same bf16
    micro-batch gradients. Initialises the process group if none is."""
    from deepspeed.utils import safe_get_full_grad

    from megatron_dyt import parallel
    from megatron_dyt.layout import batch_layout, data_parallel_size, optimizer_kind
    from megatron_dyt.model import LlamaModel, canonical_parameters, init_weights, lm_loss
    from megatron_dyt.training.engine import build_model, deepspeed_config, initialize

    seq = tree["model"]["seq_length"]
    micro = tree["train"].get("micro_batch_size", 1)
    tree["train"].update(global_batch_tokens=micro_batches * micro * seq, precision="bf16")
    cfg = config_from_dict(tree)
    parallel.setup(cfg.parallel)
    parallel.init_deepspeed_comm()
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    ds_config = deepspeed_config(cfg, batch_layout(cfg, data_parallel_size(cfg.parallel, 1)))
    model = build_model(cfg, ds_config)
    init_weights(model, cfg.model, cfg.train.seed)
    with torch.device(device):
        reference = LlamaModel(cfg).to(torch.bfloat16)
    reference.load_state_dict(model.state_dict())
    engine = initialize(model, cfg, ds_config, lambda s: 1.0)

    gen = torch.Generator().manual_seed(0)
    batches = [
        torch.randint(0, cfg.model.vocab_size, (micro, seq + 1), generator=gen).to(device)
        for _ in range(micro_batches)
    ]
    params = dict(canonical_parameters(reference))
    exact = {
        name: torch.zeros(p.shape, dtype=torch.float64, device=device) for name, p in params.items()
    }
    for tokens in batches:
        reference.zero_grad()
        (lm_loss(reference(tokens[:, :-1]), tokens[:, 1:]) / micro_batches).backward()
        for name, p in params.items():
            exact[name] += p.grad.double()
    for i, tokens in enumerate(batches):
        engine.backward(engine(tokens[:, :-1], tokens[:, 1:]))
        if i < len(batches) - 1:
            engine.step()  # only counts the micro-batch: the last one is the boundary
    got = {name: safe_get_full_grad(p).double() for name, p in canonical_parameters(engine.module)}

    def rel(names: list[str]) -> float | None:
        if not names:
            return None
        err = sum((got[n] - exact[n]).pow(2).sum() for n in names)
        return float((err / sum(exact[n].pow(2).sum() for n in names)).sqrt())

    return {
        "zero_stage": cfg.parallel.zero_stage,
        "grad_accum_dtype": ds_config["data_types"]["grad_accum_dtype"],
        "micro_batches": micro_batches,
        "optimizer": type(engine.optimizer).__name__,
        "kind": optimizer_kind(cfg),
        "matrices": rel([n for n in exact if exact[n].dim() == 2]),
        "alpha": rel([n for n in exact if n.endswith(".alpha")]),
    }
