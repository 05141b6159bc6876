"""`megatron-dyt convert …`: Hugging Face export (`to-hf`) and import (`from-hf`).

Each subcommand is one `add_*` function here, so more (e.g. resharding) slot in the same way.
Errors are `ValueError`s (ConvertError, CheckpointError, ConfigError) that name the bad file,
key or tensor; the main CLI prints them and exits with status 2.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from megatron_dyt.arguments import positive_int


def cmd_to_hf(args: argparse.Namespace) -> int:
    from megatron_dyt.convert.to_hf import export_to_hf

    out = export_to_hf(
        args.checkpoint,
        args.out_dir,
        dtype=args.dtype,
        max_shard_size=args.max_shard_size,
        force=args.force,
        progress=not args.no_progress,
    )
    custom = (out / "modeling_megatron_dyt.py").is_file()
    print(f"wrote {out}")
    if custom:
        print(
            "load it with transformers.AutoModelForCausalLM.from_pretrained("
            f"'{out}', trust_remote_code=True)  (DyT/Derf modeling code is in the folder)"
        )
    else:
        print(f"load it with transformers.LlamaForCausalLM.from_pretrained('{out}')")
    return 0


def cmd_from_hf(args: argparse.Namespace) -> int:
    from megatron_dyt.convert.from_hf import import_from_hf

    folder = import_from_hf(
        args.hf_dir,
        args.out,
        tp=args.tp,
        pp=args.pp,
        config=args.config,
        overrides=args.overrides,
        norm=args.norm,
        tokenizer=args.tokenizer,
        force=args.force,
        progress=not args.no_progress,
        revision=args.revision,
    )
    run = Path(args.out)
    print(f"wrote {folder} (weights only, TP={args.tp} PP={args.pp})")
    print(
        f"continue pretraining: megatron-dyt train CONFIG --run-dir {run}  (same TP/PP;"
        " fresh optimizer and schedule from step 0)"
    )
    print(f"evaluate:             megatron-dyt eval {run}")
    return 0


def add_to_hf(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "to-hf",
        help="export a checkpoint as a Hugging Face LLaMA folder",
        description="Merge a checkpoint's TP shards, pipeline stages and ZeRO partitions into"
        " config.json + safetensors + tokenizer. RMSNorm models load as a stock"
        " LlamaForCausalLM; DyT/Derf models get their modeling code in the folder"
        " (trust_remote_code=True).",
    )
    p.add_argument(
        "checkpoint", metavar="CHECKPOINT", help="run folder, its checkpoints/ or a step_* folder"
    )
    p.add_argument("out_dir", metavar="OUT_DIR", help="folder to create")
    p.add_argument(
        "--dtype",
        choices=["fp32", "bf16", "fp16"],
        default="fp32",
        help="weight dtype (default fp32: lossless)",
    )
    p.add_argument(
        "--max-shard-size",
        default="5GB",
        help="split the safetensors above this size (default 5GB; e.g. 500MB, 2GiB)",
    )
    p.add_argument("--force", action="store_true", help="replace a non-empty OUT_DIR")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_to_hf)


def add_from_hf(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "from-hf",
        help="import a Hugging Face LLaMA folder as a checkpoint at a TP/PP layout",
        description="Convert a local LLaMA-layout Hugging Face folder (ours, a published"
        " LLaMA 1-3.x, TinyLlama, or Mistral without a sliding window), or a repo id whose"
        " snapshot is in the local Hugging Face cache (never downloaded), into a run folder"
        " holding a weights-only checkpoint at the given layout, ready for"
        " `megatron-dyt train --run-dir OUT` (fresh optimizer, step 0) and `eval`.",
    )
    p.add_argument(
        "hf_dir",
        metavar="HF_DIR",
        help="folder with config.json and weights, or ORG/NAME in the local Hugging Face cache"
        " (HF_HUB_CACHE / HF_HOME)",
    )
    p.add_argument("out", metavar="OUT", help="run folder to create")
    p.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="e.g. model.norm.alpha_attn=0.8"
    )
    p.add_argument("--tp", type=positive_int, default=1, help="tensor-parallel size (default 1)")
    p.add_argument("--pp", type=positive_int, default=1, help="pipeline-parallel size (default 1)")
    p.add_argument(
        "--config",
        help="target config YAML (model shape checked tensor by tensor; norm α₀, data, training)",
    )
    p.add_argument(
        "--norm",
        choices=["dyt", "derf"],
        help="turn an RMSNorm model's norms into DyT/Derf (γ kept, α = α₀ of the config)",
    )
    p.add_argument(
        "--tokenizer",
        help="tokenizer to store with the checkpoint: a .model, a tokenizer.json or a folder"
        " holding one (default: HF_DIR's tokenizer.json, else its tokenizer.model)",
    )
    p.add_argument(
        "--revision",
        default="main",
        help="for ORG/NAME: the cached branch, tag or commit to read (default main)",
    )
    p.add_argument("--force", action="store_true", help="replace a non-empty OUT")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_from_hf)


def add_convert_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `convert` and its subcommands on the main parser's subparsers."""
    from megatron_dyt.convert.reshard import add_reshard_parser

    convert = subparsers.add_parser(
        "convert",
        help="checkpoint conversion: Hugging Face export/import, resharding",
        description="Convert checkpoints to and from other formats, or to another TP/PP layout.",
    )
    sub = convert.add_subparsers(dest="convert_command", required=True, metavar="SUBCOMMAND")
    add_to_hf(sub)
    add_from_hf(sub)
    add_reshard_parser(sub)
    return convert
