"""`megatron-dyt lm-eval …`: lm-eval's own command line, with this project's model registered.

Every argument goes to lm-eval's CLI unchanged (`--tasks`, `--num_fewshot`, `--include_path`,
`--log_samples`, `--output_path`, `--gen_kwargs`, …), so its options, outputs and errors are
lm-eval's. Three things are added:

- the model `megatron-dyt` is registered (importing `adapter` does it) and is the default
  `--model`;
- the bundled offline tasks (`pycloze`) are known besides those of `--include_path`;
- under torchrun every rank runs the CLI (the TP/PP peers of a replica score the same requests,
  the replicas split them), but only global rank 0 gets the results back, so only it prints and
  writes the outputs. lm-eval's own test (DP rank 0 and LOCAL_RANK 0) would let a pipeline stage
  on another node write them too.
"""

from __future__ import annotations

import contextlib
import os
import sys
import traceback
from collections.abc import Iterator

from megatron_dyt.errors import MegatronDyTError, UsageError


def _names_model(args: list[str]) -> bool:
    """Whether the arguments choose the model themselves (or through a --config YAML)."""
    return any(
        a in ("--model", "-M", "--config", "-C") or a.startswith(("--model=", "--config="))
        for a in args
    )


@contextlib.contextmanager
def _patched(obj, name: str, value) -> Iterator[None]:
    had = name in vars(obj)
    old = vars(obj).get(name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        if had:
            setattr(obj, name, old)
        else:
            delattr(obj, name)


def _rank0_results(simple_evaluate):
    """`simple_evaluate`, returning its results on global rank 0 only."""

    def wrapped(*args, **kwargs):
        import torch.distributed as dist

        results = simple_evaluate(*args, **kwargs)
        if dist.is_initialized() and dist.get_rank() != 0:
            return None
        return results

    return wrapped


def _with_bundled_tasks(task_manager_cls):
    """lm-eval's TaskManager, with the bundled task folder added to every include path."""
    from megatron_dyt.eval.run import offline_task_dir

    bundled = str(offline_task_dir())

    class TaskManager(task_manager_cls):
        def __init__(self, *args, include_path=None, **kwargs):
            if include_path is None:
                paths = [bundled]
            elif isinstance(include_path, (list, tuple)):
                paths = [bundled, *map(str, include_path)]
            else:
                paths = [bundled, str(include_path)]
            super().__init__(*args, include_path=paths, **kwargs)

    return TaskManager


def run_lm_eval(args: list[str]) -> int:
    """Run lm-eval's CLI (`lm_eval.__main__.cli_evaluate`) on `args`; its exit status."""
    if int(os.environ.get("RANK", "0")) != 0:
        os.environ.setdefault("LMEVAL_LOG_LEVEL", "ERROR")  # one rank reports, as in training
    import lm_eval
    import lm_eval.tasks
    from lm_eval.__main__ import cli_evaluate
    from lm_eval.evaluator import simple_evaluate

    from megatron_dyt.eval.adapter import MODEL_NAME

    if args and not _names_model(args) and args[0] not in ("ls", "validate"):
        args = [*args, "--model", MODEL_NAME]
    argv = ["lm-eval", *args]
    with (
        _patched(sys, "argv", argv),
        _patched(lm_eval, "simple_evaluate", _rank0_results(simple_evaluate)),
        _patched(lm_eval.tasks, "TaskManager", _with_bundled_tasks(lm_eval.tasks.TaskManager)),
    ):
        try:
            cli_evaluate()
        except ValueError as exc:
            if isinstance(exc, MegatronDyTError):
                raise
            frames = traceback.extract_tb(exc.__traceback__)
            where = frames[-1].filename.replace(os.sep, "/") if frames else ""
            # raised by lm-eval's own checks of its arguments, not deeper down: one line
            if "/lm_eval/config/" in where or where.endswith("/lm_eval/evaluator.py"):
                raise UsageError(f"lm-eval: {exc}") from None
            raise
    return 0
