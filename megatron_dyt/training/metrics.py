"""What a run reports: metrics.jsonl, TensorBoard, optional W&B, throughput/MFU and norm stats.

DyT's behaviour is made visible, not just trained (docs/design.md §1): per norm layer, its α, the
std of its input (the paper: learned α tracks 1/std) and the fraction of inputs in tanh's flat
tails, |α·x| > 2 (tanh(2) = 0.96), where the gradient through the squash is nearly zero; every
`train.stats_interval` steps and at the last step, at the cost of one all_reduce.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from megatron_dyt.config import Config
from megatron_dyt.fileio import atomic_write
from megatron_dyt.model import norm_names
from megatron_dyt.model.flops import PEAK_TFLOPS, gpu_model
from megatron_dyt.norms import Derf, DyT, LayerNorm, RMSNorm, stat_names


def peak_tflops(cfg: Config) -> float | None:
    if cfg.train.peak_tflops:
        return cfg.train.peak_tflops
    if not torch.cuda.is_available():
        return None
    gpu = gpu_model(torch.cuda.get_device_name())
    return PEAK_TFLOPS[gpu] if gpu else None


class NormStats:
    """α, input std and saturated fraction per DyT/Derf layer (input std only for RMSNorm and
    LayerNorm), every `train.stats_interval` steps, in one collective.

    The norms record their own statistics while `recording()` is on (`megatron_dyt/norms.py`):
    device tensors of the first micro-batch, no hooks, so the fused residual kernels keep running,
    and no host sync inside the step. `gather()` then fills a table with a row per norm of the
    whole model (`norm_names`, the same on every rank) and a count, sums it over all ranks in one
    all_reduce and divides.

    So a recorded value is the mean, over every rank that holds the norm, of that rank's
    statistic on its first micro-batch of the step: over the data-parallel ranks (different
    samples) and the tensor-parallel ranks (copies of the norm that see the same activation, or
    under sequence parallelism each its own part of the sequence); pipeline stages hold different
    norms, each averaged over the ranks of its own stage. The input std is therefore a mean of
    per-rank stds, not the std of all their inputs together; α is the same on every rank.
    """

    def __init__(self, model: nn.Module, cfg: Config, device: torch.device):
        self.names = norm_names(cfg.model)
        self.fields = stat_names(cfg.model.norm.kind)
        self.device = device
        index = {name: i for i, name in enumerate(self.names)}
        self.local: dict[int, nn.Module] = {}  # row of the table -> this rank's norm
        for module in model.modules():
            prefix = getattr(module, "canonical_prefix", None)
            if prefix is None:
                continue
            for name, sub in module.named_modules():
                if isinstance(sub, (DyT, Derf, RMSNorm, LayerNorm)):
                    full = (prefix + name).rstrip(".")
                    if full not in index:
                        raise AssertionError(f"norm {full!r} is not in norm_names: {self.names}")
                    self.local[index[full]] = sub

    @contextmanager
    def recording(self) -> Iterator[None]:
        """The norms keep the statistics of their first input (micro-batch) inside this block."""
        for norm in self.local.values():
            norm.stats = None
            norm.record_stats = True
        try:
            yield
        finally:
            for norm in self.local.values():
                norm.record_stats = False

    def gather(self) -> dict[str, float]:
        """Every norm's statistics on every rank, `{'layers.0.attention_norm/alpha': …}` in model
        order; a collective (one all_reduce), so every rank calls it on the same steps."""
        width = len(self.fields)
        table = torch.zeros(len(self.names), width + 1, device=self.device)
        rows = [i for i, norm in self.local.items() if norm.stats is not None]
        if rows:
            values = torch.stack([self.local[i].stats.to(self.device) for i in rows])
            ones = torch.ones(len(rows), 1, device=self.device)
            index = torch.tensor(rows, device=self.device)
            table.index_copy_(0, index, torch.cat([values, ones], dim=1))
        for norm in self.local.values():
            norm.stats = None
        dist.all_reduce(table)
        out: dict[str, float] = {}
        for name, row in zip(self.names, table.tolist(), strict=True):  # one copy to the host
            count = row[width]
            if count > 0:
                for field, value in zip(self.fields, row, strict=False):
                    out[f"{name}/{field}"] = value / count
        return out


class StepTimer:
    """Step times of one invocation: the mean since the last log line (its throughput) and the
    time the remaining steps take at the mean of all of them."""

    def __init__(self, steps_left: int):
        self.left = steps_left
        self.total = self.interval = 0.0
        self.count = self.interval_steps = 0

    def add(self, seconds: float) -> None:
        self.left -= 1
        self.total += seconds
        self.count += 1
        self.interval += seconds
        self.interval_steps += 1

    def take(self) -> tuple[float, float]:
        """(mean seconds per step since the last call, estimated seconds left); starts a new
        interval."""
        mean = self.interval / max(1, self.interval_steps)
        self.interval, self.interval_steps = 0.0, 0
        return mean, self.total / max(1, self.count) * max(0, self.left)


def log_line(
    step: int,
    total: int,
    *,
    loss: float,
    lr: float,
    grad_norm: float | None,
    tokens_per_s: float,
    tflops_per_gpu: float,
    mfu: float | None,
    memory: tuple[str, float],
    seconds_left: float,
) -> str:
    """One plain line per `train.log_interval` steps, for logs no terminal reads (SLURM's):
    `key value` fields separated by ` | `, the same every time, so `grep`/`awk` can read them."""
    left = int(seconds_left)
    fields = [
        f"step {step}/{total}",
        f"loss {loss:.4f}",
        f"lr {lr:.3e}",
        f"grad_norm {grad_norm:.3f}" if grad_norm is not None else "grad_norm -",
        f"tokens/s {tokens_per_s:,.0f}",
        f"TFLOP/s/GPU {tflops_per_gpu:.1f}",
        f"MFU {100 * mfu:.1f}%" if mfu is not None else "MFU -",
        f"{memory[0]} {memory[1]:.1f}GiB",
        f"left {left // 3600}:{left // 60 % 60:02d}:{left % 60:02d}",
    ]
    return " | ".join(fields)


class MetricsWriter:
    """Rank 0 writes metrics.jsonl, TensorBoard events and (optionally) W&B.

    A run resumed at step N after a crash has logged steps past N that it will take again:
    their records are dropped first (TensorBoard's too), so every step is in the log once.
    """

    def __init__(self, run_dir: Path, cfg: Config, enabled: bool, start_step: int = 0):
        self.enabled = enabled
        self.tb = None
        self.wandb = None
        if not enabled:
            return
        self.path = run_dir / "metrics.jsonl"
        _drop_records_after(self.path, start_step)
        self.file = open(self.path, "a")  # noqa: SIM115 - kept open for the run
        from torch.utils.tensorboard import SummaryWriter

        self.tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=start_step + 1)
        if cfg.train.wandb_project:
            try:
                import wandb
            except ImportError:
                print("note: train.wandb_project is set but wandb is not installed; skipping W&B")
            else:
                # WANDB_MODE=offline is honoured by wandb itself. The id is the run folder's,
                # so a requeued or resumed job continues the same W&B run.
                t = cfg.train
                self.wandb = wandb.init(
                    project=t.wandb_project,
                    entity=t.wandb_entity,
                    name=t.wandb_name or run_dir.name,
                    group=t.wandb_group,
                    tags=list(t.wandb_tags) or None,
                    dir=str(run_dir),
                    config=cfg.to_dict(),
                    resume="allow",
                    id=_wandb_id(run_dir),
                )

    def write(self, step: int, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {
            k: (None if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in record.items()
        }
        self.file.write(json.dumps({"step": step, **clean}) + "\n")
        self.file.flush()
        for key, value in record.items():
            if isinstance(value, (int, float)) and value is not None and math.isfinite(value):
                self.tb.add_scalar(key, value, step)
        if self.wandb is not None:
            self.wandb.log(record, step=step)

    def close(self) -> None:
        if not self.enabled:
            return
        self.file.close()
        self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def _drop_records_after(path: Path, step: int) -> None:
    """Rewrite metrics.jsonl (atomically) without the records of steps after `step`; a line
    a crash cut short is dropped too."""
    if not path.is_file():
        return
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
            keep = isinstance(record, dict) and int(record.get("step", 0)) <= step
        except (ValueError, TypeError):
            keep = False
        if keep:
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        atomic_write(path, "".join(f"{line}\n" for line in kept))


def _wandb_id(run_dir: Path) -> str:
    path = run_dir / ".wandb_id"
    if not path.exists():
        path.write_text(os.urandom(8).hex())
    return path.read_text().strip()
