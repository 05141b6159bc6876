"""`megatron-dyt report RUN`: one run's norm statistics over training, and the layers to worry
about.

Reads what the trainer leaves in a run folder (docs/design.md §1, §14): `metrics.jsonl`, whose
records carry `norm/<layer>/<stat>` every `train.stats_interval` steps (event records such as
checkpoints and rewinds are skipped, a line a crash cut short too), and `status.json`, which says
whether the run finished, stopped or diverged. Per norm layer it shows α, the input std and the
saturated fraction (|α·x| > 2) over training, names the layer's site (the norm in front of
attention, of the MLP, or the final norm) and flags

- *saturation*: the last recorded saturated fraction is above the threshold and above the first
  one (it grew there, it did not start there);
- *input std blow-up*: the input std grew by the std factor or more, or became non-finite (a
  NaN/Inf statistic is logged as null).

No torch: it reads JSON only, so it works on a run copied off a cluster.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from megatron_dyt.fileio import atomic_write
from megatron_dyt.sweep.spec import SweepError

STATS = ("alpha", "input_std", "saturated")
DEFAULT_THRESHOLD = 0.1  # saturated fraction that flags a layer (default of --threshold)
DEFAULT_STD_GROWTH = 10.0  # input-std growth factor that flags a layer (--std-growth)


def site_of(layer: str) -> str:
    """The norm's site from its canonical name (`model.norm_names`): attention, mlp or final."""
    leaf = layer.rpartition(".")[2]
    if leaf == "attention_norm":
        return "attention"
    if leaf == "mlp_norm":
        return "mlp"
    if layer == "output.norm":
        return "final"
    return "other"


