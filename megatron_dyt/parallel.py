"""Process groups and the tensor-parallel bookkeeping the model and trainer share.

megatron-core's `parallel_state` owns the groups; its default order (TP fastest, then DP, then
PP) is the order DeepSpeed's `PipeModelDataParallelTopology` uses too (docs/design.md §3).
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist
from torch import nn

from megatron_dyt.config import ParallelConfig
from megatron_dyt.layout import LayoutError


def init_distributed(backend: str | None = None, timeout_minutes: int = 30) -> None:
    """Join the job's process group, or make a one-process group when not launched by torchrun.

    megatron-core's layers need a process group even at TP=1, so single-process use (the `info`
    command, a notebook, a unit test) gets a private in-memory one.
    """
    if dist.is_initialized():
        return
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    timeout = datetime.timedelta(minutes=timeout_minutes)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend, timeout=timeout)
    else:
        store = dist.HashStore()
        dist.init_process_group(backend, store=store, rank=0, world_size=1, timeout=timeout)


def initialize_model_parallel(parallel: ParallelConfig) -> None:
    """Create the TP/PP/DP groups for this job's layout (world = TP × PP × DP)."""
    from megatron.core import parallel_state

    world = dist.get_world_size()
    model_parallel = parallel.tensor * parallel.pipeline
    if world % model_parallel:
        raise LayoutError(
            f"world size {world} is not divisible by parallel.tensor × parallel.pipeline ="
            f" {parallel.tensor} × {parallel.pipeline}; launch a multiple of {model_parallel}"
            " processes"
        )
    if parallel_state.model_parallel_is_initialized():
        if (
            parallel_state.get_tensor_model_parallel_world_size() == parallel.tensor
            and parallel_state.get_pipeline_model_parallel_world_size() == parallel.pipeline
        ):
            return  # the same groups: re-creating them would leak every old group's threads
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tensor,
        pipeline_model_parallel_size=parallel.pipeline,
        create_gloo_process_groups=False,
    )


def setup(parallel: ParallelConfig, backend: str | None = None) -> None:
    init_distributed(backend)
    initialize_model_parallel(parallel)


def teardown() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def tp_group() -> dist.ProcessGroup:
    from megatron.core import parallel_state

    return parallel_state.get_tensor_model_parallel_group()


def tp_rank() -> int:
    return dist.get_rank(tp_group())


def tp_size() -> int:
    return dist.get_world_size(tp_group())


# ---- tensor-parallel attributes ----------------------------------------------------------------
# A sharded parameter carries megatron-core's attributes `tensor_model_parallel`,
# `partition_dim` and `partition_stride` (set from the sharding table, `model/sharding.py`);
# DeepSpeed's and megatron's grad-norm code read them to count each shard once. Everything else
# is replicated over TP and carries `sequence_parallel` when its gradient must be summed over the
# TP group.


def mark_sharded(param: torch.Tensor, dim: int, stride: int = 1) -> None:
    param.tensor_model_parallel = True
    param.partition_dim = dim
    param.partition_stride = stride


def is_sharded(param: torch.Tensor) -> bool:
    return bool(getattr(param, "tensor_model_parallel", False))


def mark_replicated(module: nn.Module, sequence_parallel: bool) -> None:
    """Mark every parameter that is not TP-sharded as TP-replicated.

    Under sequence parallelism each TP rank normalises a different slice of tokens, so the
    gradients of these parameters (norm γ/β/α, the embedding scale) are partial sums. A gradient
    hook sums them over the TP group before they are accumulated, so every optimizer and ZeRO
    stage sees the full gradient and the replicas stay identical.
    """
    for param in module.parameters():
        if is_sharded(param) or getattr(param, "sequence_parallel", None) is not None:
            continue
        param.tensor_model_parallel = False
        param.sequence_parallel = sequence_parallel
        if sequence_parallel and param.requires_grad:
            param.register_hook(_sum_over_tensor_parallel)


def _sum_over_tensor_parallel(grad: torch.Tensor) -> torch.Tensor:
    group = tp_group()
    if dist.get_world_size(group) == 1:
        return grad
    grad = grad.clone()
    dist.all_reduce(grad, group=group)
    return grad


def init_deepspeed_comm() -> None:
    """Let DeepSpeed adopt the existing process group.

    On CPU DeepSpeed would JIT-build its shared-memory collective op at start-up (~30 s, and a
    C++ toolchain); gloo is what the CPU path uses, so the op is marked unavailable first.
    """
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # skips DeepSpeed's detection warning
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if not torch.cuda.is_available():
        builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
        if builder is not None:
            deepspeed.ops.__compatible_ops__[builder.NAME] = False
    init_distributed()
    os.environ.setdefault("LOCAL_RANK", "0")  # DeepSpeed asserts it is set, even for one process
    deepspeed.init_distributed(
        dist_backend=dist.get_backend(), auto_mpi_discovery=False, verbose=False
    )
