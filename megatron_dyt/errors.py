"""The errors the `megatron-dyt` command reports as one line, without a traceback.

Every error about what the user gave (a config, data, a checkpoint, the command line, the
cluster) derives from `MegatronDyTError` and says what was wrong and what is allowed. The CLI
prints it and exits with `exit_code`; any other exception is a bug and keeps its traceback.
Subclasses also derive from the built-in type callers used to catch (`ValueError`, ...).
"""

from __future__ import annotations


class MegatronDyTError(Exception):
    """Bad input, reported as one line: `megatron-dyt: error: <message>`."""

    exit_code = 2


class UsageError(MegatronDyTError, ValueError):
    """A command-line value, or a combination of them, that cannot work."""


class FileError(MegatronDyTError, ValueError):
    """A file that cannot be read as what it should be (not text, unreadable); the message
    names the file and what it was read as."""


class DataError(MegatronDyTError, ValueError):
    """Input data or a tokenizer that cannot be used; the message names the file, the line and
    what is wrong."""


class EvalError(MegatronDyTError, ValueError):
    """An evaluation request that cannot run (unknown task, missing dataset, bad layout)."""


class WeightsError(MegatronDyTError, ValueError):
    """Weights that do not fit the model: a tensor missing, or of the wrong shape."""
