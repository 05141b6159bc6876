"""Our canonical weights ↔ Hugging Face LLaMA weights, and our config ↔ a HF `config.json`.

Layouts (full, unsharded tensors; `out × in` like `nn.Linear`):

- Our fused QKV is laid out per key/value group: for each group g, the rows of its q heads, then
  k_g, then v_g. HF keeps three matrices; query head h uses key/value head h // (heads/kv_heads),
  the same grouping, so the split is a reshape and no row moves inside a head.
- RoPE: both rotate halves (`rotate_half`, cos/sin of [freqs, freqs]), so q/k rows need no
  permutation (Meta's original interleaved checkpoints do; their HF versions are already permuted).
- Our fused gate/up weight is [gate; up] as a full tensor (TP stride 2 only changes how ranks
  slice it), so HF's gate_proj is the first half and up_proj the second.
- The vocabulary is exported padded (HF `vocab_size` = our padded vocab, as GPT-NeoX's export
  does), so a round trip keeps every row; the tokenizer holds the real vocabulary.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch

from megatron_dyt.config import Config
from megatron_dyt.errors import MegatronDyTError
from megatron_dyt.model.sharding import fit_rows, is_vocab_tensor

#: `model_type` of exports whose norms are not stock LLaMA's (custom modeling code).
CUSTOM_MODEL_TYPE = "megatron_dyt_llama"
CUSTOM_ARCH = "MegatronDytLlamaForCausalLM"
LLAMA_ARCH = "LlamaForCausalLM"
#: Mistral without a sliding window (or one no shorter than our sequence) is LLaMA's function.
MISTRAL_ARCH = "MistralForCausalLM"
#: model_type → the architecture a config.json of that type names.
SUPPORTED_TYPES = {"llama": LLAMA_ARCH, "mistral": MISTRAL_ARCH, CUSTOM_MODEL_TYPE: CUSTOM_ARCH}
#: The llama3 RoPE keys of a HF config (rope_scaling / rope_parameters) = ours.
LLAMA3_ROPE_KEYS = (
    "factor",
    "low_freq_factor",
    "high_freq_factor",
    "original_max_position_embeddings",
)
#: Key under which an export stores the full megatron-dyt config (for an exact re-import).
OUR_CONFIG_KEY = "megatron_dyt_config"

_NORM_SITES = {
    "attention_norm": "input_layernorm",
    "mlp_norm": "post_attention_layernorm",
}


class ConvertError(MegatronDyTError, ValueError):
    """Input a conversion cannot use; the message names the file, key or tensor."""


def needs_custom_code(cfg: Config) -> bool:
    """Stock `LlamaForCausalLM` holds RMSNorm models without an embedding scale only."""
    return cfg.model.norm.kind != "rmsnorm" or cfg.model.embedding_scale


# ---- names ----------------------------------------------------------------------------------


def _norm_names(ours: str, hf: str, kind: str, beta: bool) -> list[tuple[str, str]]:
    params = {
        "rmsnorm": ["weight"],
        "layernorm": ["weight", "bias"],
        "dyt": ["alpha", "weight"] + (["bias"] if beta else []),
        "derf": ["alpha", "shift", "weight"] + (["bias"] if beta else []),
    }[kind]
    return [(f"{ours}.{p}", f"{hf}.{p}") for p in params]


def simple_names(cfg: Config) -> list[tuple[str, str]]:
    """(our canonical name, HF name) of every tensor that maps one to one."""
    m, norm = cfg.model, cfg.model.norm
    pairs = [("embedding.word.weight", "model.embed_tokens.weight")]
    if m.embedding_scale:
        pairs.append(("embedding.scale", "model.embed_tokens.scale"))
    for i in range(m.num_layers):
        ours, hf = f"layers.{i}.", f"model.layers.{i}."
        for site, hf_site in _NORM_SITES.items():
            pairs += _norm_names(ours + site, hf + hf_site, norm.kind, norm.beta)
        pairs.append((ours + "attention.proj.weight", hf + "self_attn.o_proj.weight"))
        pairs.append((ours + "mlp.down.weight", hf + "mlp.down_proj.weight"))
    pairs += _norm_names("output.norm", "model.norm", norm.kind, norm.beta)
    pairs.append(("output.head.weight", "lm_head.weight"))
    return pairs


def expected_hf_shapes(cfg: Config) -> dict[str, list[int]]:
    """Every HF tensor of the model `cfg` describes, with its shape."""
    m = cfg.model
    h, v, f, d = m.hidden_size, cfg.padded_vocab_size, m.ffn_hidden_size, m.head_dim
    shapes: dict[str, list[int]] = {}
    for ours, hf in simple_names(cfg):
        if ours.endswith(("alpha", "shift", "scale")):
            shapes[hf] = [1]
        elif ours.endswith(("norm.weight", "norm.bias")):
            shapes[hf] = [h]
        elif ours.endswith("proj.weight"):
            shapes[hf] = [h, m.num_heads * d]
        elif ours.endswith("down.weight"):
            shapes[hf] = [h, f]
        else:  # embedding, head
            shapes[hf] = [v, h]
    for i in range(m.num_layers):
        hf = f"model.layers.{i}."
        shapes[hf + "self_attn.q_proj.weight"] = [m.num_heads * d, h]
        shapes[hf + "self_attn.k_proj.weight"] = [m.kv_heads * d, h]
        shapes[hf + "self_attn.v_proj.weight"] = [m.kv_heads * d, h]
        shapes[hf + "mlp.gate_proj.weight"] = [f, h]
        shapes[hf + "mlp.up_proj.weight"] = [f, h]
    return shapes


# ---- tensors --------------------------------------------------------------------------------


_FUSED = ("attention.qkv.weight", "mlp.gate_up.weight")


def _layer_of(name: str) -> tuple[int, str] | None:
    """`layers.7.mlp.down.weight` → (7, 'mlp.down.weight'); None outside the blocks."""
    match = re.fullmatch(r"layers\.(\d+)\.(.+)", name)
    return (int(match.group(1)), match.group(2)) if match else None


class _Lazy(Mapping[str, torch.Tensor]):
    """A mapping whose tensors are made from another mapping's when asked for (a conversion
    then holds a few tensors at a time, not two copies of the model). Subclasses fill
    `self._names` and define `_make`."""

    _names: dict[str, None]

    def _make(self, name: str) -> torch.Tensor:
        raise NotImplementedError

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._names:
            raise KeyError(name)
        return self._make(name)

    def __contains__(self, name: object) -> bool:
        return name in self._names

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


class _ToHF(_Lazy):
    def __init__(self, full: Mapping[str, torch.Tensor], cfg: Config):
        self.full, self.cfg = full, cfg
        self._simple = {hf: ours for ours, hf in simple_names(cfg)}
        self._names = dict.fromkeys(_hf_order(expected_hf_shapes(cfg)))
        self._last: tuple[str, torch.Tensor] | None = None  # q, k and v share one qkv read

    def _source(self, name: str) -> torch.Tensor:
        if self._last is None or self._last[0] != name:
            self._last = (name, self.full[name])
        return self._last[1]

    def _make(self, name: str) -> torch.Tensor:
        if name in self._simple:
            return self.full[self._simple[name]].contiguous()
        m = self.cfg.model
        d, kv, q_per_kv, h = m.head_dim, m.kv_heads, m.num_heads // m.kv_heads, m.hidden_size
        layer, what = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", name).groups()
        if what.startswith("self_attn."):
            groups = self._source(f"layers.{layer}.attention.qkv.weight").reshape(
                kv, q_per_kv + 2, d, h
            )
            index = {"q_proj": slice(0, q_per_kv), "k_proj": q_per_kv, "v_proj": q_per_kv + 1}
            return groups[:, index[what.split(".")[1]]].reshape(-1, h).contiguous()
        gate, up = self._source(f"layers.{layer}.mlp.gate_up.weight").chunk(2, dim=0)
        return (gate if what == "mlp.gate_proj.weight" else up).contiguous()


def to_hf_state_dict(full: Mapping[str, torch.Tensor], cfg: Config) -> Mapping[str, torch.Tensor]:
    """Our full state dict (canonical names) → HF LLaMA tensors, in HF's usual order; each is
    made when asked for, `full` read a tensor at a time."""
    m = cfg.model
    wanted = [ours for ours, _ in simple_names(cfg)]
    wanted += [f"layers.{i}.{name}" for i in range(m.num_layers) for name in _FUSED]
    missing = [ours for ours in wanted if ours not in full]
    if missing:
        raise ConvertError(f"tensor '{missing[0]}' is missing from the checkpoint")
    return _ToHF(full, cfg)


def _hf_order(names: Iterable[str]) -> list[str]:
    """Embedding, then layer by layer, then the final norm and head (nice shard boundaries)."""

    def key(name: str) -> tuple:
        match = re.match(r"model\.layers\.(\d+)\.", name)
        if match:
            return (1, int(match.group(1)), name)
        return (0 if "embed" in name else 2, 0, name)

    return sorted(names, key=key)


class _FromHF(_Lazy):
    def __init__(self, hf: Mapping[str, torch.Tensor], cfg: Config):
        self.hf, self.cfg = hf, cfg
        self._simple = dict(simple_names(cfg))
        fused = [f"layers.{i}.{name}" for i in range(cfg.model.num_layers) for name in _FUSED]
        self._names = dict.fromkeys([*self._simple, *fused])

    def _make(self, name: str) -> torch.Tensor:
        if name in self._simple:
            tensor = self.hf[self._simple[name]]
            return fit_rows(tensor, self.cfg.padded_vocab_size) if is_vocab_tensor(name) else tensor
        m = self.cfg.model
        d, kv, q_per_kv, h = m.head_dim, m.kv_heads, m.num_heads // m.kv_heads, m.hidden_size
        layer, what = _layer_of(name)
        hf = f"model.layers.{layer}."
        if what == "attention.qkv.weight":
            q = self.hf[hf + "self_attn.q_proj.weight"].reshape(kv, q_per_kv, d, h)
            k = self.hf[hf + "self_attn.k_proj.weight"].reshape(kv, 1, d, h)
            v = self.hf[hf + "self_attn.v_proj.weight"].reshape(kv, 1, d, h)
            return torch.cat([q, k, v], dim=1).reshape(-1, h)
        return torch.cat([self.hf[hf + "mlp.gate_proj.weight"], self.hf[hf + "mlp.up_proj.weight"]])


def from_hf_state_dict(
    hf: Mapping[str, torch.Tensor], cfg: Config, source: str
) -> Mapping[str, torch.Tensor]:
    """HF LLaMA tensors → our full state dict for `cfg`, each tensor made when asked for.

    The shapes are checked against `cfg` here, before anything is read (from `hf.shapes` where
    the mapping has them, as `HFWeights` does). The vocabulary tensors get
    `cfg.padded_vocab_size` rows: padded with zeros, or cut when the source was padded for
    another TP size (rows past `model.vocab_size` match no token).
    """
    m = cfg.model
    shapes = getattr(hf, "shapes", None) or {k: list(v.shape) for k, v in hf.items()}
    expected = expected_hf_shapes(cfg)
    vocab_rows = {"model.embed_tokens.weight", "lm_head.weight"}
    for name, shape in expected.items():
        if name not in shapes:
            raise ConvertError(f"{source}: tensor '{name}' is missing")
        got = list(shapes[name])
        ok = got == shape
        if name in vocab_rows:  # every token needs a row; padding rows are fitted below
            ok = got[1:] == shape[1:] and got[0] >= m.vocab_size
        if not ok:
            raise ConvertError(
                f"{source}: tensor '{name}' has shape {got}, the target config expects"
                f" {shape}{_shape_hint(name, cfg)}"
            )
    extra = sorted(set(shapes) - set(expected))
    if extra:
        raise ConvertError(
            f"{source}: tensor '{extra[0]}' has no place in the target model"
            f" (model.norm.kind={m.norm.kind!r}, beta={m.norm.beta},"
            f" embedding_scale={m.embedding_scale}); {len(extra)} such tensor(s)"
        )
    return _FromHF(hf, cfg)


def _shape_hint(name: str, cfg: Config) -> str:
    m = cfg.model
    if "q_proj" in name or "o_proj" in name:
        return f" (model.num_heads={m.num_heads} × head_dim {m.head_dim}, model.hidden_size={m.hidden_size})"
    if "k_proj" in name or "v_proj" in name:
        return f" (model.num_kv_heads={m.kv_heads} × head_dim {m.head_dim}, model.hidden_size={m.hidden_size})"
    if "mlp" in name:
        return f" (model.ffn_hidden_size={m.ffn_hidden_size}, model.hidden_size={m.hidden_size})"
    if "embed_tokens.weight" in name or "lm_head" in name:
        return (
            f" (at least model.vocab_size={m.vocab_size} rows, model.hidden_size={m.hidden_size})"
        )
    return f" (model.hidden_size={m.hidden_size})"


# ---- config ---------------------------------------------------------------------------------


def hf_config(cfg: Config, dtype: torch.dtype) -> dict[str, Any]:
    """The `config.json` of an export: stock LLaMA keys, plus the norm keys for custom code."""
    m = cfg.model
    dtype_name = str(dtype).removeprefix("torch.")
    out: dict[str, Any] = {
        "architectures": [LLAMA_ARCH],
        "model_type": "llama",
        "hidden_size": m.hidden_size,
        "intermediate_size": m.ffn_hidden_size,
        "num_hidden_layers": m.num_layers,
        "num_attention_heads": m.num_heads,
        "num_key_value_heads": m.kv_heads,
        "head_dim": m.head_dim,
        "vocab_size": cfg.padded_vocab_size,
        "max_position_embeddings": m.seq_length,
        "hidden_act": "silu",
        "rms_norm_eps": m.norm.eps,
        # rope_theta and rope_scaling for transformers 4.x, rope_parameters for 5.x
        **_hf_rope(cfg),
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "initializer_range": m.init.std,
        # the tokenizer's: `to_hf.export_to_hf` fills them in (None without a tokenizer)
        "bos_token_id": None,
        "eos_token_id": None,
        "pad_token_id": None,
        "use_cache": True,
        "torch_dtype": dtype_name,
        "dtype": dtype_name,
    }
    if needs_custom_code(cfg):
        n = m.norm
        out.update(
            architectures=[CUSTOM_ARCH],
            model_type=CUSTOM_MODEL_TYPE,
            auto_map={
                "AutoConfig": "configuration_megatron_dyt.MegatronDytLlamaConfig",
                "AutoModel": "modeling_megatron_dyt.MegatronDytLlamaModel",
                "AutoModelForCausalLM": "modeling_megatron_dyt.MegatronDytLlamaForCausalLM",
            },
            norm_type=n.kind,
            norm_beta=n.beta if n.kind in ("dyt", "derf") else n.kind == "layernorm",
            dyt_squash=n.squash,
            norm_alpha_attn=n.alpha_attn,
            norm_alpha_mlp=n.alpha_mlp,
            norm_alpha_final=n.alpha_final,
            derf_shift=n.derf_shift,
            embedding_scale=m.embedding_scale,
        )
    out[OUR_CONFIG_KEY] = cfg.to_dict()
    return out


def _hf_rope(cfg: Config) -> dict[str, Any]:
    """The RoPE keys of an export's config.json, read the same by transformers 4.x and 5.x."""
    m = cfg.model
    if m.rope_scaling.type == "none":
        return {
            "rope_theta": m.rope_theta,
            "rope_parameters": {"rope_type": "default", "rope_theta": m.rope_theta},
            "rope_scaling": None,
        }
    scaling = {"rope_type": m.rope_scaling.type}
    scaling.update({key: getattr(m.rope_scaling, key) for key in LLAMA3_ROPE_KEYS})
    return {
        "rope_theta": m.rope_theta,
        "rope_parameters": {**scaling, "rope_theta": m.rope_theta},
        "rope_scaling": scaling,  # 5.x prefers it to rope_parameters: the same values
    }


