"""`megatron-dyt convert from-hf`: a LLaMA-layout HF folder → our checkpoint at a TP/PP layout.

Any local LLaMA checkpoint works (safetensors, sharded or not, or pytorch_model.bin), given as a
folder or as a repo id ORG/NAME whose snapshot is in the local Hugging Face cache (never
downloaded). A stock `LlamaForCausalLM` (LLaMA 1-3.x, TinyLlama: GQA, llama3 RoPE scaling, tied
embeddings) or a `MistralForCausalLM` without a sliding window shorter than the sequence becomes
an RMSNorm model; an export of ours comes back with its own config (norm kind, α₀, data and
training settings, all stored in its config.json). Tied embeddings are untied: the output head
starts as a copy of the embedding (the logits are unchanged; training then moves them apart,
as our model keeps the two separate, docs/design.md §12). The output is a run
folder whose `checkpoints/step_0000000` holds the weights only: `megatron-dyt train` started on
that folder loads them and begins with a fresh optimizer and schedule at step 0, and
`megatron-dyt eval` reads it as it is.

`--norm dyt|derf` turns an RMSNorm model into a DyT/Derf one for continued pretraining: every
RMSNorm γ becomes the new norm's γ, α = α₀ of the target config's site (attention / mlp /
final), β = 0 and Derf's shift = s₀. If the target model has the embedding scale, it starts at
1.0, not √d: the pretrained blocks were trained on the embeddings' own scale, and √d would
multiply the residual stream by tens. The scale and α stay learnable, so training adapts them.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from megatron_dyt.config import Config, apply_overrides, config_from_dict, load_config
from megatron_dyt.convert.mapping import (
    OUR_CONFIG_KEY,
    ConvertError,
    check_hf_config,
    check_sliding_window,
    from_hf_state_dict,
    model_section_from_hf,
)
from megatron_dyt.data.tokenizer import HF_JSON, SP_MODEL, Tokenizer, load_tokenizer
from megatron_dyt.fileio import read_text


class ConvertNotice(UserWarning):
    """Something the conversion did that the user should know about (padding, untying)."""


#: A Hub repo id: ORG/NAME (a local folder of that name is read first).
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")


def hf_hub_cache() -> Path:
    """The Hugging Face hub cache as huggingface_hub finds it, read from the environment now
    (its constants are fixed when it is first imported): HF_HUB_CACHE, the legacy
    HUGGINGFACE_HUB_CACHE, HF_HOME/hub, XDG_CACHE_HOME/huggingface/hub, ~/.cache/huggingface/hub.
    """
    env = os.environ
    cache = env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    home = env.get("HF_HOME") or os.path.join(cache, "huggingface")
    hub = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE") or os.path.join(home, "hub")
    return Path(os.path.expandvars(os.path.expanduser(hub)))


def resolve_hf_source(source: str | Path, revision: str = "main") -> tuple[Path, str]:
    """(folder, model name) of a local HF folder, or of repo id ORG/NAME in the local HF cache.

    The cache is only read (`local_files_only`): nothing is downloaded, so an import never
    depends on the network. A local folder wins over a repo id of the same name.
    """
    path = Path(source)
    if path.is_dir():
        return path, path.name
    text = str(source)
    if path.exists() or not _REPO_ID.fullmatch(text):
        raise ConvertError(
            f"'{source}' is not a folder (expected a Hugging Face model folder, or a repo id"
            " ORG/NAME whose snapshot is in the local Hugging Face cache)"
        )
    from huggingface_hub import snapshot_download
    from huggingface_hub.file_download import repo_folder_name

    cache = hf_hub_cache()
    where = cache / repo_folder_name(repo_id=text, repo_type="model")
    try:
        folder = snapshot_download(
            text, revision=revision, cache_dir=str(cache), local_files_only=True
        )
    except (OSError, ValueError) as exc:  # not cached, an incomplete snapshot, a bad id
        found = "an incomplete snapshot" if "incomplete" in str(exc) else "no snapshot"
        raise ConvertError(
            f"'{source}' is no local folder, and the Hugging Face cache has {found} of {text}"
            f" at revision {revision!r} (looked in '{where}'); download it first (`hf download"
            f" {text}` where the network is reachable), or set HF_HUB_CACHE or HF_HOME to the"
            " cache that holds it"
        ) from None
    return Path(folder), text.rpartition("/")[2]


def read_hf_config(hf_dir: Path) -> dict[str, Any]:
    path = hf_dir / "config.json"
    if not path.is_file():
        raise ConvertError(f"'{hf_dir}' has no config.json (expected a Hugging Face model folder)")
    try:
        config = json.loads(read_text(path, "Hugging Face config"))
    except json.JSONDecodeError as exc:
        raise ConvertError(f"'{path}' is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise ConvertError(f"'{path}' must hold a JSON object")
    check_hf_config(config, str(path))
    return config


def _weight_files(hf_dir: Path) -> list[Path]:
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = hf_dir / index_name
        if index.is_file():
            weight_map = json.loads(index.read_text()).get("weight_map", {})
            files = sorted({hf_dir / f for f in weight_map.values()})
            for f in files:
                if not f.is_file():
                    raise ConvertError(f"'{index}' names '{f.name}', which is missing")
            return files
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (hf_dir / name).is_file():
            return [hf_dir / name]
    raise ConvertError(
        f"'{hf_dir}' has no weights (model.safetensors, model.safetensors.index.json,"
        " pytorch_model.bin or its index)"
    )


class HFWeights(Mapping[str, torch.Tensor]):
    """The tensors of a HF folder by HF name, each read from its memory-mapped file when asked
    for and returned in fp32: a reader holds the tensors it is using, never the whole model
    (a 70B import or a 64-rank `train.init_from` would otherwise hold hundreds of GB per
    process). `shapes` gives every tensor's shape without reading it.

    A tied output head (`tie_word_embeddings`) is served as its own tensor, the embeddings: our
    model keeps the two separate. Rotary caches some old exports saved are left out (they are
    recomputed from rope_theta).
    """

    def __init__(self, hf_dir: Path, hf: dict[str, Any]):
        self.hf_dir = hf_dir
        self.shapes: dict[str, list[int]] = {}
        self._where: dict[str, Any] = {}  # name → open safetensors file or mmap'd state dict
        for path in _weight_files(hf_dir):
            try:
                source = _open_weights(path)
                names = source.keys()
            except Exception as exc:
                raise ConvertError(f"cannot read '{path}': {type(exc).__name__}: {exc}") from None
            for name in names:
                if name.endswith("rotary_emb.inv_freq"):
                    continue
                self._where[name] = (path, source)
                self.shapes[name] = _shape(source, name)
        self._alias: dict[str, str] = {}
        head, embed = "lm_head.weight", "model.embed_tokens.weight"
        if head not in self.shapes and embed in self.shapes:
            if not hf.get("tie_word_embeddings", False):
                raise ConvertError(f"'{hf_dir}': tensor '{head}' is missing")
            warnings.warn(
                "the HF model ties its output head to the embeddings (tie_word_embeddings=true);"
                " our model keeps them separate: the head starts as a copy of the embeddings",
                ConvertNotice,
                stacklevel=3,
            )
            self._alias[head] = embed
            self.shapes[head] = self.shapes[embed]

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.shapes:
            raise KeyError(name)
        stored = self._alias.get(name, name)
        path, source = self._where[stored]
        try:
            tensor = source.get_tensor(stored) if hasattr(source, "get_tensor") else source[stored]
        except Exception as exc:
            raise ConvertError(
                f"cannot read tensor '{stored}' of '{path}': {type(exc).__name__}: {exc}"
            ) from None
        return tensor.to(torch.float32, copy=True)

    def __contains__(self, name: object) -> bool:
        return name in self.shapes

    def __iter__(self) -> Iterator[str]:
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)


def _open_weights(path: Path) -> Any:
    """An open safetensors file, or a pytorch_model.bin's state dict memory-mapped (an old,
    non-zip .bin is read whole: torch cannot map it)."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        return safe_open(str(path), framework="pt", device="cpu")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as exc:
        if "mmap" not in str(exc):
            raise
        return torch.load(path, map_location="cpu", weights_only=True)


