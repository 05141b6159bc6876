"""What a run reports: metrics.jsonl, TensorBoard, optional W&B, throughput/MFU and norm stats.

DyT's behaviour is made visible, not just trained (docs/design.md §1): per norm layer, its α, the
std of its input (the paper: learned α tracks 1/std) and the fraction of inputs in tanh's flat
tails, |α·x| > 2 (tanh(2) = 0.96), where the gradient through the squash is nearly zero.
"""

from __future__ import annotations

import json
import math
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from megatron_dyt.config import Config
from megatron_dyt.norms import Derf, DyT, LayerNorm, RMSNorm

SATURATION = 2.0
# Dense bf16 peak per GPU in TFLOP/s, for MFU; `train.peak_tflops` overrides.
PEAK_TFLOPS = {
    "H100": 989.4,
    "H200": 989.4,
    "H800": 989.4,
    "A100": 312.0,
    "A800": 312.0,
    "L40S": 362.0,
}


def peak_tflops(cfg: Config) -> float | None:
    if cfg.train.peak_tflops:
        return cfg.train.peak_tflops
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def flops_per_token(cfg: Config, parameters: int) -> float:
    """Model FLOPs per trained token: 6 per matmul weight, plus 12·L·h·s for attention scores
    and their weighted sum (no causal discount, no recomputation, as MFU is usually quoted)."""
    m = cfg.model
    matmul_params = parameters - cfg.padded_vocab_size * m.hidden_size  # the lookup table is free
    return 6 * matmul_params + 12 * m.num_layers * m.hidden_size * m.seq_length


class NormStats:
    """Forward pre-hooks on every norm that record α, input std and the saturated fraction."""

    def __init__(self, model: nn.Module):
        self.norms: dict[str, nn.Module] = {}
        for module in model.modules():
            prefix = getattr(module, "canonical_prefix", None)
            if prefix is None:
                continue
            for name, sub in module.named_modules():
                if isinstance(sub, (DyT, Derf, RMSNorm, LayerNorm)):
                    self.norms[(prefix + name).rstrip(".")] = sub
        self.values: dict[str, float] = {}

    @contextmanager
    def recording(self):
        handles = [n.register_forward_pre_hook(self._hook(name)) for name, n in self.norms.items()]
        self.values = {}
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def _hook(self, name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            if name + "/input_std" in self.values:  # first micro-batch only
                return
            x = args[0].detach().float()
            self.values[name + "/input_std"] = x.std().item()
            alpha = getattr(module, "alpha", None)
            if alpha is not None and alpha.numel() == 1:
                a = alpha.detach().float()
                self.values[name + "/alpha"] = a.item()
                self.values[name + "/saturated"] = (
                    ((a * x).abs() > SATURATION).float().mean().item()
                )

        return hook

    def gather(self) -> dict[str, float]:
        """Every stage's values on every rank (pipeline stages hold different norms)."""
        parts: list[dict[str, float]] = [{} for _ in range(dist.get_world_size())]
        dist.all_gather_object(parts, self.values)
        merged: dict[str, float] = {}
        for p in parts:
            merged.update(p)
        return dict(sorted(merged.items(), key=lambda kv: _layer_sort_key(kv[0])))


def _layer_sort_key(name: str) -> tuple:
    parts = name.split(".")
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in parts)


class MetricsWriter:
    """Rank 0 writes metrics.jsonl, TensorBoard events and (optionally) W&B."""

    def __init__(self, run_dir: Path, cfg: Config, enabled: bool):
        self.enabled = enabled
        self.tb = None
        self.wandb = None
        if not enabled:
            return
        self.path = run_dir / "metrics.jsonl"
        self.file = open(self.path, "a")  # noqa: SIM115 - kept open for the run
        from torch.utils.tensorboard import SummaryWriter

        self.tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        if cfg.train.wandb_project:
            try:
                import wandb
            except ImportError:
                print("note: train.wandb_project is set but wandb is not installed; skipping W&B")
            else:
                # WANDB_MODE=offline is honoured by wandb itself.
                self.wandb = wandb.init(
                    project=cfg.train.wandb_project,
                    name=run_dir.name,
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


def _wandb_id(run_dir: Path) -> str:
    path = run_dir / ".wandb_id"
    if not path.exists():
        path.write_text(os.urandom(8).hex())
    return path.read_text().strip()
