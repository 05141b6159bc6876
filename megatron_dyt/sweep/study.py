"""A study's report: the questions of docs/design.md §14 answered from one sweep folder, each
next to the published figure it is held against.

A study is a sweep spec with `parts` (spec.py); `sweep report` writes this report for it. Runs
are sorted into the questions by their configs, not by part names:

- **best α₀ per width**: DyT runs with tanh, one α₀ᵃᵗᵗⁿ × α₀ᵒᵗʰᵉʳ table per width (report.py's
  tables and heat-maps); the best cell, the 95% t-interval of its loss, the set of cells not
  shown worse than it by a paired t-test over seeds (the interval of the optimum), and how
  often a seed bootstrap picks the same cell;
- **the trend**: least squares of log best α₀ against log width, with a 95% seed-bootstrap
  percentile interval of the slope (each draw resamples seeds within every width, takes each
  width's best cell and refits);
- **norm gaps**: DyT − RMSNorm and Derf − RMSNorm per width, paired by seed, t-intervals; DyT
  at the paper's α₀ and at the best α₀ of the grid (chosen on the same seeds, so optimistic);
- **squashing functions**: at the width and α₀ of the non-tanh DyT runs, each function's loss
  with its t-interval against tanh's runs there, the ranking, and the diverged runs by name;
- **saturation**: per run and site the saturated fraction |α·x| > 2 and α at the last record,
  the MLP − attention difference over runs, and figures of the saturation per layer over steps.

Diverged runs never enter a mean; a cell with a diverged seed is never best (report.py). The
bootstrap uses a fixed generator seed, so a report is reproducible.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from megatron_dyt.fileio import atomic_write
from megatron_dyt.sweep.diagnose import LayerSeries, norm_series, read_records
from megatron_dyt.sweep.report import (
    METRICS,
    PAPER_OPTIMA,
    RunRow,
    WidthTable,
    choose_metric,
    collect,
    csv_text,
    heatmap,
    markdown_table,
    tables,
)
from megatron_dyt.sweep.stats import (
    Spread,
    bootstrap_best,
    fit_power_law,
    optimum_set,
    paired,
    percentile_interval,
    spread,
)

BOOTSTRAP_DRAWS = 2000
BOOTSTRAP_SEED = 0
# The published figures each finding is held against (the sources; docs/design.md §14).
PUBLISHED = {
    "alpha": "DyT paper (LLaMA, 30B tokens): width 1024 → 1.0/1.0, 2048 → 1.0/0.5,"
    " 4096 → 0.8/0.2, 8192 → 0.2/0.05 (α₀ᵃᵗᵗⁿ/α₀ᵒᵗʰᵉʳ); width ≤ 1024 → 1.0/1.0",
    "gap_dyt": 0.122,  # nats above RMSNorm, 350M Megatron ablation, 1B tokens, seq 4096
    "gap_derf": 0.093,
    "alpha_effect": 0.02,  # α₀ 0.2–0.8 moved the loss by about this much (same ablation)
    "squash": ["tanh", "hardtanh", "sigmoid"],  # best first; identity diverges
    "saturation": "DyT ≈ 49% saturated vs LayerNorm 23% (GPT-2-style, 64M–3.8B); a larger α₀"
    " shrank the penalty; LLaMA-DyT collapses traced to the SwiGLU gate",
}


def is_study(sweep_dir: str | Path) -> bool:
    """Whether the sweep folder's spec has `parts`."""
    path = Path(sweep_dir) / "sweep.yaml"
    if not path.is_file():
        return False
    return bool((yaml.safe_load(path.read_text()) or {}).get("parts"))


# Keys that choose the norm itself: an axis setting them is what a study's questions compare,
# not a group of runs to keep apart (report.py's group axes), so it is dropped from the groups.
_NORM_KEYS = {"model.norm.kind", "model.norm.squash", "model.embedding_scale"}


def _norm_axes(sweep_dir: Path) -> set[str]:
    spec = yaml.safe_load((sweep_dir / "sweep.yaml").read_text()) or {}
    grids = [spec.get("grid") or {}]
    grids += [(p or {}).get("grid") or {} for p in (spec.get("parts") or {}).values()]
    return {
        name
        for grid in grids
        for name, axis in grid.items()
        if set(axis.get("keys", [name])) & _NORM_KEYS
    }


def paper_alpha(width: int) -> tuple[float, float] | None:
    """The paper's (α₀ᵃᵗᵗⁿ, α₀ᵒᵗʰᵉʳ) for a width: its table, and 1.0/1.0 at or below 1024."""
    if width in PAPER_OPTIMA:
        return PAPER_OPTIMA[width]
    return (1.0, 1.0) if width <= 1024 else None


