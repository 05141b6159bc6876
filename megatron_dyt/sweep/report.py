"""`megatron-dyt sweep report`: the best α₀ per width, with seed spread, heat-maps and a fit.

Every run of a sweep folder (see state.py) gives one CSV row: its grid values, seed, final
training loss, final and best validation loss and state. Runs are grouped by width and by any
grid axis other than width, α₀ and seed (depth, tokens, ...); in each group a table and a
heat-map show the α₀ᵃᵗᵗⁿ × α₀ᵒᵗʰᵉʳ cells as mean ± std over seeds. A cell where any seed
diverged is marked and never chosen as best: an α₀ that sometimes diverges is not an optimum.
The best cells' α₀ are then fitted against width on log-log axes (the paper: wider → smaller α₀).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from megatron_dyt.fileio import atomic_write
from megatron_dyt.sweep.spec import SweepError
from megatron_dyt.sweep.state import load_plan, read_status
from megatron_dyt.sweep.stats import Spread, fit_power_law, spread

# The DyT paper's optimal (α₀ᵃᵗᵗⁿ, α₀ᵒᵗʰᵉʳ) per width, tuned at 30B tokens (docs/design.md §1).
PAPER_OPTIMA = {1024: (1.0, 1.0), 2048: (1.0, 0.5), 4096: (0.8, 0.2), 8192: (0.2, 0.05)}
METRICS = {
    "final_valid": "final validation loss",
    "best_valid": "best validation loss",
    "final_train": "final training loss",
}
# What places a run in a table cell (width, α₀ᵃᵗᵗⁿ, α₀ᵒᵗʰᵉʳ) or makes it one more seed of it,
# read from each run's config. An axis that sets none of these (depth, tokens, or α₀ᶠⁱⁿᵃˡ or
# kv heads on their own axis) is a group axis: its values get tables of their own, never
# pooled as if they were seeds. Axes tied to one of these keys (width with its heads and FFN,
# α₀ᵐˡᵖ with α₀ᶠⁱⁿᵃˡ) move with it.
_CELL_KEYS = {
    "model.hidden_size",
    "model.norm.alpha_attn",
    "model.norm.alpha_mlp",
    "train.seed",
}


# ---- collecting runs ---------------------------------------------------------------------------


@dataclass
class RunRow:
    index: int
    name: str
    state: str
    axes: dict[str, Any]
    width: int
    alpha_attn: float
    alpha_mlp: float
    alpha_final: float
    seed: int
    group: tuple[tuple[str, Any], ...]
    kind: str = "dyt"
    squash: str = "tanh"
    part: str | None = None  # a study's part (spec.py `parts`)
    train_steps: int | None = None
    tokens_per_step: int | None = None
    seconds: float | None = None
    step: int | None = None
    final_train: float | None = None
    final_valid: float | None = None
    best_valid: float | None = None
    best_valid_step: int | None = None
    exit_code: int | None = None
    message: str = ""

    def metric(self, name: str) -> float | None:
        return getattr(self, name)


def read_metrics(path: Path) -> dict[str, Any]:
    """Final training loss, final and best validation loss from a run's metrics.jsonl."""
    train: dict[int, float | None] = {}
    valid: dict[int, float | None] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a crash
            if "event" in rec:
                continue
            step = int(rec["step"])
            if "loss" in rec:
                train[step] = rec["loss"]
            if "valid_loss" in rec:
                valid[step] = rec["valid_loss"]
    out: dict[str, Any] = {"step": max(train) if train else None}
    if train:
        out["final_train"] = train[max(train)]
    finite = {s: v for s, v in valid.items() if v is not None and math.isfinite(v)}
    if valid:
        out["final_valid"] = valid[max(valid)]
    if finite:
        best = min(finite, key=finite.get)
        out["best_valid"], out["best_valid_step"] = finite[best], best
    return out


def _group_axes(sweep_dir: Path) -> list[str]:
    spec = yaml.safe_load((sweep_dir / "sweep.yaml").read_text()) or {}
    grids = [spec.get("grid") or {}]
    grids += [(p or {}).get("grid") or {} for p in (spec.get("parts") or {}).values()]
    names = [
        name
        for grid in grids
        for name, axis in grid.items()
        if not set(axis.get("keys", [name])) & _CELL_KEYS
    ]
    return list(dict.fromkeys(names))


