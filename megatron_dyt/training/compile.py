"""`train.compile`: torch.compile each transformer block, applied from outside the model.

`compile_blocks` replaces each `TransformerBlock`'s `forward` by `torch.compile(block.forward,
fullgraph=True)` (Inductor) before `deepspeed.initialize`; docs/design.md §3, "Compilation".
Why it is built this way:

- The block's `__call__` is not compiled, so hooks on the block itself (ZeRO-3's parameter fetch)
  run outside the compiled region, as they do eagerly.
- `forward` holds the activation checkpointing (`full`: `torch.utils.checkpoint` around the
  block; `selective`: around the attention core), so Dynamo traces the checkpoint and the
  compiler recomputes the marked part in the backward; the block saves no more than eagerly.
- `fullgraph=True`: a graph break is an error, not a silent split into pieces. The Triton norm
  kernels are custom ops (`kernels/ops.py`); megatron-core's TP layers trace once
  `model/layers.py` hands the row-parallel layer its TP group (the warning it printed without
  one was a break) and, at TP > 1, the column-parallel layers all-reduce their input gradient
  synchronously (below).
- One code object for every block: Dynamo compiles it once and every layer reuses the graph
  (parameters are graph inputs), once more for evaluation (no grad).
- ZeRO-3 would put its hooks on every module inside the block, and they are
  `torch.compiler.disable`d: graph breaks. The blocks are made ZeRO-3 leaf modules instead: a
  block's parameters are fetched in the block's own hook, outside the compiled region, and
  released after it (FSDP's unit of one block).
- Dynamo does not reliably see hooks added after it compiled: while a module inside a block has
  a forward hook (a user's, a profiler's), the block runs its eager forward. The trainer's norm
  statistics are no hooks: the norms record them in their forward, compiled with it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from megatron.core import tensor_parallel
from torch import nn

from megatron_dyt.config import Config
from megatron_dyt.errors import UsageError


def compile_wanted(cfg: Config) -> bool:
    """Whether `train.compile` asks for compiled blocks here: `auto` on CUDA without sequence
    parallelism, `blocks` always (refused with sequence parallelism)."""
    sequence_parallel = cfg.parallel.sequence_parallel
    if cfg.train.compile == "auto":
        return torch.cuda.is_available() and not sequence_parallel
    if cfg.train.compile == "blocks" and sequence_parallel:
        raise UsageError(
            "train.compile=blocks does not work with parallel.sequence_parallel=true:"
            " megatron-core's sequence-parallel linear layers reduce-scatter asynchronously in"
            " the backward, which torch.compile cannot trace; set train.compile=none"
        )
    return cfg.train.compile == "blocks"


def _blocks(model: nn.Module) -> list[nn.Module]:
    from megatron_dyt.model.llama import TransformerBlock

    return [m for m in model.modules() if isinstance(m, TransformerBlock)]


def _hooked(modules: list[nn.Module]) -> bool:
    return bool(
        nn.modules.module._global_forward_pre_hooks
        or nn.modules.module._global_forward_hooks
        or any(m._forward_pre_hooks or m._forward_hooks for m in modules)
    )


def _synchronous_input_grad_all_reduce(block: nn.Module) -> None:
    """At TP > 1 megatron-core's column-parallel layer all-reduces its input gradient with
    `async_op=True`, overlapped with the weight-gradient GEMM, and Dynamo cannot trace an
    asynchronous collective. Without `allreduce_dgrad` the layer does the same all-reduce
    synchronously (its `copy_to_tensor_model_parallel_region`), which Dynamo turns into a
    functional collective that the compiler schedules itself. Same sums, same gradients."""
    for module in block.modules():
        if isinstance(module, tensor_parallel.ColumnParallelLinear) and module.allreduce_dgrad:
            module.allreduce_dgrad = False


def compiled_forward(block: nn.Module, backend: str = "inductor") -> Callable:
    """`block.forward` compiled whole (`fullgraph=True`), or eager while a module inside the
    block is hooked. The compiled function is the attribute `compiled` (for tests)."""
    _synchronous_input_grad_all_reduce(block)
    eager = block.forward
    compiled = torch.compile(eager, fullgraph=True, backend=backend)
    inner = [m for m in block.modules() if m is not block]

    def forward(x: torch.Tensor) -> torch.Tensor:
        return eager(x) if _hooked(inner) else compiled(x)

    forward.compiled = compiled  # type: ignore[attr-defined]
    return forward


def compile_blocks(model: nn.Module, cfg: Config, backend: str = "inductor") -> int:
    """Compile every `TransformerBlock` of `model` (a `LlamaModel`, or this rank's stage of a
    `PipelineModule`) if `train.compile` asks for it; returns how many were compiled.

    Call it once the weights are in place and before `deepspeed.initialize`: ZeRO-3 registers
    its hooks there and must find the blocks marked as leaves.
    """
    if not compile_wanted(cfg):
        return 0
    # A recording norm keeps its statistics as a module attribute, a side effect that Dynamo
    # refuses inside activation checkpointing unless it may skip replaying it in the backward's
    # recompute: which the norms skip anyway (they record once per step).
    torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint = True
    blocks = _blocks(model)
    if blocks and cfg.parallel.zero_stage == 3:
        from deepspeed.utils import set_z3_leaf_modules

        set_z3_leaf_modules(model, [type(blocks[0])])
    for block in blocks:
        block.forward = compiled_forward(block, backend)
    return len(blocks)
