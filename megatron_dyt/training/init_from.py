"""`train.init_from`: a fresh run that starts from another model's weights.

The source is a checkpoint of ours at any layout (`checkpoint.FullWeights`) or a Hugging Face
LLaMA folder (`convert.from_hf.HFWeights`); both are read tensor by tensor from memory-mapped
files, so each rank reads only its own pipeline stage's tensors and holds one full tensor at a
time, however large the model. Each rank copies its own TP slice of those tensors into the
model before DeepSpeed wraps it; the optimizer, the lr schedule and the data position start fresh (step 0). With
`train.init_from_convert_norms` an RMSNorm source becomes a DyT/Derf model, as `convert from-hf
--norm` converts it. The source must have this run's shapes: a difference is one error naming
the tensor and both shapes.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from megatron_dyt.config import Config, config_from_dict
from megatron_dyt.errors import MegatronDyTError, WeightsError
from megatron_dyt.model.sharding import FittedVocab


class InitFromError(MegatronDyTError, ValueError):
    """train.init_from names weights this run cannot start from; the message says why."""


@dataclass
class InitSource:
    """Weights to start from, by canonical name, with what the model they belong to is."""

    path: Path
    weights: Mapping[str, torch.Tensor]
    norm: dict  # the source's model.norm section
    embedding_scale: bool
    vocab_size: int  # real vocabulary (without padding)
    step: int | None  # the source checkpoint's step (None: a Hugging Face folder)

    def describe(self) -> str:
        at = f" (step {self.step})" if self.step is not None else ""
        return f"'{self.path}'{at}"


def _is_hf_folder(path: Path) -> bool:
    from megatron_dyt.checkpoint import COMPLETE

    return (path / "config.json").is_file() and not (path / COMPLETE).is_file()


def open_source(path: str | Path) -> InitSource:
    """The weights `train.init_from` names, not yet read."""
    path = Path(path)
    if not path.exists():
        raise InitFromError(
            f"train.init_from='{path}' does not exist (expected a run folder, a step_* folder"
            " or a Hugging Face model folder)"
        )
    if _is_hf_folder(path):
        return _hf_source(path)
    from megatron_dyt import checkpoint as ckpt

    folder = ckpt.resolve(path)
    saved = ckpt.read_config(folder)
    return InitSource(
        path=folder,
        weights=ckpt.FullWeights(folder, saved),
        norm=saved.model.norm.model_dump(),
        embedding_scale=saved.model.embedding_scale,
        vocab_size=saved.model.vocab_size,
        step=ckpt.read_complete(folder).get("step"),
    )


def _hf_source(path: Path) -> InitSource:
    from megatron_dyt.convert.from_hf import HFWeights, read_hf_config
    from megatron_dyt.convert.mapping import OUR_CONFIG_KEY, model_section_from_hf

    hf = read_hf_config(path)
    # our own export: its config says what the model was
    model = hf[OUR_CONFIG_KEY]["model"] if OUR_CONFIG_KEY in hf else model_section_from_hf(hf)
    return InitSource(
        path=path,
        weights=HFWeights(path, hf),
        norm=model["norm"],
        embedding_scale=bool(model.get("embedding_scale", False)),
        vocab_size=int(model["vocab_size"]),
        step=None,
    )


def _source_config(source: InitSource, cfg: Config) -> Config:
    """This run's config with the source's norms and embedding scale: the model the source's
    weights fill as they are."""
    tree = json.loads(json.dumps(cfg.to_dict()))
    tree["model"]["norm"] = source.norm
    tree["model"]["embedding_scale"] = source.embedding_scale
    tree["train"].update(init_from=None, init_from_convert_norms=False)
    return config_from_dict(tree, f"train.init_from {source.describe()}", saved=True)


def canonical_weights(source: InitSource, cfg: Config) -> Mapping[str, torch.Tensor]:
    """The source's weights under this run's canonical names, norms converted if asked; the
    vocabulary tensors are fitted to this run's padding when read."""
    m = cfg.model
    if source.vocab_size != m.vocab_size:
        raise InitFromError(
            f"train.init_from {source.describe()} has a vocabulary of {source.vocab_size} tokens;"
            f" this run's model.vocab_size is {m.vocab_size} (the tokenizers must match)"
        )
    kind, convert = source.norm["kind"], cfg.train.init_from_convert_norms
    if convert and kind != "rmsnorm":
        raise InitFromError(
            f"train.init_from_convert_norms=true converts RMSNorm models, but train.init_from"
            f" {source.describe()} has model.norm.kind={kind!r}; set it false"
        )
    if not convert and kind != m.norm.kind:
        hint = (
            "; set train.init_from_convert_norms=true to turn its RMSNorms into"
            f" {m.norm.kind} (γ kept, α = α₀)"
            if kind == "rmsnorm" and m.norm.kind in ("dyt", "derf")
            else ""
        )
        raise InitFromError(
            f"train.init_from {source.describe()} has model.norm.kind={kind!r}, this run"
            f" {m.norm.kind!r}{hint}"
        )
    source_cfg = _source_config(source, cfg)
    weights = source.weights
    if _is_hf_folder(source.path):
        from megatron_dyt.convert.mapping import from_hf_state_dict

        weights = from_hf_state_dict(weights, source_cfg, f"train.init_from {source.describe()}")
    if convert:
        from megatron_dyt.convert.from_hf import convert_norms

        weights = convert_norms(weights, source_cfg, cfg)
    return FittedVocab(weights, cfg.padded_vocab_size)


def check_names(weights: Mapping[str, torch.Tensor], cfg: Config, source: InitSource) -> None:
    """Every tensor of this run's whole model is in the source and nothing else is (names only:
    shapes are checked as each rank loads its tensors)."""
    from megatron_dyt.convert.mapping import simple_names

    fused = ("attention.qkv.weight", "mlp.gate_up.weight")
    expected = {ours for ours, _ in simple_names(cfg)}
    expected |= {f"layers.{i}.{t}" for i in range(cfg.model.num_layers) for t in fused}
    missing, extra = sorted(expected - set(weights)), sorted(set(weights) - expected)
    m = cfg.model
    config = (
        f"model.norm.kind={m.norm.kind!r}, beta={m.norm.beta},"
        f" embedding_scale={m.embedding_scale}, num_layers={m.num_layers}"
    )
    if missing:
        raise InitFromError(
            f"train.init_from {source.describe()} has no tensor '{missing[0]}', which this"
            f" run's model has ({config}); {len(missing)} such tensor(s)"
        )
    if extra:
        raise InitFromError(
            f"train.init_from {source.describe()} has tensor '{extra[0]}', which this run's"
            f" model does not ({config}); {len(extra)} such tensor(s)"
        )


def load_init_weights(model: torch.nn.Module, cfg: Config) -> InitSource:
    """Fill this rank's `model` (a `LlamaModel` or its pipeline stage, before DeepSpeed wraps
    it; ZeRO-3-partitioned parameters too) from `cfg.train.init_from`."""
    from megatron_dyt.model import load_full_state_dict

    source = open_source(cfg.train.init_from)
    weights = canonical_weights(source, cfg)
    check_names(weights, cfg, source)
    try:
        load_full_state_dict(model, weights)
    except WeightsError as exc:
        raise InitFromError(f"train.init_from {source.describe()}: {exc}") from None
    return source
