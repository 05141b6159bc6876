"""A checkpoint as this rank's module: at the saved TP/PP layout under torchrun, each rank
reading its own shard, or TP=PP=1 in one process from the merged weights (any saved layout,
ZeRO-3 and universal checkpoints included). `megatron-dyt eval`, the lm-eval model and
generation all load this way, so they run the same weights at the same layout and dtype."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from megatron_dyt.config import Config
from megatron_dyt.errors import UsageError


@dataclass
class Loaded:
    """This rank's piece of a checkpoint's model, ready to run (eval mode)."""

    folder: Path  # the step folder
    cfg: Config  # the config the module is built with (this job's layout)
    module: torch.nn.Module  # a `LlamaModel`, or this rank's pipeline stage
    device: torch.device
    dtype: torch.dtype

    @property
    def tokenizer(self):
        """The tokenizer saved with the checkpoint (a clear error when it holds none)."""
        from megatron_dyt.checkpoint import read_tokenizer

        return read_tokenizer(self.folder)

    @property
    def step(self) -> int | None:
        from megatron_dyt.checkpoint import read_complete

        return read_complete(self.folder).get("step")


def load_checkpoint(
    checkpoint: str | Path,
    *,
    overrides: Iterable[str] | Mapping[str, Any] = (),
    dtype: str | None = None,
    device: str | None = None,
) -> Loaded:
    """`inference_config` then `load_module`: this rank's piece of `checkpoint`, at its saved
    layout when the job has a multiple of its TP × PP processes, else TP=PP=1 in one process;
    `overrides` (config keys, e.g. `parallel.tensor=1`) choose another layout."""
    _check_device(device)  # before anything is read
    folder, saved, cfg = inference_config(checkpoint, overrides)
    return load_module(folder, saved, cfg, dtype=dtype, device=device)


def _check_device(device: str | None) -> None:
    if device is not None and device != "cpu" and not str(device).startswith("cuda"):
        raise UsageError(f"device {device!r} is not allowed; allowed: cuda, cpu")


def inference_config(
    checkpoint: str | Path, overrides: Iterable[str] | Mapping[str, Any] = ()
) -> tuple[Path, Config, Config]:
    """(step folder, saved config, config to build with): the saved layout when the job has a
    multiple of TP×PP processes, TP=PP=1 for one process; no ZeRO, no sequence parallelism."""
    from megatron_dyt import checkpoint as ckpt
    from megatron_dyt.config import apply_overrides, config_from_dict

    folder = ckpt.resolve(checkpoint)
    saved = ckpt.read_config(folder)
    tree = saved.to_dict()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    layout = tree["parallel"]
    if world % (layout["tensor"] * layout["pipeline"]) and world != 1:
        raise UsageError(
            f"{world} processes cannot hold the checkpoint's layout TP {layout['tensor']} ×"
            f" PP {layout['pipeline']}; launch a multiple of {layout['tensor'] * layout['pipeline']}"
            " processes, or one process (TP=PP=1)"
        )
    if world == 1:
        layout.update(tensor=1, pipeline=1)
    layout.update(zero_stage=0, sequence_parallel=False)
    apply_overrides(tree, overrides if isinstance(overrides, Mapping) else list(overrides))
    cfg = config_from_dict(tree, f"{folder / 'config.yaml'} + overrides", saved=True)
    return folder, saved, cfg


def at_saved_layout(folder: Path, saved: Config, cfg: Config) -> bool:
    """Whether each rank can load its own shard as saved: same TP and PP (any DP), and a
    checkpoint of per-rank files (not ZeRO-3 partitions or a layout-free universal one)."""
    from megatron_dyt.checkpoint import is_universal

    s, c = saved.parallel, cfg.parallel
    return (
        (s.tensor, s.pipeline) == (c.tensor, c.pipeline)
        and s.zero_stage < 3
        and saved.padded_vocab_size == cfg.padded_vocab_size
        and not is_universal(folder)
    )


DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def resolve_dtype(name: str | None, cfg: Config) -> torch.dtype:
    """`None`/`auto`: the checkpoint's training precision (`train.precision`); else a name of
    `DTYPES`."""
    from megatron_dyt.layout import precision

    if name is None or name == "auto":
        return precision(cfg)
    if name not in DTYPES:
        raise UsageError(f"dtype {name!r} is not allowed; allowed: auto, {', '.join(DTYPES)}")
    dtype = DTYPES[name]
    if dtype == torch.float16 and not torch.cuda.is_available():
        raise UsageError("dtype float16 needs a GPU; on CPU use float32 or bfloat16")
    return dtype


def load_module(
    folder: Path,
    saved: Config,
    cfg: Config,
    dtype: str | None = None,
    device: str | None = None,
) -> Loaded:
    """Set up the process groups for `cfg` and build this rank's module with the weights of
    `folder`; a rank never holds more than its shard when the layouts match. `dtype`:
    `resolve_dtype`'s; `device`: `cpu`, or `cuda` (this rank's GPU) falling back to the CPU
    where there is none (default)."""
    from megatron.core import parallel_state as ps

    from megatron_dyt import checkpoint as ckpt
    from megatron_dyt import parallel
    from megatron_dyt.model import (
        LlamaModel,
        load_full_state_dict,
        load_local_state_dict,
        stage_module,
    )

    _check_device(device)
    use_cuda = torch.cuda.is_available() and device != "cpu"
    parallel.setup(cfg.parallel, backend=None if use_cuda else "gloo")
    where = torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")
    torch_dtype = resolve_dtype(dtype, cfg)
    stage = ps.get_pipeline_model_parallel_rank()
    module = LlamaModel(cfg) if cfg.parallel.pipeline == 1 else stage_module(cfg, stage)
    if at_saved_layout(folder, saved, cfg):
        shard = ckpt.rank_weights(folder, saved, stage, ps.get_tensor_model_parallel_rank())
        load_local_state_dict(module, shard)
        del shard
    else:
        # read tensor by tensor: each rank takes its stage's slices, never the whole model
        load_full_state_dict(module, ckpt.full_weights(folder, saved, cfg.padded_vocab_size))
    module = module.to(device=where, dtype=torch_dtype).eval()
    return Loaded(folder, cfg, module, where, torch_dtype)