_REQUIRED = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "vocab_size",
)


def check_hf_config(hf: Mapping[str, Any], source: str) -> None:
    """Refuse a config.json that is not a LLaMA layout our model can hold; names the key.

    The sliding window of a Mistral config depends on the sequence length the import uses, so
    `check_sliding_window` checks it once the target config is known.
    """
    model_type = hf.get("model_type")
    allowed = ", ".join(f"{t!r} ({a})" for t, a in SUPPORTED_TYPES.items())
    if model_type not in SUPPORTED_TYPES:
        raise ConvertError(
            f"{source}: model_type={model_type!r} is not supported; allowed: {allowed}"
        )
    archs = hf.get("architectures") or []
    if archs and not set(archs) & set(SUPPORTED_TYPES.values()):
        raise ConvertError(
            f"{source}: architectures={archs!r} is not supported; allowed:"
            f" {', '.join(SUPPORTED_TYPES.values())}"
        )
    for key in _REQUIRED:
        if not isinstance(hf.get(key), int) or hf[key] <= 0:
            raise ConvertError(f"{source}: {key}={hf.get(key)!r} must be a positive integer")
    refusals = {
        "hidden_act": ("silu", hf.get("hidden_act", "silu")),
        "attention_bias": (False, bool(hf.get("attention_bias", False))),
        "mlp_bias": (False, bool(hf.get("mlp_bias", False))),
    }
    for key, (allowed_value, value) in refusals.items():
        if value != allowed_value:
            raise ConvertError(
                f"{source}: {key}={value!r} is not supported (our LLaMA has {key}={allowed_value!r})"
            )
    rope_settings(hf, source)  # raises on a RoPE variant we do not have
    heads, hidden = hf["num_attention_heads"], hf["hidden_size"]
    head_dim = hf.get("head_dim") or hidden // heads
    if head_dim * heads != hidden:
        raise ConvertError(
            f"{source}: head_dim={head_dim} × num_attention_heads={heads} != hidden_size={hidden};"
            " our attention needs head_dim = hidden_size / num_attention_heads"
        )