def read_records(path: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(step records, event records) of a metrics.jsonl, in file order; unreadable lines are
    skipped (the last one of a crashed run may be cut short)."""
    records, events = [], []
    if not path.is_file():
        return records, events
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(rec, dict) or "step" not in rec:
            continue
        (events if "event" in rec else records).append(rec)
    return records, events


@dataclass
class LayerSeries:
    """One norm layer's statistics at every step that recorded them (None: not recorded for
    this kind of norm, or non-finite)."""

    layer: str
    site: str
    steps: list[int] = field(default_factory=list)
    alpha: list[float | None] = field(default_factory=list)
    input_std: list[float | None] = field(default_factory=list)
    saturated: list[float | None] = field(default_factory=list)

    def values(self, stat: str) -> list[float | None]:
        return getattr(self, stat)

    def first(self, stat: str) -> float | None:
        finite = [v for v in self.values(stat) if _finite(v)]
        return finite[0] if finite else None

    def last(self, stat: str) -> float | None:
        """The last recorded value (None if it was non-finite or never recorded)."""
        values = self.values(stat)
        return values[-1] if values and _finite(values[-1]) else None

    @property
    def has(self) -> set[str]:
        return {s for s in STATS if any(v is not None for v in self.values(s))}


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def norm_series(records: list[dict[str, Any]]) -> list[LayerSeries]:
    """Per norm layer, in the order the model logs them, its statistics over the steps."""
    layers: dict[str, LayerSeries] = {}
    for rec in records:
        keys = [k for k in rec if k.startswith("norm/")]
        if not keys:
            continue
        names = dict.fromkeys(k[len("norm/") :].rpartition("/")[0] for k in keys)
        for name in names:
            series = layers.setdefault(name, LayerSeries(name, site_of(name)))
            series.steps.append(int(rec["step"]))
            for stat in STATS:
                value = rec.get(f"norm/{name}/{stat}")
                series.values(stat).append(float(value) if _finite(value) else None)
    return list(layers.values())


@dataclass
class Flag:
    layer: str
    site: str
    kind: str  # "saturation" or "input std"
    detail: str


@dataclass
class Diagnosis:
    """What `report RUN` shows: how the run ended, its losses and its norms over training."""

    run_dir: str
    state: str  # status.json's state (finished, stopped, diverged), or "unknown"
    status: dict[str, Any]
    train_steps: int | None
    last_step: int | None  # the last step with a finite loss record
    final_loss: float | None
    final_valid: float | None
    nonfinite: list[dict[str, Any]]  # rewinds on a NaN/Inf loss (events)
    layers: list[LayerSeries]
    flags: list[Flag]
    threshold: float
    std_growth: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _flags(layers: list[LayerSeries], threshold: float, std_growth: float) -> list[Flag]:
    out = []
    for s in layers:
        first, last = s.first("saturated"), s.last("saturated")
        if last is not None and first is not None and last > threshold and last > first:
            out.append(
                Flag(
                    s.layer,
                    s.site,
                    "saturation",
                    f"saturated {_pct(first)} → {_pct(last)} (step {s.steps[0]} → {s.steps[-1]}),"
                    f" above {_pct(threshold)}",
                )
            )
        values = s.values("input_std")
        start = next((i for i, v in enumerate(values) if v is not None), None)
        if start is None:
            continue
        bad = [s.steps[i] for i in range(start, len(values)) if values[i] is None]
        if bad:
            out.append(Flag(s.layer, s.site, "input std", f"input std non-finite at step {bad[0]}"))
            continue
        std0, std1 = values[start], s.last("input_std")
        if std1 is not None and std0 > 0 and std1 / std0 >= std_growth:
            out.append(
                Flag(
                    s.layer,
                    s.site,
                    "input std",
                    f"input std {std0:.3g} → {std1:.3g} ({std1 / std0:.0f}×, step"
                    f" {s.steps[0]} → {s.steps[-1]})",
                )
            )
    return out


def _pct(v: float | None) -> str:
    return "—" if v is None else f"{100 * v:.1f}%"


def diagnose(
    run_dir: str | Path,
    threshold: float = DEFAULT_THRESHOLD,
    std_growth: float = DEFAULT_STD_GROWTH,
) -> Diagnosis:
    """Read a run folder's metrics.jsonl and status.json (see the module docstring)."""
    run_dir = Path(run_dir)
    metrics = run_dir / "metrics.jsonl"
    if not run_dir.is_dir():
        raise SweepError(f"run folder '{run_dir}' does not exist")
    if not metrics.is_file():
        hint = (
            "; it is a sweep folder: `megatron-dyt sweep report` reports it"
            if (run_dir / "plan.json").is_file()
            else ""
        )
        raise SweepError(
            f"'{run_dir}' has no metrics.jsonl: not a run folder of `megatron-dyt train`{hint}"
        )
    if not 0 < threshold <= 1:
        raise SweepError(f"--threshold {threshold}: expected a fraction in (0, 1], e.g. 0.1")
    records, events = read_records(metrics)
    try:
        status = json.loads((run_dir / "status.json").read_text())
    except (OSError, ValueError):
        status = {}
    losses = [(int(r["step"]), r["loss"]) for r in records if _finite(r.get("loss"))]
    valid = [r["valid_loss"] for r in records if _finite(r.get("valid_loss"))]
    layers = norm_series(records)
    return Diagnosis(
        run_dir=str(run_dir),
        state=str(status.get("state", "unknown")),
        status=status,
        train_steps=status.get("train_steps"),
        last_step=losses[-1][0] if losses else None,
        final_loss=losses[-1][1] if losses else None,
        final_valid=valid[-1] if valid else None,
        nonfinite=[e for e in events if e.get("event") == "nonfinite_loss_rewind"],
        layers=layers,
        flags=_flags(layers, threshold, std_growth),
        threshold=threshold,
        std_growth=std_growth,
    )


def _sample(steps: list[int], columns: int) -> list[int]:
    """Up to `columns` indices of `steps`, evenly spread, the first and last included."""
    n = len(steps)
    if n <= columns:
        return list(range(n))
    return sorted({round(i * (n - 1) / (columns - 1)) for i in range(columns)})


def _fmt(stat: str, v: float | None) -> str:
    if v is None:
        return "—"
    return _pct(v) if stat == "saturated" else f"{v:.3g}"


