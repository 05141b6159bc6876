"""`megatron-dyt eval`: zero-shot lm-eval tasks on a checkpoint, at its own parallel layout."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch.distributed as dist
import yaml

from megatron_dyt.errors import EvalError
from megatron_dyt.eval.suites import TASK_DIR, check_task_names, markdown_table, summarize


@dataclass
class EvalOutput:
    results: dict | None  # lm-eval's results (global rank 0), None elsewhere
    summary: dict | None
    table: str | None
    out_dir: Path | None


def offline_task_dir() -> Path:
    """The bundled tasks, with `data_files` made absolute (lm-eval resolves them from the cwd)."""
    out = Path(tempfile.mkdtemp(prefix="megatron-dyt-tasks-"))
    for spec in TASK_DIR.glob("*.yaml"):
        config = yaml.safe_load(spec.read_text())
        files = config.get("dataset_kwargs", {}).get("data_files", {})
        for split, name in files.items():
            files[split] = str((TASK_DIR / name).resolve())
        (out / spec.name).write_text(yaml.safe_dump(config, sort_keys=False))
    return out


def task_manager(include_path: str | Path | None = None):
    """lm-eval's tasks, the bundled ones, and those of `include_path` (a folder of task YAML)."""
    from lm_eval.tasks import TaskManager

    paths = [str(offline_task_dir())]
    if include_path is not None:
        folder = Path(include_path)
        if not folder.is_dir():
            raise EvalError(
                f"include path '{folder}' is not a folder; give a folder of lm-eval task YAML files"
            )
        _check_task_files(folder)
        paths.append(str(folder))
    return TaskManager(include_path=paths)


class _TaskYamlLoader(yaml.SafeLoader):
    """YAML as lm-eval writes task files: its `!function module.name` tags read as None."""


_TaskYamlLoader.add_multi_constructor("!", lambda loader, suffix, node: None)


def _check_task_files(folder: Path) -> None:
    """Every task file of an include path reads as YAML: lm-eval would skip a damaged one with
    a log line, and the task would then be reported as unknown."""
    from megatron_dyt.fileio import read_text

    for path in sorted(folder.rglob("*.yaml")):
        try:
            yaml.load(read_text(path, "lm-eval task file"), Loader=_TaskYamlLoader)  # noqa: S506
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise EvalError(
                f"lm-eval task file '{path}' is not valid YAML ({where}{problem})"
            ) from None


def check_datasets(names: list[str], manager) -> None:
    """Build each task once, so a missing dataset is named instead of failing deep in lm-eval."""
    from lm_eval.tasks import get_task_dict

    missing = []
    for name in names:
        try:
            get_task_dict([name], manager)
        except Exception as exc:  # datasets raises many kinds of errors when offline
            missing.append(_describe_missing(name, manager, exc))
    if missing:
        offline = os.environ.get("HF_DATASETS_OFFLINE") == "1"
        raise EvalError(
            "cannot load the data of "
            + "; ".join(missing)
            + (
                ". HF_DATASETS_OFFLINE=1 is set and the local Hugging Face cache lacks it:"
                if offline
                else ". Download it where there is network access:"
            )
            + " run the command shown on a machine with internet access and copy its"
            " ~/.cache/huggingface/datasets here (or point HF_DATASETS_CACHE at it)"
        )


def _describe_missing(name: str, manager, exc: Exception) -> str:
    entry = manager.task_index.get(name)
    config = dict(getattr(entry, "cfg", None) or {})
    yaml_path = getattr(entry, "yaml_path", None)
    if "dataset_path" not in config and yaml_path and Path(yaml_path).is_file():
        try:
            from lm_eval.utils import load_yaml_config

            config = load_yaml_config(str(yaml_path))
        except Exception:
            config = {}
    path, subset = config.get("dataset_path"), config.get("dataset_name")
    if path is None:
        return f"task '{name}' ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})"
    args = f"'{path}'" + (f", '{subset}'" if subset else "")
    return (
        f"task '{name}': dataset {path}{'/' + subset if subset else ''} is not available"
        f' (python -c "import datasets; datasets.load_dataset({args})")'
    )


def evaluate(
    lm,
    tasks: list[str],
    *,
    limit: int | None = None,
    manager=None,
    bootstrap_iters: int = 1000,
    num_fewshot: int | None = None,
    log_samples: bool = False,
) -> dict | None:
    """lm-eval's `simple_evaluate` on our adapter; the results dict on global rank 0.

    `num_fewshot` None keeps each task's own setting (0 for the bundled tasks); with
    `log_samples` the results hold lm-eval's per-document records under "samples"."""
    import lm_eval

    manager = manager or task_manager()
    results = lm_eval.simple_evaluate(
        model=lm,
        tasks=tasks,
        task_manager=manager,
        limit=limit,
        num_fewshot=num_fewshot,
        bootstrap_iters=bootstrap_iters,
        log_samples=log_samples,
    )
    return results if dist.get_rank() == 0 else None


def evaluate_checkpoint(
    checkpoint: str | Path,
    tasks: list[str],
    *,
    overrides: list[str] = (),
    batch_size: int | str = 8,
    limit: int | None = None,
    out_dir: str | Path | None = None,
    num_fewshot: int | None = None,
    include_path: str | Path | None = None,
    log_samples: bool = False,
) -> EvalOutput:
    """Load a training checkpoint at its layout (or TP=PP=1 in one process) and evaluate it.

    Writes results.json, summary.json, results.md and, with `log_samples`, one
    samples_<task>.jsonl per task (lm-eval's per-document records: arguments, responses,
    metrics)."""
    from megatron_dyt import checkpoint as ckpt
    from megatron_dyt.eval.adapter import make_lm
    from megatron_dyt.inference.load import load_checkpoint

    if num_fewshot is not None and num_fewshot < 0:
        raise EvalError(f"--num-fewshot {num_fewshot}: expected a whole number >= 0")
    folder = ckpt.resolve(checkpoint)
    out = Path(out_dir) if out_dir else folder.parent.parent / "eval" / folder.name
    if out.exists() and not out.is_dir():  # found now, not after the evaluation
        raise EvalError(f"--out '{out}' is a file; give a folder for the results")
    manager = task_manager(include_path)
    check_task_names(tasks, sorted(manager.all_tasks))
    check_datasets(tasks, manager)

    loaded = load_checkpoint(folder, overrides=overrides)
    cfg = loaded.cfg
    lm = make_lm(loaded.module, cfg, loaded.tokenizer, loaded.device, loaded.dtype, batch_size)
    results = evaluate(
        lm,
        tasks,
        limit=limit,
        manager=manager,
        num_fewshot=num_fewshot,
        log_samples=log_samples,
    )
    if results is None:
        return EvalOutput(None, None, None, None)

    samples = results.pop("samples", None)
    summary = summarize(results["results"], tasks)
    shots = "" if not num_fewshot else f", {num_fewshot}-shot"
    title = f"{cfg.model.name} @ step {loaded.step}{shots}"
    table = markdown_table(summary, title)
    out.mkdir(parents=True, exist_ok=True)
    from lm_eval.utils import handle_non_serializable

    from megatron_dyt.fileio import atomic_write

    def dump(value, **kwargs) -> str:
        return json.dumps(value, default=handle_non_serializable, ensure_ascii=False, **kwargs)

    atomic_write(out / "results.json", dump(results, indent=2) + "\n")
    atomic_write(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    atomic_write(out / "results.md", table)
    for task, records in (samples or {}).items():
        atomic_write(out / f"samples_{task}.jsonl", "".join(dump(r) + "\n" for r in records))
    return EvalOutput(results, summary, table, out)