def collect(sweep_dir: str | Path) -> list[RunRow]:
    """One row per planned run: where its config puts it in the tables, its state and losses."""
    sweep_dir = Path(sweep_dir)
    plan = load_plan(sweep_dir)
    group_axes = _group_axes(sweep_dir)
    rows = []
    for entry in plan:
        cfg = yaml.safe_load((sweep_dir / entry["config"]).read_text())
        model, norm = cfg["model"], cfg["model"]["norm"]
        run_dir = sweep_dir / entry["run_dir"]
        status = read_status(run_dir)
        row = RunRow(
            index=entry["index"],
            name=entry["name"],
            state=status.get("state", "pending"),
            axes=entry["axes"],
            width=int(model["hidden_size"]),
            alpha_attn=float(norm["alpha_attn"]),
            alpha_mlp=float(norm["alpha_mlp"]),
            alpha_final=float(norm["alpha_final"]),
            seed=int(cfg["train"]["seed"]),
            group=tuple((a, entry["axes"][a]) for a in group_axes if a in entry["axes"]),
            exit_code=status.get("exit_code"),
            message=status.get("message", ""),
            kind=str(norm.get("kind", "rmsnorm")),
            squash=str(norm.get("squash", "tanh")),
            part=entry.get("part"),
            train_steps=int(cfg["train"]["train_steps"]),
            tokens_per_step=int(cfg["train"]["global_batch_tokens"]),
            seconds=status.get("seconds"),
        )
        for key, value in read_metrics(run_dir / "metrics.jsonl").items():
            setattr(row, key, value)
        rows.append(row)
    return rows


def choose_metric(rows: list[RunRow], metric: str) -> str:
    """The metric to rank by: as asked, or (auto) the final validation loss when every finished
    run has one, else the final training loss."""
    if metric != "auto":
        if metric not in METRICS:
            raise SweepError(f"metric {metric!r}: allowed: auto, {', '.join(METRICS)}")
        return metric
    done = [r for r in rows if r.state == "done"]
    if done and all(r.final_valid is not None for r in done):
        return "final_valid"
    return "final_train"


# ---- tables ------------------------------------------------------------------------------------


@dataclass
class Cell:
    alpha_attn: float
    alpha_other: float
    values: list[float] = field(default_factory=list)  # metric of the done runs, one per seed
    runs: int = 0
    diverged: int = 0
    failed: int = 0  # ended without a usable metric
    unfinished: int = 0  # pending or running: not a failure (yet)

    @property
    def stats(self) -> Spread:
        return spread(self.values)

    @property
    def eligible(self) -> bool:
        return bool(self.values) and self.diverged == 0


@dataclass
class WidthTable:
    group: tuple[tuple[str, Any], ...]
    width: int
    attn: list[float]
    other: list[float]
    cells: dict[tuple[float, float], Cell]
    best: Cell | None

    @property
    def title(self) -> str:
        extra = ", ".join(f"{k}={_num(v)}" for k, v in self.group)
        return f"width {self.width}" + (f" ({extra})" if extra else "")

    @property
    def slug(self) -> str:
        extra = "".join(f"_{k.rpartition('.')[2]}{_num(v)}" for k, v in self.group)
        return f"w{self.width}{extra}".replace("/", "_")


