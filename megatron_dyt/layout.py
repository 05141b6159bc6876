"""How a config maps onto a world of processes: data-parallel size, batch split, precision.

World = TP × PP × DP, in that rank order (docs/design.md §3). Everything that needs the
data-parallel size, the micro-batch split or the training dtype of a run — the trainer, the
launchers, `info`, the checkpoint readers — computes it here, from the config and a world size.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_dyt.config import Config, ParallelConfig
from megatron_dyt.errors import MegatronDyTError


class LayoutError(MegatronDyTError, ValueError):
    """A world size or batch that does not fit the config's parallel layout."""


def data_parallel_size(parallel: ParallelConfig, world: int, what: str | None = None) -> int:
    """DP = world / (TP × PP). `what` names the world in the error (default: "world size N")."""
    model_parallel = parallel.tensor * parallel.pipeline
    if world < 1 or world % model_parallel:
        raise LayoutError(
            f"{what or f'world size {world}'} is not a multiple of parallel.tensor ×"
            f" parallel.pipeline = {model_parallel}; use a multiple of {model_parallel}"
        )
    return world // model_parallel


@dataclass(frozen=True)
class BatchLayout:
    """Global batch in sequences = micro-batch × gradient accumulation × data parallel."""

    global_batch: int
    micro_batch: int
    grad_accum: int
    data_parallel: int


def batch_layout(cfg: Config, data_parallel: int) -> BatchLayout:
    t, seq = cfg.train, cfg.model.seq_length
    if t.global_batch_tokens % seq:
        raise LayoutError(
            f"train.global_batch_tokens={t.global_batch_tokens} is not a whole number of"
            f" sequences of model.seq_length={seq}; use a multiple of {seq}"
        )
    sequences = t.global_batch_tokens // seq
    per_step = t.micro_batch_size * data_parallel
    if sequences % per_step:
        raise LayoutError(
            f"the global batch of {sequences} sequences (train.global_batch_tokens /"
            f" model.seq_length) is not divisible by train.micro_batch_size ×"
            f" data-parallel size = {t.micro_batch_size} × {data_parallel}"
        )
    return BatchLayout(sequences, t.micro_batch_size, sequences // per_step, data_parallel)


def precision(cfg: Config):
    """The training dtype (`torch.dtype`): `train.precision`, with `auto` = bf16 on CUDA."""
    import torch

    p = cfg.train.precision
    if p == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    if p == "fp16" and not torch.cuda.is_available():
        raise LayoutError("train.precision='fp16' needs a GPU; on CPU use 'bf16', 'fp32' or 'auto'")
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[p]


def grad_accum_dtype(cfg: Config):
    """The dtype gradients are summed in (`train.grad_accum_dtype`; fp32 for an fp32 run)."""
    import torch

    from megatron_dyt.config import accum_error

    dtype = precision(cfg)
    if dtype == torch.float32:
        return dtype
    name = {torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
    try:  # train.precision 'auto' is resolved only now
        accum_error(name, cfg.train.grad_accum_dtype, cfg.parallel.zero_stage)
    except ValueError as exc:
        raise LayoutError(str(exc)) from None
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[
        cfg.train.grad_accum_dtype
    ]


@dataclass(frozen=True)
class RunLayout:
    """Where a run's weights and optimizer state live: the parallel sizes and the optimizer kind.

    `optimizer` names the files the state is in: 'torch' (ZeRO-0 fp32: the AdamW state dict in
    mp_rank_XX files), 'bf16' (DeepSpeed's bf16 optimizer, partitioned over DP: ZeRO-0 bf16,
    and ZeRO-1 bf16 with fp32 gradient accumulation), 'fp16' (ZeRO-0 fp16) or 'zero' (the other
    ZeRO-1/2/3 partitions).
    """

    tensor: int
    pipeline: int
    data: int
    zero_stage: int
    optimizer: str

    def describe(self) -> str:
        extra = " (bf16 optimizer)" if self.optimizer == "bf16" else ""
        return f"TP={self.tensor}/PP={self.pipeline}/DP={self.data}, ZeRO-{self.zero_stage}{extra}"

    def loads_natively(self, saved: RunLayout) -> bool:
        """Whether DeepSpeed can load a checkpoint of layout `saved` into this one as it is."""
        same = (self.tensor, self.pipeline, self.zero_stage, self.optimizer) == (
            saved.tensor,
            saved.pipeline,
            saved.zero_stage,
            saved.optimizer,
        )
        # Only the plain torch optimizer state is not partitioned over data-parallel ranks.
        return same and (self.optimizer == "torch" or self.data == saved.data)


def optimizer_kind(cfg: Config) -> str:
    """Which optimizer files a run of `cfg` writes (see `RunLayout.optimizer`)."""
    import torch

    dtype, stage = precision(cfg), cfg.parallel.zero_stage
    if stage == 1 and dtype == torch.bfloat16 and grad_accum_dtype(cfg) == torch.float32:
        return "bf16"  # DeepSpeed sums bf16 gradients in fp32 in its bf16 optimizer
    if stage:
        return "zero"
    return {torch.float32: "torch", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def run_layout(cfg: Config, world: int) -> RunLayout:
    """The layout a run of `cfg` on `world` processes has."""
    p = cfg.parallel
    dp = data_parallel_size(p, world)
    return RunLayout(p.tensor, p.pipeline, dp, p.zero_stage, optimizer_kind(cfg))
