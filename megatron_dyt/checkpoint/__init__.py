"""Checkpoints: the one package that knows what is on disk (docs/design.md §4).

| module | holds |
|---|---|
| `format` | names and tags, DeepSpeed's file names, `complete.json`, the stored tokenizer, finding and resolving checkpoints, the saved layout |
| `protocol` | saving and loading a training checkpoint with every rank (complete.json, then an atomic `latest`) |
| `reader` | reading a checkpoint at its saved layout: one rank's weights, the full weights, a stage with its Adam moments |
| `universal` | the layout-free form, and resuming from it at any layout |
| `writer` | writing full weights as a weights-only checkpoint at any layout (imports) |
| `deepspeed_state` | everything that touches DeepSpeed's internals |

Training, evaluation, conversion and launching use this package; it uses none of them.
"""

from megatron_dyt.checkpoint.format import (
    COMPLETE,
    LATEST,
    WEIGHTS_ONLY,
    CheckpointError,
    CheckpointNotice,
    find_latest,
    has_tokenizer,
    is_universal,
    read_complete,
    read_config,
    read_tokenizer,
    resolve,
    saved_grouping,
    saved_layout,
    tag_for,
)
from megatron_dyt.checkpoint.protocol import load, save
from megatron_dyt.checkpoint.reader import (
    FullWeights,
    full_weights,
    rank_weights,
    read_full_state_dict,
)
from megatron_dyt.checkpoint.universal import load_universal, universal_of
from megatron_dyt.checkpoint.writer import write_checkpoint

__all__ = [
    "COMPLETE",
    "FullWeights",
    "LATEST",
    "WEIGHTS_ONLY",
    "CheckpointError",
    "CheckpointNotice",
    "find_latest",
    "has_tokenizer",
    "is_universal",
    "load",
    "load_universal",
    "rank_weights",
    "read_complete",
    "read_config",
    "read_full_state_dict",
    "full_weights",
    "read_tokenizer",
    "resolve",
    "save",
    "saved_grouping",
    "saved_layout",
    "tag_for",
    "universal_of",
    "write_checkpoint",
]
