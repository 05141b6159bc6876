"""`megatron-dyt convert …`: checkpoint conversions (resharding; Hugging Face export/import)."""

from __future__ import annotations

import argparse


def add_convert_commands(subparsers) -> argparse.ArgumentParser:
    """The `convert` command and its sub-commands."""
    from megatron_dyt.convert.reshard import add_reshard_parser

    convert = subparsers.add_parser(
        "convert",
        help="convert checkpoints (reshard to another parallel layout)",
        description="Convert checkpoints saved by `megatron-dyt train`.",
    )
    sub = convert.add_subparsers(dest="convert_command", required=True, metavar="CONVERSION")
    add_reshard_parser(sub)
    return convert
