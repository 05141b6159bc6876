"""Names on disk: run folders, checkpoint tags, the marker files and DeepSpeed's file names.

    <run>/checkpoints/latest                     tag of the checkpoint to resume (atomic rename)
    <run>/checkpoints/step_XXXXXXX/              one checkpoint
        complete.json                            written last: step, world size, data position
        config.yaml                              the run's resolved config
        tokenizer.model, or tokenizer.json       the run's tokenizer (`Tokenizer.save`): a
          (+ tokenizer_config.json)              sentencepiece model, or a Hugging Face one
        rng_rankNNNNN.pt                         every rank's RNG states
        mp_rank_MM_model_states.pt               DeepSpeed: module (PP=1) and engine state
        layer_LL-model_TT-model_states.pt        DeepSpeed pipeline: one per layer and TP rank
        zero_pp_rank_D_mp_rank_MM_optim_states.pt       ZeRO-1/2/3 partitions
        bf16_zero_pp_rank_D_mp_rank_MM_optim_states.pt  DeepSpeed's bf16 optimizer (ZeRO-0)
        universal.json, params/<name>.pt         the layout-free form (`universal.py`)

MM is the model-parallel rank, stage·TP + TP rank; D the data-parallel rank; LL the pipeline
layer (`model/sharding.py`). A folder without `complete.json` is an interrupted save and is never
used (docs/design.md §4).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch

from megatron_dyt.config import Config
from megatron_dyt.data.tokenizer import HF_JSON, SP_MODEL, Tokenizer, load_tokenizer
from megatron_dyt.errors import DataError, MegatronDyTError
from megatron_dyt.fileio import read_text
from megatron_dyt.layout import RunLayout, data_parallel_size

COMPLETE = "complete.json"
LATEST = "latest"
CONFIG = "config.yaml"
WEIGHTS_ONLY = "weights_only"  # complete.json flag of an import: no optimizer state
GROUPING_KEY = "param_grouping"  # complete.json: how the optimizer's groups were formed
UNIVERSAL_META = "universal.json"  # marks the layout-free form
UNIVERSAL_PARAMS = "params"  # its folder of one file per canonical tensor
UNIVERSAL_CACHE = "universal"  # a step folder's own universal form (`resume.reshard=true`)
UNIVERSAL_FORMAT, UNIVERSAL_VERSION = "megatron-dyt-universal", 1


class CheckpointError(MegatronDyTError, ValueError):
    """A checkpoint that cannot be used; the message names the folder or file."""


class CheckpointNotice(UserWarning):
    """A checkpoint that could be used, but not the one asked for (a damaged `latest`)."""


def tag_for(step: int) -> str:
    return f"step_{step:07d}"


def rng_file(rank: int) -> str:
    return f"rng_rank{rank:05d}.pt"


def model_file(mp_rank: int) -> str:
    return f"mp_rank_{mp_rank:02d}_model_states.pt"


def layer_file(layer: int, tp_rank: int) -> str:
    return f"layer_{layer:02d}-model_{tp_rank:02d}-model_states.pt"


_OPTIM_PREFIX = {"zero": "zero_pp_rank", "bf16": "bf16_zero_pp_rank"}


def optim_file(kind: str, dp_rank: int | str, mp_rank: int) -> str:
    """ZeRO partition (`kind` 'zero') or bf16-optimizer partition (`kind` 'bf16') of a rank
    (`dp_rank` '*': the glob of all data-parallel ranks)."""
    return f"{_OPTIM_PREFIX[kind]}_{dp_rank}_mp_rank_{mp_rank:02d}_optim_states.pt"


def has_tokenizer(folder: Path) -> bool:
    """Whether a checkpoint folder holds a tokenizer (imports may have none)."""
    return (folder / HF_JSON).is_file() or (folder / SP_MODEL).is_file()


def read_tokenizer(folder: Path) -> Tokenizer:
    """The tokenizer stored with a checkpoint: tokenizer.json (with its tokenizer_config.json),
    or tokenizer.model, the only kind older checkpoints hold."""
    if not has_tokenizer(folder):
        raise CheckpointError(
            f"checkpoint '{folder}' holds no tokenizer (neither {HF_JSON} nor {SP_MODEL})"
        )
    try:
        return load_tokenizer(folder)
    except DataError as exc:
        raise CheckpointError(f"checkpoint '{folder}': {exc}") from None


def has_optim_files(folder: Path, kind: str) -> bool:
    return any(folder.glob(f"{_OPTIM_PREFIX[kind]}_*_optim_states.pt"))


def universal_param_file(folder: Path, name: str) -> Path:
    """The file of canonical tensor `name` in a universal checkpoint."""
    return folder / UNIVERSAL_PARAMS / f"{name}.pt"


def load_file(path: Path, mmap: bool = False) -> Any:
    """One checkpoint file, on CPU; a missing or unreadable file is a `CheckpointError`."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint file '{path}' is missing")
    try:
        return torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)
    except Exception as exc:
        raise CheckpointError(f"cannot read checkpoint file '{path}': {exc}") from exc