def markdown(d: Diagnosis, columns: int = 6) -> str:
    """The diagnosis as Markdown: how the run ended, the flags, and per statistic a table of
    every layer at up to `columns` recorded steps."""
    head = f"# Norm diagnostics: {Path(d.run_dir).name}"
    lines = [head, ""]
    ended = d.state
    if d.state == "diverged":
        where = d.status.get("step")
        ended += (
            f" after step {where} (the loss of step {where + 1} was not finite)"
            if isinstance(where, int)
            else ""
        )
    elif d.train_steps:
        ended += f" at step {d.status.get('step')} of {d.train_steps}"
    lines.append(f"State: **{ended}** (status.json).")
    if d.final_loss is not None:
        lines.append(f"Last finite training loss: {d.final_loss:.4f} at step {d.last_step}.")
    if d.final_valid is not None:
        lines.append(f"Last validation loss: {d.final_valid:.4f}.")
    for e in d.nonfinite:
        lines.append(
            f"Rewound at step {e['step']}: loss {e.get('loss')}, batch {e.get('skipped_batch')}"
            " left out."
        )
    lines.append("")
    if not d.layers:
        lines += [
            "No norm statistics were recorded (the run stopped before its first"
            " `train.stats_interval` step)."
        ]
        return "\n".join(lines) + "\n"
    if d.flags:
        lines += [f"## Flagged layers ({len(d.flags)})", ""]
        lines += ["| layer | site | what |", "|---|---|---|"]
        lines += [f"| {f.layer} | {f.site} | {f.kind}: {f.detail} |" for f in d.flags]
        sites = {}
        for f in d.flags:
            sites.setdefault(f.site, set()).add(f.layer)
        lines += [
            "",
            "By site: " + ", ".join(f"{s} {len(v)}" for s, v in sorted(sites.items())) + ".",
        ]
    else:
        lines.append(
            f"No layer flagged (saturated fraction above {_pct(d.threshold)} and growing, or"
            f" input std growing {d.std_growth:g}× or turning non-finite)."
        )
    lines.append("")
    steps = d.layers[0].steps
    cols = _sample(steps, columns)
    names = {"alpha": "α", "input_std": "input std", "saturated": "saturated fraction |α·x| > 2"}
    for stat in STATS:
        if not any(stat in s.has for s in d.layers):
            continue
        lines += [f"## {names[stat]} over training", ""]
        lines.append("| layer | site | " + " | ".join(f"step {steps[i]}" for i in cols) + " |")
        lines.append("|---|---|" + "---:|" * len(cols))
        for s in d.layers:
            vals = [_fmt(stat, s.values(stat)[i]) if i < len(s.steps) else "—" for i in cols]
            lines.append(f"| {s.layer} | {s.site} | " + " | ".join(vals) + " |")
        lines.append("")
    return "\n".join(lines) + "\n"


def figure(d: Diagnosis, path: Path) -> bool:
    """α, input std and saturated fraction per layer against step, one panel each, coloured by
    site; False (nothing written) without statistics."""
    if not d.layers:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stats = [s for s in STATS if any(s in layer.has for layer in d.layers)]
    fig, axes = plt.subplots(1, len(stats), figsize=(4.2 * len(stats), 3.4), squeeze=False)
    colors = {"attention": "#1f77b4", "mlp": "#d62728", "final": "#2ca02c", "other": "#7f7f7f"}
    titles = {"alpha": "α", "input_std": "input std", "saturated": "saturated fraction"}
    flagged = {f.layer for f in d.flags}
    for ax, stat in zip(axes[0], stats, strict=True):
        seen = set()
        for s in d.layers:
            ys = [float("nan") if v is None else v for v in s.values(stat)]
            label = s.site if s.site not in seen else None
            seen.add(s.site)
            ax.plot(
                s.steps,
                ys,
                color=colors[s.site],
                alpha=0.9 if s.layer in flagged else 0.45,
                linewidth=2.2 if s.layer in flagged else 1.0,
                label=label,
            )
        if stat == "saturated":
            ax.axhline(d.threshold, color="black", linestyle=":", linewidth=1)
        if stat == "input_std":
            ax.set_yscale("log")
        ax.set_title(titles[stat])
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
    axes[0][0].legend(fontsize=8, title="site (bold: flagged)", title_fontsize=8)
    fig.suptitle(f"{Path(d.run_dir).name}: {d.state}", fontsize=10)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fig.savefig(tmp, format="png", dpi=100)
    os.replace(tmp, path)
    plt.close(fig)
    return True


def write_diagnosis(d: Diagnosis, out: Path) -> list[Path]:
    """diagnosis.md, diagnosis.json and (with statistics) norm_stats.png into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "diagnosis.md", out / "diagnosis.json"]
    atomic_write(written[0], markdown(d))
    atomic_write(written[1], json.dumps(d.to_dict(), indent=1) + "\n")
    if figure(d, out / "norm_stats.png"):
        written.append(out / "norm_stats.png")
    return written
