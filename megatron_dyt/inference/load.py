"""A checkpoint as this rank's module: at the saved TP/PP layout under torchrun, each rank
reading its own shard, or TP=PP=1 in one process from the merged weights (any saved layout,
ZeRO-3 and universal checkpoints included). Evaluation and generation both load this way."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

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


def inference_config(
    checkpoint: str | Path, overrides: list[str] | tuple[str, ...] = ()
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
    apply_overrides(tree, list(overrides))
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


def load_module(folder: Path, saved: Config, cfg: Config) -> Loaded:
    """Set up the process groups for `cfg` and build this rank's module with the weights of
    `folder`; a rank never holds more than its shard when the layouts match."""
    from megatron.core import parallel_state as ps

    from megatron_dyt import checkpoint as ckpt
    from megatron_dyt import parallel
    from megatron_dyt.layout import precision
    from megatron_dyt.model import (
        LlamaModel,
        load_full_state_dict,
        load_local_state_dict,
        stage_module,
    )

    parallel.setup(cfg.parallel)
    device = (
        torch.device("cuda", torch.cuda.current_device())
        if torch.cuda.is_available()
        else torch.device("cpu")
    )
    dtype = precision(cfg)
    stage = ps.get_pipeline_model_parallel_rank()
    module = LlamaModel(cfg) if cfg.parallel.pipeline == 1 else stage_module(cfg, stage)
    if at_saved_layout(folder, saved, cfg):
        shard = ckpt.rank_weights(folder, saved, stage, ps.get_tensor_model_parallel_rank())
        load_local_state_dict(module, shard)
        del shard
    else:
        full = ckpt.read_full_state_dict(folder, saved, vocab_rows=cfg.padded_vocab_size)
        load_full_state_dict(module, full)
        del full
    module = module.to(device=device, dtype=dtype).eval()
    return Loaded(folder, cfg, module, device, dtype)