def read_complete(folder: Path) -> dict[str, Any]:
    """A checkpoint's `complete.json`; its absence means an interrupted save."""
    path = folder / COMPLETE
    if not path.is_file():
        raise CheckpointError(
            f"checkpoint '{folder}' is incomplete (no {COMPLETE}): it was interrupted while being"
            " written; remove it or use an earlier one"
        )
    try:
        done = json.loads(read_text(path, "checkpoint marker"))
    except ValueError as exc:
        raise CheckpointError(f"'{path}' is not valid JSON: {exc}") from None
    if not isinstance(done, dict) or not isinstance(done.get("step"), int):
        raise CheckpointError(f"'{path}' does not hold a checkpoint's step: it is damaged")
    return done


def complete_tags(root: Path) -> list[str]:
    """Finished checkpoints under `root` (a `checkpoints/` folder), oldest first."""
    if not root.is_dir():
        return []
    tags = [p.name for p in root.iterdir() if p.is_dir() and (p / COMPLETE).is_file()]
    return sorted(tags, key=lambda t: read_complete(root / t)["step"])


def _read_latest(root: Path) -> tuple[str | None, str | None]:
    """(the tag `root/latest` names, when it is a complete checkpoint; what is wrong with
    `latest` otherwise). Both None when there is no `latest`."""
    pointer = root / LATEST
    if not pointer.is_file():
        return None, None
    try:
        tag = pointer.read_text().strip()
    except UnicodeDecodeError:
        return None, f"'{pointer}' is not text (damaged)"
    except OSError as exc:
        return None, f"cannot read '{pointer}': {exc.strerror or exc}"
    if not tag:
        return None, f"'{pointer}' is empty"
    if "/" in tag or tag in (".", "..") or not (root / tag / COMPLETE).is_file():
        return None, f"'{pointer}' names {tag[:80]!r}, which is not a complete checkpoint here"
    return tag, None


def find_latest(root: Path, notices: list[str] | None = None) -> str | None:
    """The tag to resume from: `latest` if it names a complete checkpoint, else the newest one.
    Falling back says why in one line: appended to `notices` when given, else a warning."""
    tag, problem = _read_latest(root)
    if tag is not None:
        return tag
    tags = complete_tags(root)
    if problem is not None:
        message = problem + (
            f"; resuming from the newest complete checkpoint, {tags[-1]}"
            if tags
            else "; no checkpoint here is complete: starting from step 0"
        )
        if notices is None:
            warnings.warn(message, CheckpointNotice, stacklevel=2)
        else:
            notices.append(message)
    return tags[-1] if tags else None


def resolve(path: str | Path) -> Path:
    """A checkpoint folder from a run folder, its `checkpoints/` folder or a `step_*` folder."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint '{path}' does not exist")
    if (path / COMPLETE).is_file():
        return path
    root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    tag = find_latest(root)
    if tag is None:
        raise CheckpointError(
            f"no complete checkpoint under '{path}' (expected a run folder, its checkpoints/"
            f" folder, or a step_XXXXXXX folder holding {COMPLETE})"
        )
    return root / tag


def read_config(folder: Path) -> Config:
    """The config a checkpoint was saved with (rules added since are notices, not errors)."""
    from megatron_dyt.config import load_config

    return load_config(folder / CONFIG, saved=True)


def saved_grouping(folder: Path) -> int:
    """The optimizer grouping (`model/groups.py` GROUPING) a checkpoint was saved with."""
    return int(read_complete(folder).get(GROUPING_KEY, 1))


def saved_layout(folder: Path, cfg: Config | None = None) -> RunLayout:
    """The layout checkpoint `folder` was written at (from complete.json, else its files)."""
    done = read_complete(folder)
    if isinstance(done.get("layout"), dict):
        return RunLayout(**done["layout"])
    cfg = cfg or read_config(folder)
    p = cfg.parallel
    world = int(done.get("world_size", p.tensor * p.pipeline))
    if has_optim_files(folder, "bf16"):
        kind = "bf16"
    elif has_optim_files(folder, "zero"):
        kind = "zero"
    else:
        kind = "zero" if p.zero_stage else "torch"
    return RunLayout(p.tensor, p.pipeline, data_parallel_size(p, world), p.zero_stage, kind)


def is_universal(folder: Path) -> bool:
    """A layout-free checkpoint (`universal.py`), loadable at any layout."""
    return (folder / UNIVERSAL_META).is_file()