def _num(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def _ci(s: Spread, digits: int = 4) -> str:
    if s.n == 0:
        return "—"
    if s.n == 1:
        return f"{s.mean:+.{digits}f} (1 seed: no interval)"
    return f"{s.mean:+.{digits}f} [{s.ci_low:+.{digits}f}, {s.ci_high:+.{digits}f}]"


def _value(r: RunRow, metric: str) -> float | None:
    v = r.metric(metric)
    return v if r.state == "done" and v is not None and math.isfinite(v) else None


def _by_seed(rows: list[RunRow], metric: str) -> dict[int, float]:
    return {r.seed: v for r in rows if (v := _value(r, metric)) is not None}


# ---- α₀ per width and the trend -----------------------------------------------------------------


@dataclass
class WidthOptimum:
    table: WidthTable
    cells: dict[tuple[float, float], dict[int, float]]  # eligible cells: seed -> loss
    best: tuple[float, float] | None
    best_loss: Spread | None
    near: list[tuple[float, float]]  # the cells not shown worse than the best
    draws: list[tuple[float, float]]  # the bootstrap's best cell per draw
    paper: tuple[float, float] | None

    @property
    def frequency(self) -> float:
        return self.draws.count(self.best) / len(self.draws) if self.draws else math.nan

    def paper_verdict(self) -> str:
        if self.paper is None:
            return "no published α₀ for this width"
        if self.best is None:
            return "no best cell"
        if self.paper not in self.table.cells:
            return "paper's α₀ not in the grid"
        if self.paper in self.near:
            return "agrees (paper's α₀ in the interval)"
        return "does not reproduce (paper's α₀ worse)"


def optima(rows: list[RunRow], metric: str, rng: np.random.Generator) -> list[WidthOptimum]:
    """The best α₀ per width (and group) of the DyT-tanh runs, with its intervals."""
    dyt = [r for r in rows if r.kind == "dyt" and r.squash == "tanh"]
    out = []
    for t in tables(dyt, metric):
        cells: dict[tuple[float, float], dict[int, float]] = {}
        for key, cell in t.cells.items():
            if not cell.eligible:
                continue
            runs = [
                r
                for r in dyt
                if (r.group, r.width, r.alpha_attn, r.alpha_mlp) == (t.group, t.width, *key)
            ]
            cells[key] = _by_seed(runs, metric)
        best = near = None
        draws: list = []
        if cells:
            best, near = optimum_set(cells)
            draws = bootstrap_best(cells, BOOTSTRAP_DRAWS, rng)
        out.append(
            WidthOptimum(
                t,
                cells,
                best,
                spread(list(cells[best].values())) if best else None,
                near or [],
                draws,
                paper_alpha(t.width),
            )
        )
    return out


def _span(values: list[float]) -> str:
    lo, hi = min(values), max(values)
    return _num(lo) if lo == hi else f"{_num(lo)}–{_num(hi)}"


@dataclass
class Trend:
    group: tuple
    component: str  # attn or other
    widths: list[int]
    alphas: list[float]
    slope: float
    prefactor: float
    ci: tuple[float, float]
    paper_slope: float

    def verdict(self) -> str:
        lo, hi = self.ci
        if hi < 0:
            where = "inside" if lo <= self.paper_slope <= hi else "outside"
            return f"agrees: shrinks with width (paper's slope {where} the interval)"
        if lo > 0:
            return "does not reproduce: grows with width"
        return "not shown: the interval includes 0 (no trend resolved)"


def trends(ws: list[WidthOptimum]) -> list[Trend]:
    """Per group, the power-law slope of the best α₀ against width with its bootstrap interval."""
    out = []
    for group in dict.fromkeys(w.table.group for w in ws):
        have = [w for w in ws if w.table.group == group and w.best is not None]
        if len({w.table.width for w in have}) < 2:
            continue
        widths = [w.table.width for w in have]
        for index, component in enumerate(("attn", "other")):
            alphas = [w.best[index] for w in have]
            slope, prefactor = fit_power_law(widths, alphas)
            slopes = [
                fit_power_law(widths, [w.draws[b][index] for w in have])[0]
                for b in range(min(len(w.draws) for w in have))
            ]
            paper = fit_power_law(list(PAPER_OPTIMA), [v[index] for v in PAPER_OPTIMA.values()])
            out.append(
                Trend(
                    group,
                    component,
                    widths,
                    alphas,
                    slope,
                    prefactor,
                    percentile_interval(slopes),
                    paper[0],
                )
            )
    return out


# ---- norm gaps ----------------------------------------------------------------------------------


@dataclass
class Gap:
    width: int
    group: tuple
    label: str  # what is compared with RMSNorm
    diff: Spread  # paired over seeds
    published: float | None

    def verdict(self) -> str:
        d = self.diff
        if d.n < 2:
            return "too few paired seeds"
        if d.ci_low > 0:
            side = "worse than RMSNorm"
            if self.published is None:
                return f"{side}"
            inside = d.ci_low <= self.published <= d.ci_high
            return f"agrees ({side}); published gap {'inside' if inside else 'outside'} interval"
        if d.ci_high < 0:
            return "does not reproduce: better than RMSNorm"
        return "not shown: the interval includes 0"


def gaps(rows: list[RunRow], ws: list[WidthOptimum], metric: str) -> list[Gap]:
    """DyT (paper α₀, best α₀) − RMSNorm and Derf − RMSNorm per width, paired by seed."""
    out = []
    for w in ws:
        t = w.table
        same = [r for r in rows if (r.group, r.width) == (t.group, t.width)]
        ref = _by_seed([r for r in same if r.kind == "rmsnorm"], metric)
        if not ref:
            continue
        if w.paper is not None and w.paper in w.cells:
            label = f"DyT at the paper's α₀ {_num(w.paper[0])}/{_num(w.paper[1])}"
            out.append(Gap(t.width, t.group, label, paired(w.cells[w.paper], ref), 0.122))
        if w.best is not None and w.best != w.paper:
            label = f"DyT at the best α₀ {_num(w.best[0])}/{_num(w.best[1])} (optimistic)"
            out.append(Gap(t.width, t.group, label, paired(w.cells[w.best], ref), 0.122))
        derf = [r for r in same if r.kind == "derf"]
        for key in sorted({(r.alpha_attn, r.alpha_mlp) for r in derf}):
            runs = [r for r in derf if (r.alpha_attn, r.alpha_mlp) == key]
            label = f"Derf at α₀ {_num(key[0])}/{_num(key[1])}"
            out.append(Gap(t.width, t.group, label, paired(_by_seed(runs, metric), ref), 0.093))
    return out


# ---- squashing functions ------------------------------------------------------------------------


@dataclass
class SquashResult:
    squash: str
    loss: Spread
    vs_tanh: Spread | None  # paired difference with tanh at the same α₀
    diverged: list[str]  # run names
    runs: int


def squash_results(
    rows: list[RunRow], metric: str
) -> tuple[tuple[int, float, float] | None, list[SquashResult]]:
    """At the (width, α₀) of the non-tanh DyT runs: each squashing function's loss, tanh's from
    the α₀ grid's runs with the same width, α₀ and group. Best first; diverged-only last."""
    others = [r for r in rows if r.kind == "dyt" and r.squash != "tanh"]
    if not others:
        return None, []
    where = others[0].width, others[0].alpha_attn, others[0].alpha_mlp
    group = others[0].group
    here = [
        r
        for r in rows
        if r.kind == "dyt"
        and (r.width, r.alpha_attn, r.alpha_mlp) == where
        and (r.squash != "tanh" or r.group == group)
    ]
    tanh = _by_seed([r for r in here if r.squash == "tanh"], metric)
    out = []
    for squash in dict.fromkeys(["tanh", *(r.squash for r in here)]):
        runs = [r for r in here if r.squash == squash]
        if not runs:
            continue
        values = _by_seed(runs, metric)
        out.append(
            SquashResult(
                squash,
                spread(list(values.values())),
                paired(values, tanh) if squash != "tanh" and tanh else None,
                [r.name for r in runs if r.state == "diverged"],
                len(runs),
            )
        )
    out.sort(key=lambda s: (s.loss.n == 0, s.loss.mean if s.loss.n else 0.0))
    return where, out


def squash_verdict(results: list[SquashResult]) -> tuple[str, str]:
    """(the published ranking's verdict, identity's)."""
    ranked = [s.squash for s in results if s.loss.n > 0 and s.squash in PUBLISHED["squash"]]
    order = [s for s in PUBLISHED["squash"] if s in ranked]
    if len(order) < 2:
        rank = "too few functions finished"
    elif ranked == order:
        rank = "agrees: " + " < ".join(ranked) + " in loss"
    else:
        rank = "does not reproduce: " + " < ".join(ranked) + " in loss"
    ident = next((s for s in results if s.squash == "identity"), None)
    if ident is None:
        return rank, "not run"
    if len(ident.diverged) == ident.runs:
        return rank, f"agrees: diverged in all {ident.runs} seeds"
    if ident.diverged:
        return rank, f"partly: diverged in {len(ident.diverged)} of {ident.runs} seeds"
    return rank, f"does not reproduce: trained without diverging in all {ident.runs} seeds"


# ---- saturation ---------------------------------------------------------------------------------


def site_means(layers: list[LayerSeries], stat: str) -> dict[str, float]:
    """The last recorded value of `stat`, averaged over the layers of each site."""
    out: dict[str, list[float]] = {}
    for s in layers:
        v = s.last(stat)
        if v is not None:
            out.setdefault(s.site, []).append(v)
    return {site: float(np.mean(v)) for site, v in out.items()}


def _sat_figure(panels: list[tuple[str, list[LayerSeries]]], stat: str, path: Path) -> None:
    """One panel per run: `stat` of every layer over steps, coloured by site."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(3, len(panels))
    nrows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(
        nrows, cols, figsize=(4.0 * cols, 2.9 * nrows), squeeze=False, sharey=stat == "saturated"
    )
    colors = {"attention": "#1f77b4", "mlp": "#d62728", "final": "#2ca02c", "other": "#7f7f7f"}
    for ax, (title, layers) in zip(axes.flat, panels, strict=False):
        seen = set()
        for i, s in enumerate(layers):
            ys = [math.nan if v is None else v for v in s.values(stat)]
            depth = i / max(1, len(layers) - 1)
            ax.plot(
                s.steps,
                ys,
                color=colors[s.site],
                alpha=0.35 + 0.65 * depth,  # deeper layers darker
                linewidth=1.2,
                label=s.site if s.site not in seen else None,
            )
            seen.add(s.site)
        ax.set_title(title, fontsize=8)
        ax.set_xlabel("step", fontsize=8)
        ax.grid(True, alpha=0.3)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    axes[0][0].legend(fontsize=7, title="site (darker: deeper)", title_fontsize=7)
    label = {"saturated": "saturated fraction |α·x| > 2", "alpha": "α"}[stat]
    fig.suptitle(f"{label} per layer over training", fontsize=10)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def _save(fig, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fig.savefig(tmp, format="png", dpi=90)
    os.replace(tmp, path)


def _trend_figure(ws: list[WidthOptimum], ts: list[Trend], path: Path) -> None:
    """Best α₀ per width with the optimum's interval as error bars, the fits, and the paper's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.0, 4.2))
    styles = {"attn": ("o", "#1f77b4", -0.03), "other": ("s", "#ff7f0e", 0.03)}
    for index, component in enumerate(("attn", "other")):
        marker, color, shift = styles[component]
        have = [w for w in ws if w.best is not None]
        xs = np.array([w.table.width * 2**shift for w in have], dtype=float)
        ys = np.array([w.best[index] for w in have])
        lo = np.array([min(k[index] for k in w.near) for w in have])
        hi = np.array([max(k[index] for k in w.near) for w in have])
        sym = "attn" if component == "attn" else "other"
        ax.errorbar(
            xs,
            ys,
            yerr=[ys - lo, hi - ys],
            fmt=marker,
            color=color,
            capsize=4,
            label=rf"ours $\alpha_0^{{{sym}}}$ (bars: cells not worse, 95%)",
        )
        for t in ts:
            if t.component == component:
                grid = np.geomspace(min(t.widths), max(t.widths), 20)
                ax.plot(
                    grid,
                    t.prefactor * grid**t.slope,
                    "-",
                    color=color,
                    alpha=0.6,
                    label=f"fit: slope {t.slope:.2f} [{t.ci[0]:.2f}, {t.ci[1]:.2f}]",
                )
        px = list(PAPER_OPTIMA)
        ax.plot(
            px,
            [PAPER_OPTIMA[w][index] for w in px],
            marker,
            color=color,
            fillstyle="none",
            markersize=9,
            linestyle=":",
            label=rf"paper $\alpha_0^{{{sym}}}$ (30B tokens)",
        )
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("width (hidden size)")
    ax.set_ylabel(r"best $\alpha_0$")
    ax.set_title(r"Best $\alpha_0$ against width")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def _interval_figure(items: list[tuple[str, Spread]], title: str, xlabel: str, path: Path) -> None:
    """Horizontal means with 95% t-interval bars, one row per item."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    items = [(k, s) for k, s in items if s.n > 0]
    if not items:
        return
    fig, ax = plt.subplots(figsize=(6.4, 0.9 + 0.42 * len(items)))
    for y, (_, s) in enumerate(items):
        if s.n > 1:
            ax.errorbar(
                s.mean,
                y,
                xerr=[[s.mean - s.ci_low], [s.ci_high - s.mean]],
                fmt="o",
                color="#1f77b4",
                capsize=4,
            )
        else:
            ax.plot(s.mean, y, "o", color="#7f7f7f")
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_yticks(range(len(items)), [k for k, _ in items], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel(xlabel)
    ax.set_title(title, fontsize=10)
    ax.grid(True, axis="x", alpha=0.3)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


# ---- the report ---------------------------------------------------------------------------------


@dataclass
class StudyOutput:
    folder: Path
    markdown: Path
    json: Path
    csv: Path
    figures: list[Path]
    summary: str
    data: dict[str, Any]


def _corpus_tokens(sweep_dir: Path, rows: list[RunRow]) -> tuple[int | None, float]:
    """Training tokens of the demo corpus the runs used (its manifest), and the train share."""
    if not rows:
        return None, 1.0
    cfg = yaml.safe_load((sweep_dir / "configs" / f"{rows[0].name}.yaml").read_text())
    data, vocab = cfg.get("data", {}), cfg["model"]["vocab_size"]
    split = [float(x) for x in str(data.get("split", "98,2,0")).split(",")]
    share = split[0] / sum(split) if sum(split) > 0 else 1.0
    if not data.get("demo"):
        return None, share
    cache = Path(data.get("cache_dir", ".cache/megatron-dyt"))
    for root in (cache, sweep_dir / cache, sweep_dir.parent / cache):
        try:
            manifest = json.loads((root / "demo" / "manifest.json").read_text())
            return int(manifest["datasets"][str(vocab)]["tokens"]), share
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return None, share


def _run_record(r: RunRow, layers: list[LayerSeries]) -> dict[str, Any]:
    return {
        "name": r.name,
        "part": r.part,
        "kind": r.kind,
        "squash": r.squash,
        "width": r.width,
        "alpha_attn": r.alpha_attn,
        "alpha_mlp": r.alpha_mlp,
        "alpha_final": r.alpha_final,
        "seed": r.seed,
        "group": dict(r.group),
        "state": r.state,
        "step": r.step,
        "train_steps": r.train_steps,
        "tokens": (r.train_steps or 0) * (r.tokens_per_step or 0),
        "final_train_loss": r.final_train,
        "final_valid_loss": r.final_valid,
        "best_valid_loss": r.best_valid,
        "seconds": r.seconds,
        "message": r.message,
        "norms": {
            s.layer: {
                "site": s.site,
                "steps": s.steps,
                "alpha": s.alpha,
                "input_std": s.input_std,
                "saturated": s.saturated,
            }
            for s in layers
        },
    }


def _spread_dict(s: Spread | None) -> dict[str, Any] | None:
    if s is None:
        return None
    clean = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in vars(s).items()}
    return clean


def write_study_report(
    sweep_dir: str | Path, out: str | Path | None = None, metric: str = "auto"
) -> StudyOutput:
    """report.md, study.json, results.csv and the figures of a study folder (module docstring)."""
    sweep_dir = Path(sweep_dir)
    folder = Path(out) if out else sweep_dir / "report"
    folder.mkdir(parents=True, exist_ok=True)
    rows = collect(sweep_dir)
    norm_axes = _norm_axes(sweep_dir)
    for r in rows:  # runs are sorted into questions by kind and squash, not by these axes
        r.group = tuple((a, v) for a, v in r.group if a not in norm_axes)
    metric = choose_metric(rows, metric)
    layers = {
        r.name: norm_series(read_records(sweep_dir / "runs" / r.name / "metrics.jsonl")[0])
        for r in rows
    }
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    ws = optima(rows, metric, rng)
    ts = trends(ws)
    gs = gaps(rows, ws, metric)
    squash_at, sq = squash_results(rows, metric)
    figures: list[Path] = []
    csv_path = folder / "results.csv"
    atomic_write(csv_path, csv_text(rows))

    states: dict[str, int] = {}
    for r in rows:
        states[r.state] = states.get(r.state, 0) + 1
    tokens = sorted({(r.train_steps or 0) * (r.tokens_per_step or 0) for r in rows})
    corpus, share = _corpus_tokens(sweep_dir, rows)
    epochs = [t / (corpus * share) for t in tokens] if corpus else []
    seconds = [r.seconds for r in rows if r.seconds]
    md = [
        f"# Study report: {sweep_dir.name}",
        "",
        f"{len(rows)} runs: " + ", ".join(f"{n} {s}" for s, n in sorted(states.items())) + ".",
        "Tokens per run: "
        + ", ".join(f"{t:,}" for t in tokens)
        + (
            f" ({', '.join(f'{e:.2f}' for e in epochs)} epochs of the {corpus * share:,.0f}"
            " training tokens of the demo corpus)."
            if corpus
            else " (corpus size unknown: not the demo corpus, or its cache is not here)."
        ),
        (f"Wall time per run: median {np.median(seconds):.0f} s." if seconds else ""),
        f"Losses are the **{METRICS[metric]}** (lower is better). Intervals are 95%: t-intervals"
        " over seeds, paired by seed for differences; the best α₀'s interval is the set of"
        " cells a paired t-test does not find worse than the best; slope intervals are seed"
        f"-bootstrap percentiles ({BOOTSTRAP_DRAWS} draws). A cell with a diverged seed is never"
        " best. Every run's numbers are in `results.csv` and `study.json`.",
        "",
    ]
    findings: list[dict[str, str]] = []

    # 1. best α₀ per width
    md += ["## 1. The best α₀ per width (DyT, tanh)", ""]
    for w in ws:
        t = w.table
        png = folder / f"heatmap_{t.slug}.png"
        heatmap(t, metric, png)
        figures.append(png)
        md += [f"### {t.title}", "", markdown_table(t), ""]
        if w.best is None:
            md += ["No cell finished without divergence.", ""]
            continue
        near = w.near
        md += [
            f"Best α₀ᵃᵗᵗⁿ/α₀ᵒᵗʰᵉʳ = **{_num(w.best[0])}/{_num(w.best[1])}**, loss"
            f" {w.best_loss.mean:.4f}"
            + (
                f", 95% t-interval [{w.best_loss.ci_low:.4f}, {w.best_loss.ci_high:.4f}]"
                f" over {w.best_loss.n} seeds"
                if w.best_loss.n > 1
                else " (1 seed)"
            )
            + f". Not shown worse (the interval of the optimum): {len(near)} of {len(w.cells)}"
            f" cells, α₀ᵃᵗᵗⁿ {_span([k[0] for k in near])}, α₀ᵒᵗʰᵉʳ"
            f" {_span([k[1] for k in near])}. The seed bootstrap picks this cell in"
            f" {100 * w.frequency:.0f}% of draws. Paper: "
            + (f"{_num(w.paper[0])}/{_num(w.paper[1])}" if w.paper else "—")
            + f" → {w.paper_verdict()}.",
            "",
            f"![{t.title}]({png.name})",
            "",
        ]
        means = [float(np.mean(list(v.values()))) for v in w.cells.values() if v]
        effect = max(means) - min(means) if len(means) > 1 else math.nan
        findings.append(
            {
                "question": f"best α₀ at {t.title}",
                "published": (f"{_num(w.paper[0])}/{_num(w.paper[1])}" if w.paper else "—"),
                "ours": f"{_num(w.best[0])}/{_num(w.best[1])} (interval: attn"
                f" {_span([k[0] for k in near])}, other {_span([k[1] for k in near])})",
                "verdict": w.paper_verdict(),
            }
        )
        if not math.isnan(effect):
            findings.append(
                {
                    "question": f"how much α₀ moves the loss at {t.title}",
                    "published": f"~{PUBLISHED['alpha_effect']} nats (α₀ 0.2–0.8, 350M)",
                    "ours": f"{effect:.3f} nats between the best and worst cell",
                    "verdict": "agrees (small)"
                    if effect <= 2 * PUBLISHED["alpha_effect"]
                    else "larger than published",
                }
            )

    # 2. the trend
    md += ["## 2. Best α₀ against width", ""]
    if ts:
        md += ["| group | α₀ | widths | best α₀ | slope | 95% interval | paper's slope | verdict |"]
        md += ["|---|---|---|---|---:|---|---:|---|"]
        for t in ts:
            g = ", ".join(f"{k}={_num(v)}" for k, v in t.group) or "all"
            md.append(
                f"| {g} | {t.component} | {', '.join(map(str, t.widths))} |"
                f" {', '.join(_num(a) for a in t.alphas)} | {t.slope:.2f} |"
                f" [{t.ci[0]:.2f}, {t.ci[1]:.2f}] | {t.paper_slope:.2f} | {t.verdict()} |"
            )
            findings.append(
                {
                    "question": f"α₀{'ᵃᵗᵗⁿ' if t.component == 'attn' else 'ᵒᵗʰᵉʳ'} shrinks with"
                    " width",
                    "published": f"slope {t.paper_slope:.2f} (widths 1024–8192)",
                    "ours": f"slope {t.slope:.2f} [{t.ci[0]:.2f}, {t.ci[1]:.2f}] (widths"
                    f" {min(t.widths)}–{max(t.widths)})",
                    "verdict": t.verdict(),
                }
            )
        png = folder / "alpha_vs_width.png"
        _trend_figure(ws, ts, png)
        figures.append(png)
        md += ["", f"![best α₀ against width]({png.name})", ""]
    else:
        md += ["Needs at least 2 widths with a best cell.", ""]

    # 3. gaps
    md += ["## 3. DyT and Derf against RMSNorm", ""]
    if gs:
        md += ["| width | compared with RMSNorm | gap (nats), 95% interval | pairs | verdict |"]
        md += ["|---:|---|---|---:|---|"]
        for g in gs:
            md.append(f"| {g.width} | {g.label} | {_ci(g.diff)} | {g.diff.n} | {g.verdict()} |")
            findings.append(
                {
                    "question": f"{g.label.split(' at ')[0]} − RMSNorm at width {g.width}"
                    + (" (best α₀)" if "best" in g.label else ""),
                    "published": f"+{g.published} (350M, 1B tokens, seq 4096)",
                    "ours": _ci(g.diff),
                    "verdict": g.verdict(),
                }
            )
        png = folder / "gaps.png"
        _interval_figure(
            [(f"w{g.width}: {g.label}", g.diff) for g in gs],
            "Loss gap to RMSNorm, paired by seed (95%)",
            "loss − RMSNorm's loss (nats)",
            png,
        )
        if png.exists():
            figures.append(png)
            md += ["", f"![gaps]({png.name})", ""]
    else:
        md += ["No RMSNorm runs at a width of the α₀ grid: no gaps.", ""]

    # 4. squashing functions
    md += ["## 4. Squashing functions", ""]
    if sq:
        width, a_attn, a_other = squash_at
        md += [
            f"Width {width}, α₀ {_num(a_attn)}/{_num(a_other)}; tanh's runs are the α₀ grid's.",
            "",
            "| rank | function | loss, 95% interval | − tanh, paired | runs | diverged |",
            "|---:|---|---|---|---:|---|",
        ]
        for i, s in enumerate(sq, 1):
            loss = (
                (
                    f"{s.loss.mean:.4f} [{s.loss.ci_low:.4f}, {s.loss.ci_high:.4f}]"
                    if s.loss.n > 1
                    else f"{s.loss.mean:.4f} (1 seed)"
                )
                if s.loss.n
                else "—"
            )
            vs = _ci(s.vs_tanh) if s.vs_tanh else "—"
            div = ", ".join(s.diverged) or "none"
            md.append(
                f"| {i if s.loss.n else '—'} | {s.squash} | {loss} | {vs} | {s.runs} | {div} |"
            )
        rank, ident = squash_verdict(sq)
        md += ["", f"Ranking: {rank}. Identity: {ident}.", ""]
        findings.append(
            {
                "question": "squash ranking",
                "published": "tanh > hardtanh > sigmoid",
                "ours": " > ".join(s.squash for s in sq if s.loss.n),
                "verdict": rank,
            }
        )
        findings.append(
            {
                "question": "identity squash",
                "published": "diverges",
                "ours": ", ".join(next(s.diverged for s in sq if s.squash == "identity"))
                or "no run diverged"
                if any(s.squash == "identity" for s in sq)
                else "not run",
                "verdict": ident,
            }
        )
        png = folder / "squash.png"
        _interval_figure(
            [(s.squash, s.vs_tanh) for s in sq if s.vs_tanh is not None],
            f"Squashing functions against tanh, width {width} (95%)",
            "loss − tanh's loss (nats)",
            png,
        )
        if png.exists():
            figures.append(png)
            md += [f"![squash]({png.name})", ""]
    else:
        md += ["No DyT runs with another squashing function.", ""]

    # 5. saturation
    md += ["## 5. Saturation: where DyT's norms go flat", ""]
    squashing = [r for r in rows if r.kind in ("dyt", "derf") and layers[r.name]]
    per_run = []
    for r in squashing:
        sat, alpha = site_means(layers[r.name], "saturated"), site_means(layers[r.name], "alpha")
        per_run.append((r, sat, alpha))
    if per_run:
        md += [
            "Last recorded saturated fraction |α·x| > 2 and α, averaged over the layers of each"
            " site (attention: the norm before attention; mlp: before the SwiGLU FFN, whose gate"
            " it feeds; final: before the head). Every layer's series is in `study.json`;"
            " `megatron-dyt report RUN` shows one run.",
            "",
            "| run | state | sat. attention | sat. mlp | sat. final | α attention | α mlp |"
            " α final |",
            "|---|---|---:|---:|---:|---:|---:|---:|",
        ]
        for r, sat, alpha in per_run:
            md.append(
                f"| {r.name} | {r.state} | "
                + " | ".join(
                    f"{100 * sat[s]:.1f}%" if s in sat else "—"
                    for s in ("attention", "mlp", "final")
                )
                + " | "
                + " | ".join(
                    f"{alpha[s]:.3g}" if s in alpha else "—" for s in ("attention", "mlp", "final")
                )
                + " |"
            )
        dyt_done = [(r, s) for r, s, _ in per_run if r.kind == "dyt" and r.squash == "tanh"]
        overall = spread([float(np.mean(list(s.values()))) for _, s in dyt_done if s])
        mlp_attn = spread(
            [s["mlp"] - s["attention"] for _, s in dyt_done if "mlp" in s and "attention" in s]
        )
        md += [
            "",
            f"DyT (tanh) runs, all sites: mean saturated fraction {_pct_ci(overall)}; MLP −"
            f" attention: {_pct_ci(mlp_attn, signed=True)} (t-intervals over runs).",
            "",
        ]
        findings.append(
            {
                "question": "DyT's saturated fraction",
                "published": "≈ 49% (vs LayerNorm 23%)",
                "ours": _pct_ci(overall),
                "verdict": "not comparable: RMSNorm/LayerNorm record no saturated fraction here,"
                " and the published runs are far longer",
            }
        )
        verdict = (
            "agrees: the MLP norms (the SwiGLU gate's input) saturate more"
            if mlp_attn.n > 1 and mlp_attn.ci_low > 0
            else "does not reproduce: the attention norms saturate more"
            if mlp_attn.n > 1 and mlp_attn.ci_high < 0
            else "not shown: the interval includes 0"
        )
        findings.append(
            {
                "question": "saturation at the MLP (SwiGLU gate) site",
                "published": "LLaMA-DyT collapses traced to the SwiGLU gate",
                "ours": f"MLP − attention saturated fraction {_pct_ci(mlp_attn, signed=True)}",
                "verdict": verdict,
            }
        )
        for w in ws:
            if w.best is None or len(w.cells) < 2:
                continue
            lo = min(w.cells, key=lambda k: (k[0] * k[1], k))
            hi = max(w.cells, key=lambda k: (k[0] * k[1], k))
            if lo == hi:
                continue
            d = paired(w.cells[hi], w.cells[lo])
            findings.append(
                {
                    "question": f"a larger α₀ shrinks DyT's penalty ({w.table.title})",
                    "published": "yes (GPT-2-style runs)",
                    "ours": f"loss(α₀ {_num(hi[0])}/{_num(hi[1])}) − loss(α₀"
                    f" {_num(lo[0])}/{_num(lo[1])}) = {_ci(d)}",
                    "verdict": "agrees"
                    if d.n > 1 and d.ci_high < 0
                    else "does not reproduce: larger α₀ is worse"
                    if d.n > 1 and d.ci_low > 0
                    else "not shown: the interval includes 0",
                }
            )
        # figures: the best DyT cell's first seed per width, and every other squash's first seed
        panels = []
        for w in ws:
            if w.best is None:
                continue
            runs = [
                r
                for r, _, _ in per_run
                if r.kind == "dyt"
                and r.squash == "tanh"
                and (r.group, r.width, r.alpha_attn, r.alpha_mlp)
                == (w.table.group, w.table.width, *w.best)
            ]
            if runs:
                r = min(runs, key=lambda r: r.seed)
                panels.append((f"{r.name} (best α₀)", layers[r.name]))
        for kind, squash in dict.fromkeys(
            (r.kind, r.squash) for r, _, _ in per_run if (r.kind, r.squash) != ("dyt", "tanh")
        ):
            r = min(
                (r for r, _, _ in per_run if (r.kind, r.squash) == (kind, squash)),
                key=lambda r: r.seed,
            )
            panels.append((f"{r.name} ({r.state})", layers[r.name]))
        if panels:
            for stat, name in (("saturated", "saturation.png"), ("alpha", "alpha.png")):
                png = folder / name
                _sat_figure(panels, stat, png)
                figures.append(png)
                md += [f"![{stat} per layer over steps]({png.name})", ""]
    else:
        md += ["No DyT or Derf run recorded norm statistics.", ""]

    # what we found
    md += ["## What we found", "", "| question | published | ours | verdict |"]
    md += ["|---|---|---|---|"]
    for f in findings:
        md.append(f"| {f['question']} | {f['published']} | {f['ours']} | {f['verdict']} |")
    md.append("")
    unfinished = [r for r in rows if r.state != "done"]
    if unfinished:
        md += ["## Runs not finished", "", "| run | state | message |", "|---|---|---|"]
        for r in unfinished:
            md.append(f"| {r.name} | {r.state} | {(r.message or '').replace('|', '/')} |")
        md.append("")

    data = {
        "study": sweep_dir.name,
        "metric": metric,
        "tokens_per_run": tokens,
        "corpus_train_tokens": round(corpus * share) if corpus else None,
        "epochs": epochs,
        "states": states,
        "bootstrap": {"draws": BOOTSTRAP_DRAWS, "seed": BOOTSTRAP_SEED},
        "best_alpha": [
            {
                "group": dict(w.table.group),
                "width": w.table.width,
                "best": w.best,
                "loss": _spread_dict(w.best_loss),
                "not_worse": w.near,
                "bootstrap_frequency": None if math.isnan(w.frequency) else w.frequency,
                "paper": w.paper,
                "verdict": w.paper_verdict(),
            }
            for w in ws
        ],
        "trend": [
            {
                "group": dict(t.group),
                "component": t.component,
                "widths": t.widths,
                "alphas": t.alphas,
                "slope": t.slope,
                "ci": t.ci,
                "paper_slope": t.paper_slope,
                "verdict": t.verdict(),
            }
            for t in ts
        ],
        "gaps": [
            {
                "width": g.width,
                "group": dict(g.group),
                "label": g.label,
                "diff": _spread_dict(g.diff),
                "published": g.published,
                "verdict": g.verdict(),
            }
            for g in gs
        ],
        "squash": [
            {
                "squash": s.squash,
                "loss": _spread_dict(s.loss),
                "vs_tanh": _spread_dict(s.vs_tanh),
                "diverged": s.diverged,
                "runs": s.runs,
            }
            for s in sq
        ],
        "findings": findings,
        "runs": [_run_record(r, layers[r.name]) for r in rows],
    }
    json_path = folder / "study.json"
    atomic_write(json_path, json.dumps(data, indent=1) + "\n")
    md_path = folder / "report.md"
    atomic_write(md_path, "\n".join(md) + "\n")
    summary = [
        f"{len(rows)} runs (" + ", ".join(f"{n} {s}" for s, n in sorted(states.items())) + ")"
    ]
    summary += [f"{f['question']}: {f['ours']} — {f['verdict']}" for f in findings]
    return StudyOutput(folder, md_path, json_path, csv_path, figures, "\n".join(summary), data)


def _pct_ci(s: Spread, signed: bool = False) -> str:
    if s.n == 0:
        return "—"
    f = "+.1f" if signed else ".1f"
    if s.n == 1:
        return f"{100 * s.mean:{f}}% (1 run)"
    return f"{100 * s.mean:{f}}% [{100 * s.ci_low:{f}}, {100 * s.ci_high:{f}}]% over {s.n} runs"
