"""The DeepSpeed engine, built from the project config (the DeepSpeed JSON is generated here).

Order matters (docs/design.md §3): process groups → megatron `parallel_state` → model (a
PipelineModule builds its layers in its constructor) → weights → compiled blocks
(`train.compile`) → `deepspeed.initialize`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from megatron_dyt.config import Config
from megatron_dyt.layout import BatchLayout, data_parallel_size, grad_accum_dtype, precision

_DS_DTYPE = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def deepspeed_config(cfg: Config, layout: BatchLayout) -> dict[str, Any]:
    dtype, accum = precision(cfg), _DS_DTYPE[grad_accum_dtype(cfg)]
    par = cfg.parallel
    zero: dict[str, Any] = {"stage": par.zero_stage}
    if par.zero_stage:
        zero.update(
            overlap_comm=par.overlap_comm,
            contiguous_gradients=par.contiguous_gradients,
            reduce_bucket_size=par.reduce_bucket_size,
        )
    if par.zero_stage in (1, 2):
        zero["allgather_bucket_size"] = par.allgather_bucket_size
    if par.zero_stage == 3:
        zero["stage3_param_persistence_threshold"] = par.zero3_param_persistence_threshold
    return {
        "train_batch_size": layout.global_batch,
        "train_micro_batch_size_per_gpu": layout.micro_batch,
        "gradient_accumulation_steps": layout.grad_accum,
        "gradient_clipping": cfg.train.grad_clip,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": dtype == torch.bfloat16},
        "fp16": {"enabled": dtype == torch.float16, "initial_scale_power": 16},
        # Summed over micro-batches and over data-parallel ranks in the same dtype (Megatron
        # does both in fp32 for bf16; DeepSpeed would reduce in bf16 by default).
        "data_types": {"grad_accum_dtype": accum},
        "communication_data_type": accum,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
        "dump_state": False,
    }


class MegatronMPU:
    """megatron-core's groups in the shape DeepSpeed's `mpu=` expects (pipeline parallel 1).

    Without it DeepSpeed treats tensor-parallel ranks as data-parallel replicas and averages
    their (different) gradient shards.
    """

    get_model_parallel_rank = staticmethod(ps.get_tensor_model_parallel_rank)
    get_model_parallel_world_size = staticmethod(ps.get_tensor_model_parallel_world_size)
    get_model_parallel_group = staticmethod(ps.get_tensor_model_parallel_group)
    get_tensor_model_parallel_rank = staticmethod(ps.get_tensor_model_parallel_rank)
    get_tensor_model_parallel_world_size = staticmethod(ps.get_tensor_model_parallel_world_size)
    get_tensor_model_parallel_group = staticmethod(ps.get_tensor_model_parallel_group)
    get_tensor_model_parallel_src_rank = staticmethod(ps.get_tensor_model_parallel_src_rank)
    get_data_parallel_rank = staticmethod(ps.get_data_parallel_rank)
    get_data_parallel_world_size = staticmethod(ps.get_data_parallel_world_size)
    get_data_parallel_group = staticmethod(ps.get_data_parallel_group)
    get_pipeline_model_parallel_world_size = staticmethod(ps.get_pipeline_model_parallel_world_size)
    get_pipeline_model_parallel_group = staticmethod(ps.get_pipeline_model_parallel_group)


@contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_model(cfg: Config, ds_config: dict[str, Any] | None = None) -> torch.nn.Module:
    """The model for this rank (`LlamaModel`, or this stage of a `PipelineModule`), its weights
    not yet initialised (`model.init.init_weights`).

    Host memory stays small at any size: the weights are allocated in the training dtype
    (DeepSpeed would cast them to it anyway), on CUDA on this rank's GPU (no copy of the stage on
    the host), and under ZeRO-3 inside `deepspeed.zero.Init`, so each parameter is partitioned
    over the data-parallel group as soon as its module is built. `ds_config` is the run's
    DeepSpeed config (needed for ZeRO-3).
    """
    device = (
        torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
    )
    zero3 = cfg.parallel.zero_stage == 3
    if zero3 and ds_config is None:
        raise AssertionError("build_model needs the DeepSpeed config under ZeRO-3")
    with ExitStack() as stack:
        if device is not None:
            stack.enter_context(torch.device(device))
        stack.enter_context(_default_dtype(precision(cfg)))
        if zero3:
            import deepspeed

            stack.enter_context(
                deepspeed.zero.Init(
                    data_parallel_group=ps.get_data_parallel_group(),
                    config_dict_or_path=ds_config,
                    mem_efficient_linear=False,
                )
            )
        return _build(cfg)


def _build(cfg: Config) -> torch.nn.Module:
    from megatron_dyt.model import LlamaModel, pipeline_module

    if cfg.parallel.pipeline == 1:
        return LlamaModel(cfg)
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    topology = PipeModelDataParallelTopology(
        num_pp=cfg.parallel.pipeline,
        num_mp=cfg.parallel.tensor,
        num_dp=data_parallel_size(cfg.parallel, dist.get_world_size()),
    )
    # Activation checkpointing stays inside each block (torch.utils.checkpoint), the same
    # code with or without pipeline parallelism.
    return pipeline_module(cfg, topology)


def initialize(model: torch.nn.Module, cfg: Config, ds_config: dict[str, Any], lr_lambda):
    """`deepspeed.initialize` with our AdamW and schedule; returns the engine. The blocks are
    compiled first if `train.compile` asks for it (`training/compile.py`)."""
    import deepspeed

    from megatron_dyt.training.compile import compile_blocks
    from megatron_dyt.training.optimizer import build_optimizer

    compile_blocks(model, cfg)
    optimizer = build_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
    kwargs: dict[str, Any] = {}
    if cfg.parallel.pipeline == 1:
        kwargs["mpu"] = MegatronMPU()
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config, **kwargs
    )
    return engine