def check_sliding_window(hf: Mapping[str, Any], seq_length: int, source: str) -> None:
    """A sliding window at least as long as the sequence masks nothing: the model is LLaMA's.

    A token attends to itself and the sliding_window - 1 tokens before it (transformers' mask),
    so with seq_length <= sliding_window every causal pair is inside the window.
    """
    window = hf.get("sliding_window")
    if window is None:
        return
    if not isinstance(window, int) or isinstance(window, bool) or window <= 0:
        raise ConvertError(
            f"{source}: sliding_window={window!r} must be null or a positive integer"
        )
    if window < seq_length:
        raise ConvertError(
            f"{source}: sliding_window={window} is shorter than model.seq_length={seq_length};"
            " our attention is fully causal, the same function only up to sliding_window tokens:"
            f" import with the override model.seq_length={window} (or less), or use a model"
            " with sliding_window null"
        )


def rope_settings(hf: Mapping[str, Any], source: str) -> dict[str, Any]:
    """{rope_theta, rope_scaling (our section)} of a HF config; unsupported RoPE → ConvertError.

    Configs in the wild hold RoPE in two forms: transformers 4.x writes `rope_theta` and
    `rope_scaling` ({rope_type | type, factor, …} or null), 5.x writes `rope_parameters`
    ({rope_type, rope_theta, factor, …}). Like 5.x, a non-empty `rope_scaling` wins.
    """
    scaling, params = hf.get("rope_scaling"), hf.get("rope_parameters")
    key = "rope_scaling" if scaling else "rope_parameters"
    rope = scaling or params or {}
    if not isinstance(rope, Mapping):
        raise ConvertError(f"{source}: {key}={rope!r} must be a mapping or null")
    rope_type = rope.get("rope_type", rope.get("type")) or "default"
    if rope_type not in ("default", "llama3"):
        raise ConvertError(
            f"{source}: {key} rope_type={rope_type!r} is not supported; allowed: 'default'"
            " (plain RoPE), 'llama3' (Llama 3.1+ frequency rescaling)"
        )
    theta = rope.get("rope_theta") or (params or {}).get("rope_theta") or hf.get("rope_theta")
    theta = 10000.0 if theta is None else theta
    if not isinstance(theta, (int, float)) or isinstance(theta, bool) or theta <= 0:
        raise ConvertError(f"{source}: rope_theta={theta!r} must be a positive number")
    partial = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        raise ConvertError(
            f"{source}: partial_rotary_factor={partial!r} is not supported (our RoPE rotates"
            " the whole head: 1.0)"
        )
    out: dict[str, Any] = {"rope_theta": float(theta), "rope_scaling": {"type": "none"}}
    if rope_type == "llama3":
        section: dict[str, Any] = {"type": "llama3"}
        fallback = {"original_max_position_embeddings": hf.get("max_position_embeddings")}
        for name in LLAMA3_ROPE_KEYS:
            value = rope.get(name, fallback.get(name))
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise ConvertError(
                    f"{source}: {key}.{name}={value!r}: rope_type 'llama3' needs a number here"
                )
            section[name] = value
        out["rope_scaling"] = section
    return out


