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


def task_manager():
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(offline_task_dir()))


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
) -> dict | None:
    """lm-eval's `simple_evaluate` on our adapter; the results dict on global rank 0."""
    import lm_eval

    manager = manager or task_manager()
    results = lm_eval.simple_evaluate(
        model=lm,
        tasks=tasks,
        task_manager=manager,
        limit=limit,
        bootstrap_iters=bootstrap_iters,
        log_samples=False,
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
) -> EvalOutput:
    """Load a training checkpoint at its layout (or TP=PP=1 in one process) and evaluate it."""
    from megatron_dyt import checkpoint as ckpt
    from megatron_dyt.eval.adapter import make_lm
    from megatron_dyt.inference.load import inference_config, load_module

    folder, saved, cfg = inference_config(checkpoint, overrides)
    out = Path(out_dir) if out_dir else folder.parent.parent / "eval" / folder.name
    if out.exists() and not out.is_dir():  # found now, not after the evaluation
        raise EvalError(f"--out '{out}' is a file; give a folder for the results")

    manager = task_manager()
    check_task_names(tasks, sorted(manager.all_tasks))
    check_datasets(tasks, manager)

    loaded = load_module(folder, saved, cfg)
    module, device, dtype = loaded.module, loaded.device, loaded.dtype
    tokenizer = ckpt.read_tokenizer(folder)
    lm = make_lm(module, cfg, tokenizer, device, dtype, batch_size)
    results = evaluate(lm, tasks, limit=limit, manager=manager)
    if results is None:
        return EvalOutput(None, None, None, None)

    summary = summarize(results["results"], tasks)
    title = f"{cfg.model.name} @ step {ckpt.read_complete(folder)['step']}"
    table = markdown_table(summary, title)
    out.mkdir(parents=True, exist_ok=True)
    from lm_eval.utils import handle_non_serializable

    from megatron_dyt.fileio import atomic_write

    atomic_write(
        out / "results.json", json.dumps(results, indent=2, default=handle_non_serializable) + "\n"
    )
    atomic_write(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    atomic_write(out / "results.md", table)
    return EvalOutput(results, summary, table, out)
