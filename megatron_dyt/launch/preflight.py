"""Checks a job passes before it is queued: what `train` would refuse at start-up, found before
the job waits in a queue (or a sweep queues hundreds of tasks that all fail the same way).

Each check yields problems as one line each, naming the setting and what would make it work:
the tokenizer and the dataset prefixes exist and fit the model's vocabulary; the estimated
memory fits one GPU (`info`'s estimate); the time limit leaves room for a step and a checkpoint
after USR1. The layout (TP × PP × DP against nodes × processes) is `launch/layout.py`'s.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from megatron_dyt.config import Config
from megatron_dyt.errors import MegatronDyTError

_TIME = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")


class PreflightError(MegatronDyTError, ValueError):
    """A job that would fail: every problem found, one per line; nothing was queued."""


DEFAULT_SIGNAL_SECONDS = 300
SIGNAL_MARGIN_SECONDS = 60  # signal delivery, the step's all-reduce, writing `latest`


def signal_lead(run_dir: Path, cfg: Config) -> tuple[int, str]:
    """How long before the time limit USR1 should come: the longest save this run has
    measured (its metrics.jsonl checkpoint events) plus its longest recent step plus a margin,
    so the step in flight and the save both finish; `DEFAULT_SIGNAL_SECONDS` for a new run."""
    saves, steps = [], []
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except (OSError, UnicodeDecodeError):
        lines = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if not isinstance(record, dict):
            continue
        if record.get("event") == "checkpoint" and isinstance(record.get("seconds"), float):
            saves.append(record["seconds"])
        elif isinstance(record.get("tokens_per_s"), float) and record["tokens_per_s"] > 0:
            steps.append(cfg.train.global_batch_tokens / record["tokens_per_s"])
    if not saves:
        return DEFAULT_SIGNAL_SECONDS, "the default: no save measured in this run folder yet"
    save, step = max(saves), max(steps[-100:], default=0.0)
    lead = math.ceil(save + step) + SIGNAL_MARGIN_SECONDS
    return lead, (
        f"the longest save measured in this run ({save:.1f} s) + its longest recent step"
        f" ({step:.1f} s) + {SIGNAL_MARGIN_SECONDS} s"
    )


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