def tables(rows: list[RunRow], metric: str) -> list[WidthTable]:
    """One α₀ᵃᵗᵗⁿ × α₀ᵒᵗʰᵉʳ table per (group, width); α₀ᵒᵗʰᵉʳ is the FFN norm's α₀."""
    by_key: dict[tuple, dict[tuple[float, float], Cell]] = {}
    for r in rows:
        cells = by_key.setdefault((r.group, r.width), {})
        cell = cells.setdefault((r.alpha_attn, r.alpha_mlp), Cell(r.alpha_attn, r.alpha_mlp))
        cell.runs += 1
        value = r.metric(metric)
        if r.state == "diverged":
            cell.diverged += 1
        elif r.state == "done" and value is not None and math.isfinite(value):
            cell.values.append(value)
        elif r.state in ("pending", "running"):
            cell.unfinished += 1
        else:
            cell.failed += 1
    out = []
    for (group, width), cells in sorted(
        by_key.items(), key=lambda kv: (_order(kv[0][0]), kv[0][1])
    ):
        eligible = [c for c in cells.values() if c.eligible]
        best = min(eligible, key=lambda c: c.stats.mean) if eligible else None
        out.append(
            WidthTable(
                group,
                width,
                sorted({k[0] for k in cells}),
                sorted({k[1] for k in cells}),
                cells,
                best,
            )
        )
    return out


def _order(group: tuple) -> tuple:
    """A sort key for groups, whose values may mix numbers, text and None (null in the spec):
    numbers first, in order, then everything else by its text."""
    return tuple(
        (name, (0, v) if isinstance(v, (int, float)) and not isinstance(v, bool) else (1, str(v)))
        for name, v in group
    )


