"""`megatron-dyt convert to-hf`: a checkpoint → a Hugging Face folder `transformers` loads.

RMSNorm models become a plain `LlamaForCausalLM`; DyT, Derf (and LayerNorm, or any model with the
learned embedding scale) get `configuration_megatron_dyt.py` + `modeling_megatron_dyt.py` in the
folder and an `auto_map`, loaded with `trust_remote_code=True`. Weights are safetensors, split
into shards above `max_shard_size` (with `model.safetensors.index.json`). The default dtype is
fp32: the export is lossless unless bf16 is asked for. The folder is written as `OUT.tmp` and
renamed into place, so a half-written export never looks complete.
"""

from __future__ import annotations

import json
import re
import shutil
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch
from tqdm import tqdm

from megatron_dyt.convert.mapping import (
    ConvertError,
    hf_config,
    needs_custom_code,
    to_hf_state_dict,
)
from megatron_dyt.convert.outdir import finish_out_dir, prepare_out_dir
from megatron_dyt.data.tokenizer import (
    HF_CONFIG,
    HF_JSON,
    SP_MODEL,
    HFTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
)

HF_CODE = Path(__file__).with_name("hf_code")
CODE_FILES = ("configuration_megatron_dyt.py", "modeling_megatron_dyt.py")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEFAULT_SHARD = "5GB"