def _shape(source: Any, name: str) -> list[int]:
    if hasattr(source, "get_slice"):
        return list(source.get_slice(name).get_shape())
    return list(source[name].shape)


def target_config(
    hf: dict[str, Any],
    hf_dir: Path,
    *,
    tp: int,
    pp: int,
    config: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    norm: str | None = None,
    name: str | None = None,
) -> tuple[Config, Config]:
    """(config of the HF weights as they are, config of the checkpoint to write).

    `name`: the model's name in the new config (default: the folder's name).
    """
    source_model = model_section_from_hf(hf)
    if OUR_CONFIG_KEY in hf:  # our own export: its full config, exactly
        base = json.loads(json.dumps(hf[OUR_CONFIG_KEY]))
        source_model = base["model"]
    else:
        model_name = name or hf_dir.name
        base = json.loads(json.dumps({"model": {"name": model_name, **source_model}}))
    if config is not None:
        tree = load_config(config, overrides).to_dict()
    else:
        tree = apply_overrides(base, overrides)
    tree.setdefault("parallel", {})
    tree["parallel"].update(tensor=tp, pipeline=pp)
    if pp > 1 and tree["parallel"].get("zero_stage", 1) > 1:
        tree["parallel"]["zero_stage"] = 1
    if tp == 1:
        tree["parallel"]["sequence_parallel"] = False
    model = tree.setdefault("model", {})
    if norm is not None:
        if source_model["norm"]["kind"] != "rmsnorm":
            raise ConvertError(
                f"--norm {norm}: the HF model's norms are {source_model['norm']['kind']!r};"
                " only an RMSNorm model can be converted (its γ becomes the new norm's γ)"
            )
        model.setdefault("norm", {})["kind"] = norm
        if config is None and not any(o.startswith("model.embedding_scale=") for o in overrides):
            model["embedding_scale"] = True
    else:
        kind = model.get("norm", {}).get("kind", "rmsnorm")
        if kind != source_model["norm"]["kind"]:
            raise ConvertError(
                f"model.norm.kind={kind!r} in {_describe(hf_dir, config)}, but the HF model's"
                f" norms are {source_model['norm']['kind']!r}; pass --norm {kind} to convert"
                " an RMSNorm model, or use a config with the HF model's norm"
            )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # vocabulary padding is reported once, by the caller
        target_cfg = config_from_dict(tree, _describe(hf_dir, config))
        # The HF weights as they are: the target's shapes (checked tensor by tensor), the
        # HF model's own norms and embedding scale.
        source_tree = json.loads(json.dumps(tree))
        source_tree["model"]["norm"] = source_model["norm"]
        source_tree["model"]["embedding_scale"] = source_model["embedding_scale"]
        source = config_from_dict(source_tree, f"{hf_dir / 'config.json'} (as read)")
    check_sliding_window(hf, target_cfg.model.seq_length, str(hf_dir / "config.json"))
    if target_cfg.model.vocab_size < hf["vocab_size"] and OUR_CONFIG_KEY not in hf:
        raise ConvertError(
            f"model.vocab_size={target_cfg.model.vocab_size} is smaller than the HF model's"
            f" vocab_size={hf['vocab_size']} ({hf_dir / 'config.json'}); rows would be lost"
        )
    return source, target_cfg