def _num(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def _cell_text(cell: Cell | None, best: bool) -> str:
    if cell is None:
        return "—"
    s = cell.stats
    if not cell.values:
        if cell.diverged:
            return f"diverged ({cell.diverged}/{cell.runs})"
        if cell.failed:
            return "failed"
        return "not run yet" if cell.unfinished else "—"
    text = f"{s.mean:.4f} ± {s.std:.4f}" if s.n > 1 else f"{s.mean:.4f}"
    text += f" (n={s.n})"
    if best:
        text = f"**{text}**"
    if cell.diverged:
        text += f" ⚠ diverged {cell.diverged}/{cell.runs}"
    elif cell.failed or cell.unfinished:
        text += f" ({cell.failed + cell.unfinished} missing)"
    return text


def markdown_table(t: WidthTable) -> str:
    head = "| α₀ᵃᵗᵗⁿ \\ α₀ᵒᵗʰᵉʳ | " + " | ".join(_num(o) for o in t.other) + " |"
    lines = [head, "|---" * (len(t.other) + 1) + "|"]
    for a in t.attn:
        cells = [_cell_text(t.cells.get((a, o)), t.cells.get((a, o)) is t.best) for o in t.other]
        lines.append(f"| {_num(a)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def best_line(t: WidthTable, metric: str) -> str:
    if t.best is None:
        return "No cell finished without divergence: no best α₀ for this width."
    s = t.best.stats
    text = (
        f"Best: α₀ᵃᵗᵗⁿ = {_num(t.best.alpha_attn)}, α₀ᵒᵗʰᵉʳ = {_num(t.best.alpha_other)}:"
        f" {METRICS[metric]} {s.mean:.4f}"
    )
    if s.n > 1:
        text += (
            f" ± {s.std:.4f} (std over {s.n} seeds), 95% t-interval of the mean"
            f" [{s.ci_low:.4f}, {s.ci_high:.4f}]."
        )
    else:
        text += " (1 seed: no spread or interval; add seeds for one)."
    return text


# ---- figures -----------------------------------------------------------------------------------


def _savefig(fig, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fig.savefig(tmp, format="png", dpi=130, bbox_inches="tight")
    os.replace(tmp, path)


def heatmap(t: WidthTable, metric: str, path: Path) -> None:
    """Annotated α₀ heat-map: mean ± std per cell, diverged cells hatched grey, best outlined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    grid = np.full((len(t.attn), len(t.other)), np.nan)
    for i, a in enumerate(t.attn):
        for j, o in enumerate(t.other):
            cell = t.cells.get((a, o))
            if cell is not None and cell.values:
                grid[i, j] = cell.stats.mean
    fig, ax = plt.subplots(
        figsize=(max(4.8, 1.6 + 1.35 * len(t.other)), max(3.4, 1.4 + 0.85 * len(t.attn)))
    )
    cmap = matplotlib.colormaps["viridis_r"].with_extremes(bad="#f2f2f2")
    finite = grid[np.isfinite(grid)]
    vmin, vmax = (finite.min(), finite.max()) if finite.size else (0.0, 1.0)
    if vmax - vmin < 1e-12:
        vmin, vmax = vmin - 0.5, vmax + 0.5
    norm = matplotlib.colors.Normalize(vmin, vmax)
    image = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, norm=norm, aspect="auto")
    for i, a in enumerate(t.attn):
        for j, o in enumerate(t.other):
            cell = t.cells.get((a, o))
            if cell is not None and cell.diverged:
                ax.add_patch(
                    Rectangle(
                        (j - 0.5, i - 0.5),
                        1,
                        1,
                        facecolor="#9e9e9e" if not cell.values else "none",
                        hatch="///",
                        edgecolor="#5a5a5a",
                        linewidth=0,
                    )
                )
            if cell is None:
                label, color = "not run", "#555555"
            elif not cell.values:
                label = (
                    f"diverged\n{cell.diverged}/{cell.runs}"
                    if cell.diverged
                    else "failed"
                    if cell.failed
                    else "not run yet"
                )
                color = "black"
            else:
                s = cell.stats
                label = f"{s.mean:.3f}" + (f"\n±{s.std:.3f}" if s.n > 1 else "\n(1 seed)")
                if cell.diverged:
                    label += f"\n{cell.diverged}/{cell.runs} div."
                r, g, b, _ = cmap(norm(s.mean))
                color = "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white"
            weight = "bold" if cell is not None and cell is t.best else "normal"
            ax.text(j, i, label, ha="center", va="center", color=color, fontsize=9, weight=weight)
    if t.best is not None:
        i, j = t.attn.index(t.best.alpha_attn), t.other.index(t.best.alpha_other)
        ax.add_patch(
            Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="#d62728", linewidth=3)
        )
    ax.set_xticks(range(len(t.other)), [_num(o) for o in t.other])
    ax.set_yticks(range(len(t.attn)), [_num(a) for a in t.attn])
    ax.set_xlabel(r"$\alpha_0^{\mathrm{other}}$ (FFN and final norm)")
    ax.set_ylabel(r"$\alpha_0^{\mathrm{attn}}$ (attention norm)")
    ax.set_title(f"{t.title}: {METRICS[metric]}\nmean ± std over seeds, lower is better")
    fig.colorbar(image, ax=ax, label=METRICS[metric])
    _savefig(fig, path)
    plt.close(fig)


def fit_figure(series: list[dict[str, Any]], path: Path) -> None:
    """Best α₀ against width on log-log axes, with each least-squares power law."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    # attn: filled circles, solid lines; other: open squares, dashed lines (both stay visible
    # where they coincide), each group (depth, ...) and component a colour of its own.
    palette = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b"]
    groups = sorted({s["group"] for s in series}, key=_order)
    for s in series:
        w = np.array(s["widths"], dtype=float)
        attn = s["component"] == "attn"
        color = palette[(2 * groups.index(s["group"]) + (0 if attn else 1)) % len(palette)]
        ax.plot(
            w,
            s["alphas"],
            "o" if attn else "s",
            markersize=7 if attn else 11,
            fillstyle="full" if attn else "none",
            color=color,
            zorder=3,
        )
        xs = np.geomspace(w.min(), w.max(), 50)
        ax.plot(
            xs,
            s["prefactor"] * xs ** s["slope"],
            "-" if attn else "--",
            color=color,
            label=f"{s['label']}: slope {s['slope']:.2f}",
        )
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    widths = sorted({w for s in series for w in s["widths"]})
    ax.set_xticks(widths, [str(int(w)) for w in widths])
    ax.set_xlabel("width (hidden size)")
    ax.set_ylabel(r"best $\alpha_0$")
    ax.set_title(r"Best $\alpha_0$ against width (least squares on log-log axes)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    _savefig(fig, path)
    plt.close(fig)


# ---- the report --------------------------------------------------------------------------------


@dataclass
class ReportOutput:
    folder: Path
    csv: Path
    markdown: Path
    figures: list[Path]
    summary: str
    fits: list[dict[str, Any]]


CSV_FIELDS = [
    "index",
    "name",
    "state",
    "width",
    "alpha_attn",
    "alpha_mlp",
    "alpha_final",
    "seed",
    "kind",
    "squash",
    "part",
    "step",
    "final_train_loss",
    "final_valid_loss",
    "best_valid_loss",
    "best_valid_step",
    "exit_code",
    "message",
]


def csv_text(rows: list[RunRow]) -> str:
    axes = list(dict.fromkeys(a for r in rows for a in r.axes))  # a study's parts differ
    # Grid axes come first, as the spec names them (a clash with a fixed column gets 'grid.').
    header = [f"grid.{a}" if a in CSV_FIELDS else a for a in axes]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow([*CSV_FIELDS[:3], *header, *CSV_FIELDS[3:]])
    for r in rows:
        values = {
            "index": r.index,
            "name": r.name,
            "state": r.state,
            "width": r.width,
            "alpha_attn": r.alpha_attn,
            "alpha_mlp": r.alpha_mlp,
            "alpha_final": r.alpha_final,
            "seed": r.seed,
            "kind": r.kind,
            "squash": r.squash,
            "part": r.part,
            "step": r.step,
            "final_train_loss": r.final_train,
            "final_valid_loss": r.final_valid,
            "best_valid_loss": r.best_valid,
            "best_valid_step": r.best_valid_step,
            "exit_code": r.exit_code,
            "message": r.message,
        }
        cells = [values[k] for k in CSV_FIELDS]
        writer.writerow(
            [
                *cells[:3],
                *(
                    json.dumps(r.axes[a]) if isinstance(r.axes.get(a), list) else r.axes.get(a, "")
                    for a in axes
                ),
                *("" if v is None else v for v in cells[3:]),
            ]
        )
    return buf.getvalue()


def fits(width_tables: list[WidthTable]) -> tuple[list[dict[str, Any]], list[str]]:
    """A power-law fit of the best α₀ against width per group and component; notes otherwise."""
    series, notes = [], []
    groups = sorted({t.group for t in width_tables}, key=_order)
    for group in groups:
        best = [t for t in width_tables if t.group == group and t.best is not None]
        extra = ", ".join(f"{k}={_num(v)}" for k, v in group)
        name = f" ({extra})" if extra else ""
        if len({t.width for t in best}) < 2:
            if not best and len(groups) > 1:
                continue  # nothing finished in this group; the tables say so
            notes.append(
                f"The fit of the best α₀ against width{name} needs at least 2 widths with a"
                f" best cell; this sweep has {len({t.width for t in best})}."
            )
            continue
        for component, attr, sym in (
            ("attn", "alpha_attn", "α₀ᵃᵗᵗⁿ"),
            ("other", "alpha_other", "α₀ᵒᵗʰᵉʳ"),
        ):
            widths = [t.width for t in best]
            alphas = [getattr(t.best, attr) for t in best]
            slope, prefactor = fit_power_law(widths, alphas)
            label = f"{sym}{name}"
            series.append(
                {
                    "component": component,
                    "group": extra,
                    "label": label.replace("α₀ᵃᵗᵗⁿ", r"$\alpha_0^{attn}$").replace(
                        "α₀ᵒᵗʰᵉʳ", r"$\alpha_0^{other}$"
                    ),
                    "symbol": sym,
                    "widths": widths,
                    "alphas": alphas,
                    "slope": slope,
                    "prefactor": prefactor,
                }
            )
    return series, notes


def write_report(
    sweep_dir: str | Path, out: str | Path | None = None, metric: str = "auto"
) -> ReportOutput:
    """Write results.csv, report.md, a heat-map PNG per width and alpha_vs_width.png."""
    sweep_dir = Path(sweep_dir)
    folder = Path(out) if out else sweep_dir / "report"
    folder.mkdir(parents=True, exist_ok=True)
    rows = collect(sweep_dir)
    metric = choose_metric(rows, metric)
    width_tables = tables(rows, metric)

    csv_path = folder / "results.csv"
    atomic_write(csv_path, csv_text(rows))

    states: dict[str, int] = {}
    for r in rows:
        states[r.state] = states.get(r.state, 0) + 1
    md = [
        f"# α₀ sweep report: {sweep_dir.name}",
        "",
        f"{len(rows)} runs: " + ", ".join(f"{n} {s}" for s, n in sorted(states.items())) + ".",
        f"Cells rank α₀ by the **{METRICS[metric]}** (lower is better): mean ± sample std over"
        " seeds (n = finished seeds). α₀ᵒᵗʰᵉʳ is the α₀ of the FFN and final norms. A cell in"
        " which any seed diverged is marked and never chosen as best. Every run's numbers are"
        " in `results.csv`.",
        "",
    ]
    figures = []
    for t in width_tables:
        png = folder / f"heatmap_{t.slug}.png"
        heatmap(t, metric, png)
        figures.append(png)
        md += [
            f"## {t.title}",
            "",
            markdown_table(t),
            "",
            best_line(t, metric),
            "",
            f"![{t.title}]({png.name})",
            "",
        ]
    series, notes = fits(width_tables)
    md += ["## Best α₀ against width", ""]
    best_rows = [t for t in width_tables if t.best is not None]
    if best_rows:
        md += ["| group | width | best α₀ᵃᵗᵗⁿ | best α₀ᵒᵗʰᵉʳ | loss |", "|---|---|---|---|---|"]
        for t in best_rows:
            group = ", ".join(f"{k}={_num(v)}" for k, v in t.group) or "all"
            md.append(
                f"| {group} | {t.width} | {_num(t.best.alpha_attn)} |"
                f" {_num(t.best.alpha_other)} | {t.best.stats.mean:.4f} |"
            )
        md.append("")
    for s in series:
        md.append(
            f"- {s['symbol']}{' (' + s['group'] + ')' if s['group'] else ''} ≈"
            f" {s['prefactor']:.4g} · width^{s['slope']:.3f} (least squares on log-log axes,"
            f" {len(s['widths'])} widths)"
        )
    md += notes
    paper_attn, _ = fit_power_law(list(PAPER_OPTIMA), [a for a, _ in PAPER_OPTIMA.values()])
    paper_other, _ = fit_power_law(list(PAPER_OPTIMA), [o for _, o in PAPER_OPTIMA.values()])
    md += [
        "",
        "For comparison, the DyT paper's optima (width 1024 → 1.0/1.0, 2048 → 1.0/0.5, 4096 →"
        f" 0.8/0.2, 8192 → 0.2/0.05) give slopes {paper_attn:.2f} (α₀ᵃᵗᵗⁿ) and"
        f" {paper_other:.2f} (α₀ᵒᵗʰᵉʳ): wider → smaller α₀.",
    ]
    if series:
        png = folder / "alpha_vs_width.png"
        fit_figure(series, png)
        figures.append(png)
        md += ["", f"![best α₀ against width]({png.name})"]
    unfinished = [r for r in rows if r.state != "done"]
    if unfinished:
        md += ["", "## Runs not finished", "", "| run | state | exit code | message |"]
        md.append("|---|---|---|---|")
        for r in unfinished:
            msg = (r.message or "").replace("|", "\\|")
            md.append(f"| {r.name} | {r.state} | {_num(r.exit_code or '')} | {msg} |")
    md_path = folder / "report.md"
    atomic_write(md_path, "\n".join(md) + "\n")

    summary = [
        f"{len(rows)} runs (" + ", ".join(f"{n} {s}" for s, n in sorted(states.items())) + ")"
    ]
    for t in width_tables:
        if t.best is not None:
            s = t.best.stats
            summary.append(
                f"{t.title}: best α₀ᵃᵗᵗⁿ={_num(t.best.alpha_attn)}"
                f" α₀ᵒᵗʰᵉʳ={_num(t.best.alpha_other)}  {s.mean:.4f}"
                + (f" ± {s.std:.4f}" if s.n > 1 else "")
            )
        else:
            summary.append(f"{t.title}: no finished cell without divergence")
    summary += [
        f"{s['symbol']} slope vs width{' ' + s['group'] if s['group'] else ''}: {s['slope']:.3f}"
        for s in series
    ]
    summary += notes
    return ReportOutput(folder, csv_path, md_path, figures, "\n".join(summary), series)