def parse_size(text: str | int) -> int:
    """'5GB', '500MB', '2GiB' or a byte count → bytes (GB = 10⁹, GiB = 2³⁰, as HF does)."""
    if isinstance(text, int):
        value = text
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", str(text), re.IGNORECASE)
        if not match:
            raise ConvertError(
                f"--max-shard-size {text!r}: expected a size like 5GB, 500MB, 2GiB or bytes"
            )
        unit = (match.group(2) or "B").upper()
        scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
        scale.update({"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40})
        value = int(float(match.group(1)) * scale[unit])
    if value <= 0:
        raise ConvertError(f"--max-shard-size {text!r}: must be > 0")
    return value


def _write_shards(
    hf: Mapping[str, torch.Tensor], dtype: torch.dtype, limit: int, out: Path, progress: bool
) -> None:
    """Write `hf` (made a tensor at a time) as safetensors files of at most `limit` bytes each
    (a bigger tensor goes alone), in order, holding one file's tensors at a time; more than one
    file get HF's `model-0000i-of-0000n` names and `model.safetensors.index.json`."""
    from safetensors.torch import save_file

    parts: list[tuple[Path, list[str]]] = []
    group: dict[str, torch.Tensor] = {}
    size = total = 0

    def flush() -> None:
        path = out / f".part-{len(parts):05d}.safetensors"
        save_file(group, str(path), metadata={"format": "pt"})
        parts.append((path, list(group)))
        group.clear()

    for name in tqdm(hf, desc="safetensors", unit="tensor", disable=not progress):
        tensor = hf[name].to(dtype).contiguous()
        nbytes = tensor.numel() * tensor.element_size()
        if group and size + nbytes > limit:
            flush()
            size = 0
        group[name] = tensor
        size += nbytes
        total += nbytes
    flush()
    if len(parts) == 1:
        parts[0][0].rename(out / "model.safetensors")
        return
    weight_map = {}
    for i, (path, names) in enumerate(parts):
        final = f"model-{i + 1:05d}-of-{len(parts):05d}.safetensors"
        path.rename(out / final)
        weight_map.update(dict.fromkeys(names, final))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def special_token_ids(tokenizer: Tokenizer | None) -> dict[str, int]:
    """`bos_token_id`, `eos_token_id`, `pad_token_id` of config.json and generation_config.json:
    the tokenizer's own, those it lacks left out (transformers reads them as None)."""
    if tokenizer is None:
        return {}
    ids = {"bos_token_id": tokenizer.bos, "eos_token_id": tokenizer.eos}
    ids["pad_token_id"] = tokenizer.pad
    return {key: value for key, value in ids.items() if value >= 0}


def write_tokenizer(tokenizer: Tokenizer, out: Path, max_length: int) -> None:
    """The checkpoint's tokenizer as files transformers' `AutoTokenizer` loads, with the
    tokenizer's own special tokens."""
    if isinstance(tokenizer, HFTokenizer):
        _write_hf_tokenizer(tokenizer, out, max_length)
    elif isinstance(tokenizer, SentencePieceTokenizer):
        _write_sentencepiece_tokenizer(tokenizer, out, max_length)
    else:
        raise TypeError(f"no export for {type(tokenizer).__name__}")


def _write_hf_tokenizer(tokenizer: HFTokenizer, out: Path, max_length: int) -> None:
    """tokenizer.json as stored, and its tokenizer_config.json with the special tokens named.

    The roles are written out even where the source left them to convention (`<s>`, `</s>`,
    ...), and `clean_up_tokenization_spaces` is false, so transformers decodes like we do.
    Whether a BOS is prepended is the tokenizer.json's own post-processor, as stored.
    """
    (out / HF_JSON).write_bytes(tokenizer.files()[HF_JSON])
    config = tokenizer.settings
    config.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
    config.update(
        bos_token=tokenizer.special_token(tokenizer.bos),
        eos_token=tokenizer.special_token(tokenizer.eos),
        unk_token=tokenizer.special_token(tokenizer.unk),
        pad_token=tokenizer.special_token(tokenizer.pad),
        clean_up_tokenization_spaces=False,
        model_max_length=max_length,
    )
    (out / HF_CONFIG).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def _write_sentencepiece_tokenizer(
    tokenizer: SentencePieceTokenizer, out: Path, max_length: int
) -> None:
    """Our sentencepiece model as a LLaMA tokenizer: tokenizer.model + tokenizer_config.json,
    and tokenizer.json (the fast tokenizer) when transformers can convert it here.

    Our tokenizers add no dummy prefix space, so `add_prefix_space` is false and `legacy` off;
    BOS is prepended like LLaMA (lm-eval's prefix token is BOS in our evaluation too).
    """
    import sentencepiece as spm

    sp_model = out / SP_MODEL
    tokenizer.save(out)
    sp = spm.SentencePieceProcessor(model_file=str(sp_model))

    def piece(i: int) -> str | None:
        return sp.id_to_piece(i) if 0 <= i < sp.get_piece_size() else None

    import tempfile

    config = {
        "tokenizer_class": "LlamaTokenizer",
        # no BOS: training never puts one in front of a document (docs/design.md §5)
        "add_bos_token": False,
        "add_eos_token": False,
        "add_prefix_space": False,
        "legacy": False,
        "bos_token": piece(sp.bos_id()),
        "eos_token": piece(sp.eos_id()),
        "unk_token": piece(sp.unk_id()),
        "pad_token": piece(sp.pad_id()),
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_length,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    try:
        from transformers import AutoTokenizer

        # Converted in a folder of its own: the export's config.json may name custom code.
        with tempfile.TemporaryDirectory() as scratch:
            for name in ("tokenizer.model", "tokenizer_config.json"):
                shutil.copy2(out / name, Path(scratch) / name)
            tok = AutoTokenizer.from_pretrained(scratch)
            tok.backend_tokenizer.save(str(out / "tokenizer.json"))
    except Exception as exc:  # no protobuf / converter: the slow files still work
        warnings.warn(
            f"tokenizer.json not written ({type(exc).__name__}: {exc}); tokenizer.model and"
            " tokenizer_config.json are there",
            stacklevel=2,
        )


def export_to_hf(
    checkpoint: str | Path,
    out_dir: str | Path,
    *,
    dtype: str = "fp32",
    max_shard_size: str | int = DEFAULT_SHARD,
    force: bool = False,
    progress: bool = True,
) -> Path:
    """Merge a checkpoint's TP shards, PP stages (and ZeRO partitions) into a HF folder."""
    from megatron_dyt import checkpoint as ckpt

    if dtype not in DTYPES:
        raise ConvertError(f"--dtype {dtype!r}: allowed: {', '.join(DTYPES)}")
    limit = parse_size(max_shard_size)
    folder = ckpt.resolve(checkpoint)
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise ConvertError(f"output '{out}' exists and is not empty; pass --force to replace it")
    cfg = ckpt.read_config(folder)
    # tensor by tensor: the export holds one safetensors file's tensors, not the model
    hf = to_hf_state_dict(ckpt.full_weights(folder, cfg), cfg)
    torch_dtype = DTYPES[dtype]

    tmp = prepare_out_dir(out, force)
    try:
        _write_shards(hf, torch_dtype, limit, tmp, progress)
        config = hf_config(cfg, torch_dtype)
        step = ckpt.read_complete(folder).get("step")
        config["megatron_dyt_source"] = {"checkpoint": str(folder), "step": step}
        tokenizer = ckpt.read_tokenizer(folder) if ckpt.has_tokenizer(folder) else None
        ids = special_token_ids(tokenizer)
        config.update(ids)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps(ids, indent=2) + "\n")
        if needs_custom_code(cfg):
            for name in CODE_FILES:
                shutil.copy2(HF_CODE / name, tmp / name)
        if tokenizer is not None:
            write_tokenizer(tokenizer, tmp, cfg.model.seq_length)
        else:
            warnings.warn(f"'{folder}' holds no tokenizer: the export has none", stacklevel=2)
        finish_out_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