def _describe(hf_dir: Path, config: str | Path | None) -> str:
    return str(config) if config is not None else f"{hf_dir / 'config.json'} + overrides"


def convert_norms(
    full: Mapping[str, torch.Tensor], source: Config, target: Config
) -> Mapping[str, torch.Tensor]:
    """RMSNorm weights → DyT/Derf weights (γ kept, α = α₀ per site, β = 0, shift = s₀); `full`
    is not read (a lazy mapping stays lazy)."""
    from collections import ChainMap

    return ChainMap(norm_conversion(source, target), full)


def norm_conversion(source: Config, target: Config) -> dict[str, torch.Tensor]:
    """The tensors an RMSNorm model lacks as a `target` model: per norm site α = α₀ of the site
    (β = 0, Derf's shift = s₀; LayerNorm's β = 0), and the embedding scale at 1.0 if only the
    target has one. The RMSNorm γ are kept as they are (same names)."""
    norm, h = target.model.norm, target.model.hidden_size
    out: dict[str, torch.Tensor] = {}
    sites = [("attention", f"layers.{i}.attention_norm") for i in range(target.model.num_layers)]
    sites += [("mlp", f"layers.{i}.mlp_norm") for i in range(target.model.num_layers)]
    sites.append(("final", "output.norm"))
    for site, name in sites:
        if norm.kind in ("dyt", "derf"):
            out[name + ".alpha"] = torch.full((1,), norm.alpha(site))
            if norm.beta:
                out[name + ".bias"] = torch.zeros(h)
        if norm.kind == "derf":
            out[name + ".shift"] = torch.full((1,), norm.derf_shift)
        if norm.kind == "layernorm":
            out[name + ".bias"] = torch.zeros(h)
    if target.model.embedding_scale and not source.model.embedding_scale:
        out["embedding.scale"] = torch.ones(1)
    return out


