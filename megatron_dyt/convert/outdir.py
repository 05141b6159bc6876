"""Atomic output folders: write to `OUT.tmp`, then rename; a non-empty OUT needs --force."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from megatron_dyt.convert.mapping import ConvertError


def prepare_out_dir(out: Path, force: bool) -> Path:
    """Refuse a non-empty OUT (unless `force`); returns the temporary folder to write into."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise ConvertError(f"output '{out}' exists and is not empty; pass --force to replace it")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def finish_out_dir(tmp: Path, out: Path) -> None:
    """Move the finished folder into place (an old OUT, with --force, is removed only now)."""
    if out.exists():
        old = out.with_name(out.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)