def model_section_from_hf(hf: Mapping[str, Any]) -> dict[str, Any]:
    """Our `model:` section for a HF LLaMA config (no norm conversion)."""
    rope = rope_settings(hf, "config.json")
    model: dict[str, Any] = {
        "hidden_size": hf["hidden_size"],
        "num_layers": hf["num_hidden_layers"],
        "num_heads": hf["num_attention_heads"],
        "num_kv_heads": hf.get("num_key_value_heads") or hf["num_attention_heads"],
        "ffn_hidden_size": hf["intermediate_size"],
        "vocab_size": hf["vocab_size"],
        "seq_length": hf.get("max_position_embeddings") or 4096,
        "rope_theta": rope["rope_theta"],
        "rope_scaling": rope["rope_scaling"],
        "embedding_scale": bool(hf.get("embedding_scale", False)),
        "norm": {"kind": "rmsnorm", "eps": float(hf.get("rms_norm_eps", 1e-5))},
    }
    if hf.get("model_type") == CUSTOM_MODEL_TYPE:
        model["norm"] = {
            "kind": hf.get("norm_type", "dyt"),
            "eps": float(hf.get("rms_norm_eps", 1e-5)),
        }
        if model["norm"]["kind"] in ("dyt", "derf"):
            model["norm"].update(
                beta=bool(hf.get("norm_beta", False)),
                alpha_attn=float(hf.get("norm_alpha_attn", 0.5)),
                alpha_mlp=float(hf.get("norm_alpha_mlp", 0.5)),
                alpha_final=float(hf.get("norm_alpha_final", 0.5)),
                derf_shift=float(hf.get("derf_shift", 0.0)),
            )
            if model["norm"]["kind"] == "dyt":
                model["norm"]["squash"] = hf.get("dyt_squash", "tanh")
    if "initializer_range" in hf and hf["initializer_range"]:
        model["init"] = {"std": float(hf["initializer_range"])}
    return model