def import_from_hf(
    hf_dir: str | Path,
    out: str | Path,
    *,
    tp: int = 1,
    pp: int = 1,
    config: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    norm: str | None = None,
    tokenizer: str | Path | None = None,
    force: bool = False,
    progress: bool = True,
    revision: str = "main",
) -> Path:
    """Convert; returns the checkpoint folder (`OUT/checkpoints/step_0000000`).

    `hf_dir` is a folder or a repo id ORG/NAME in the local HF cache (at `revision`, a branch,
    tag or commit; see `resolve_hf_source`). The tokenizer copied into the checkpoint is
    `tokenizer` (a .model, a tokenizer.json or a folder holding one) or the HF folder's own (its
    tokenizer.json, else its tokenizer.model).
    """
    import shutil

    from megatron_dyt.checkpoint import write_checkpoint
    from megatron_dyt.convert.outdir import finish_out_dir, prepare_out_dir

    out = Path(out)
    if norm is not None and norm not in ("dyt", "derf"):
        raise ConvertError(f"--norm {norm!r}: allowed: dyt, derf")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise ConvertError(f"output '{out}' exists and is not empty; pass --force to replace it")
    hf_dir, name = resolve_hf_source(hf_dir, revision)
    tok = _import_tokenizer(hf_dir, tokenizer)
    hf = read_hf_config(hf_dir)
    source, target = target_config(
        hf, hf_dir, tp=tp, pp=pp, config=config, overrides=overrides, norm=norm, name=name
    )
    weights = HFWeights(hf_dir, hf)
    rows = weights.shapes.get("model.embed_tokens.weight", [0])[0]
    source_cfg = _with_vocab(source, target)
    full = from_hf_state_dict(weights, source_cfg, str(hf_dir))
    if norm is not None:
        full = convert_norms(full, source, target)
    if target.padded_vocab_size > rows:
        warnings.warn(
            f"vocabulary of {rows} rows padded with zero rows to {target.padded_vocab_size}"
            f" (model.make_vocab_size_divisible_by={target.model.make_vocab_size_divisible_by}"
            f", parallel.tensor={tp}); the extra rows match no token",
            ConvertNotice,
            stacklevel=2,
        )
    tmp = prepare_out_dir(out, force)
    try:
        folder = write_checkpoint(
            full,
            target,
            tmp,
            tokenizer=tok,
            info={"imported_from": str(hf_dir.resolve())},
            progress=progress,
        )
        finish_out_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out / folder.relative_to(tmp)


def _import_tokenizer(hf_dir: Path, tokenizer: str | Path | None) -> Tokenizer | None:
    """`--tokenizer` when given, else the HF folder's own; None (with a notice) without one."""
    if tokenizer is not None:
        return load_tokenizer(tokenizer)
    if any((hf_dir / name).is_file() for name in (HF_JSON, SP_MODEL)):
        return load_tokenizer(hf_dir)
    warnings.warn(
        f"'{hf_dir}' holds no tokenizer (neither {HF_JSON} nor {SP_MODEL}): the checkpoint has"
        " none; pass --tokenizer PATH (`eval` reads it from the checkpoint, `train` from"
        " data.tokenizer)",
        ConvertNotice,
        stacklevel=3,
    )
    return None


def _with_vocab(source: Config, target: Config) -> Config:
    """The source config at the target's padded vocabulary (fewer HF rows are padded)."""
    multiple = target.padded_vocab_size
    return source.model_copy(
        update={
            "model": source.model.model_copy(
                update={
                    "vocab_size": target.model.vocab_size,
                    "make_vocab_size_divisible_by": multiple,
                }
            ),
            "parallel": target.parallel,
        }
    )
