"""Checks a job passes before it is queued: what `train` would refuse at start-up, found before
the job waits in a queue (or a sweep queues hundreds of tasks that all fail the same way).

Each check yields problems as one line each, naming the setting and what would make it work:
the tokenizer and the dataset prefixes exist and fit the model's vocabulary; the estimated
memory fits one GPU (`info`'s estimate); the time limit leaves room for a step and a checkpoint
after USR1. The layout (TP × PP × DP against nodes × processes) is `launch/layout.py`'s.
"""

from __future__ import annotations

import re
from pathlib import Path

from megatron_dyt.config import Config
from megatron_dyt.errors import MegatronDyTError

_TIME = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")


class PreflightError(MegatronDyTError, ValueError):
    """A job that would fail: every problem found, one per line; nothing was queued."""


def time_limit_seconds(text: str) -> int:
    """SLURM's --time formats: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S."""
    match = _TIME.match(text.strip())
    if not match:
        raise PreflightError(
            f"--time {text!r}: expected a SLURM time limit, e.g. 90, 04:00:00 or 2-00:00:00"
        )
    days, a, b, c = match.groups()
    if days is not None:  # D-H[:M[:S]]
        return int(days) * 86400 + int(a) * 3600 + int(b or 0) * 60 + int(c or 0)
    if c is not None:  # H:M:S
        return int(a) * 3600 + int(b) * 60 + int(c)
    return int(a) * 60 + int(b or 0)  # M[:S]


def data_problems(cfg: Config) -> list[str]:
    """The tokenizer and every dataset prefix, as `train` resolves them (the demo corpus is
    built by the job itself)."""
    from megatron_dyt.data import resolve_data

    if cfg.data.demo:
        return []
    try:
        resolve_data(cfg)
    except (MegatronDyTError, ValueError) as exc:
        return [str(exc)]
    return []


def memory_problems(cfg: Config, gpus: int, gpu_memory: float | None) -> list[str]:
    from megatron_dyt.info import summarize

    fit = summarize(cfg, gpus=gpus, gpu_memory=gpu_memory)["fit"]
    return [] if fit["fits"] else [fit["message"] + " (--gpu-memory GIB names the GPU's)"]


def time_problems(cfg: Config, time_limit: str | None, gpus: int, signal_seconds: int) -> list[str]:
    """The limit must leave, after USR1's lead, time to start and to take a step."""
    from megatron_dyt.info import parameter_count, time_estimate

    if not time_limit:
        return []
    limit = time_limit_seconds(time_limit)
    t = time_estimate(cfg, parameter_count(cfg), gpus)
    step = t["seconds"] / max(1, t["steps"])
    needed = signal_seconds + step
    if limit > needed:
        return []
    return [
        f"--time {time_limit} ({limit} s) leaves no room for a checkpoint: USR1 comes"
        f" {signal_seconds} s before the limit and a step takes ~{step:.0f} s (at"
        f" {t['mfu']:.0%} MFU); give --time above {int(needed) + 1} s or a smaller"
        " --signal-seconds"
    ]


def check(
    cfg: Config,
    *,
    gpus: int,
    gpu_memory: float | None = None,
    time_limit: str | None = None,
    signal_seconds: int | None = None,
    run_dir: Path | None = None,
    on_gpus: bool = True,
) -> list[str]:
    """Every problem of a job of `cfg` on `gpus` processes (empty: it would start training);
    the memory check only when they run on GPUs."""
    from megatron_dyt.launch.slurm import signal_lead

    if signal_seconds is None:
        signal_seconds = signal_lead(run_dir or Path("/nonexistent"), cfg)[0]
    return [
        *data_problems(cfg),
        *(memory_problems(cfg, gpus, gpu_memory) if on_gpus else []),
        *time_problems(cfg, time_limit, gpus, signal_seconds),
    ]


def require(problems: list[str], what: str, done: str = "queued") -> None:
    """Raise one error listing `problems`, if any."""
    if problems:
        lines = "\n".join(f"  {p}" for p in problems)
        raise PreflightError(
            f"{what} would fail, so nothing was {done} ({len(problems)} problem(s); --no-check"
            f" skips these checks):\n{lines}"
        )
