"""Task suites, the paper's headline metric per task, and the results table."""

from __future__ import annotations

import difflib
from pathlib import Path

from megatron_dyt.errors import EvalError

TASK_DIR = Path(__file__).parent / "tasks"

SUITES: dict[str, list[str]] = {
    # The DyT paper's 15 zero-shot tasks.
    "paper15": [
        "anli_r1",
        "anli_r2",
        "anli_r3",
        "arc_challenge",
        "arc_easy",
        "boolq",
        "hellaswag",
        "openbookqa",
        "piqa",
        "record",
        "rte",
        "truthfulqa_mc1",
        "truthfulqa_mc2",
        "wic",
        "winogrande",
    ],
    # Small and quick: three common tasks with small test sets.
    "quick": ["arc_easy", "piqa", "winogrande"],
    # Bundled with the project: no network, no Hugging Face cache.
    "offline": ["pycloze"],
}

# The paper reports one number per task: accuracy, except ReCoRD (F1; EM is reported beside it).
# truthfulqa_mc1/mc2 report `acc` in lm-eval (MC1 accuracy / MC2 normalised probability mass).
HEADLINE = {"record": "f1"}


def headline_metric(task: str) -> str:
    return HEADLINE.get(task, "acc")


def expand(tasks: str | None, suite: str | None) -> list[str]:
    """Task names from `--tasks a,b` or `--suite NAME` (suite names may appear in --tasks too)."""
    if suite:
        if suite not in SUITES:
            raise EvalError(f"unknown suite '{suite}'; allowed: {', '.join(SUITES)}")
        return list(SUITES[suite])
    names: list[str] = []
    for name in (tasks or "").split(","):
        name = name.strip()
        if name:
            names.extend(SUITES.get(name, [name]))
    if not names:
        raise EvalError("no tasks given: use --tasks a,b or --suite NAME")
    return list(dict.fromkeys(names))


def check_task_names(names: list[str], known: list[str]) -> None:
    unknown = [n for n in names if n not in known]
    if unknown:
        parts = []
        for n in unknown:
            close = difflib.get_close_matches(n, known, n=3, cutoff=0.6)
            parts.append(f"'{n}'" + (f" (close: {', '.join(close)})" if close else ""))
        raise EvalError(
            f"unknown task {', '.join(parts)}; see `lm_eval --tasks list` for all tasks,"
            f" or the suites {', '.join(SUITES)}"
        )


def summarize(results: dict, tasks: list[str]) -> dict:
    """Per task the headline metric, and the suite average two ways."""
    rows, all_metrics = [], []
    for task in tasks:
        res = results.get(task, {})
        metric = headline_metric(task)
        value = res.get(f"{metric},none")
        stderr = res.get(f"{metric}_stderr,none")
        rows.append({"task": task, "metric": metric, "value": value, "stderr": stderr})
        all_metrics += [
            v
            for k, v in res.items()
            if k.endswith(",none") and "_stderr" not in k and isinstance(v, (int, float))
        ]
    headline = [r["value"] for r in rows if isinstance(r["value"], (int, float))]
    return {
        "rows": rows,
        "average_headline": sum(headline) / len(headline) if headline else None,
        "average_all_metrics": sum(all_metrics) / len(all_metrics) if all_metrics else None,
    }


def markdown_table(summary: dict, title: str) -> str:
    lines = [f"### {title}", "", "| task | metric | value | ± stderr |", "|---|---|---|---|"]
    for r in summary["rows"]:
        value = f"{r['value']:.4f}" if isinstance(r["value"], (int, float)) else "—"
        err = f"{r['stderr']:.4f}" if isinstance(r["stderr"], (int, float)) else "—"
        lines.append(f"| {r['task']} | {r['metric']} | {value} | {err} |")
    for label, key in (
        ("average (headline metric per task)", "average_headline"),
        ("average (all reported metrics)", "average_all_metrics"),
    ):
        v = summary[key]
        lines.append(
            f"| **{label}** |  | {v:.4f} |  |" if v is not None else f"| **{label}** |  | — |  |"
        )
    return "\n".join(lines) + "\n"
