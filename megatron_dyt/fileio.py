"""Files written so that a reader never sees half of one, and text read with an error that
names the file when it is damaged."""

from __future__ import annotations

import os
import threading
from pathlib import Path

from megatron_dyt.errors import FileError


def atomic_write(path: Path, text: str) -> None:
    """Write `text` to `path` so a reader sees the old file or the whole new one, never part:
    a temporary file beside it (one per process and thread), flushed to disk, then renamed over
    it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    tmp.write_text(text)
    with open(tmp) as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def read_text(path: Path, what: str) -> str:
    """`path`'s text (UTF-8); a file that is not text or cannot be read is one `FileError`
    naming it as `what` ("config file", "checkpoint pointer", ...)."""
    path = Path(path)
    try:
        return path.read_text()
    except UnicodeDecodeError as exc:
        raise FileError(
            f"{what} '{path}' is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset"
            f" {exc.start}): it is damaged, or not a {what}"
        ) from None
    except OSError as exc:
        raise FileError(f"cannot read {what} '{path}': {exc.strerror or exc}") from None
