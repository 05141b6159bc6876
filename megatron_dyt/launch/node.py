"""torchrun for one node, passing pre-emption signals on to the training processes.

    python -m megatron_dyt.launch.node [torchrun options] -m megatron_dyt.cli train …

SLURM's `--signal=USR1@T` (and `scancel --signal=USR1`) reaches every task of a job step,
which here is torchrun's agent. torchrun has no handler for SIGUSR1, so the signal would kill
the agent and, with it, the workers before they save. This runs torchrun's own entry point in
this process after installing a handler that sends SIGUSR1 to the worker processes (this
process's children); the trainer then saves a checkpoint and exits 0, and torchrun returns 0.
SIGTERM (`scancel`, `scontrol requeue`) keeps torchrun's behaviour: it passes it on itself.

torchrun exits 1 whatever its workers exited with; this exits 2 when every failed worker
exited 2 (bad input: the sbatch script does not requeue a job for that), else 1.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from pathlib import Path


def child_pids(parent: int) -> list[int]:
    """Processes whose parent is `parent` (Linux /proc; torchrun starts workers directly)."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:  # the process ended while we looked
            continue
        # "pid (comm) state ppid …": comm may hold spaces or parentheses, so split after it.
        fields = text[text.rindex(")") + 2 :].split()
        if int(fields[1]) == parent:
            children.append(int(stat.parent.name))
    return children


def _forward(signum: int, _frame) -> None:
    for pid in child_pids(os.getpid()):
        with contextlib.suppress(ProcessLookupError):  # it ended meanwhile
            os.kill(pid, signum)


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    signal.signal(signal.SIGUSR1, _forward)
    try:
        torchrun(sys.argv[1:] if argv is None else argv)
    except SignalException as exc:  # torchrun passed it to the workers, which saved: no traceback
        sig = signal.Signals(exc.sigval)
        print(f"launch: stopped by {sig.name}; the workers were sent it too", file=sys.stderr)
        return 128 + sig.value
    except ChildFailedError as exc:
        print(exc.format_msg(), file=sys.stderr)
        codes = {failure.exitcode for failure in exc.failures.values()}
        return 2 if codes == {2} else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
