"""Studies (docs/design.md §14): specs with parts, the study statistics against scipy, the study
report's structure and numbers, `megatron-dyt report RUN` on demo and diverged runs, and the
scaled-down CPU study end to end."""

from __future__ import annotations

import csv
import itertools
import json
import math
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from common import tiny_dict, train_dict
from scipy import stats as scipy_stats

from megatron_dyt.cli import main
from megatron_dyt.config import ConfigError, config_from_dict
from megatron_dyt.sweep import diagnose, state, stats, study
from megatron_dyt.sweep import spec as sweep_spec
from megatron_dyt.training.metrics import MetricsWriter

REPO = Path(__file__).resolve().parents[1]
GPU_STUDY = REPO / "configs/studies/alpha-width.yaml"
CPU_STUDY = REPO / "configs/studies/alpha-width-cpu.yaml"


# ---- specs with parts ---------------------------------------------------------------------------


def test_the_gpu_study_expands_seed_major_with_parts():
    runs = sweep_spec.validate(sweep_spec.load_spec(GPU_STUDY))
    assert len(runs) == (27 + 6 + 3) * 3
    names = [r.name for r, _ in runs]
    assert len(set(names)) == len(names)
    # seeds are the outer loop: the first third of the plan is seed 1, every part of it
    assert {cfg.train.seed for _, cfg in runs[:36]} == {1}
    assert [r.part for r, _ in runs[:36]] == ["alpha"] * 27 + ["norms"] * 6 + ["squash"] * 3
    assert names[0] == "alpha-w256-attn0.5-other0.5-seed1"
    assert names[27:29] == ["norms-w256-derf-seed1", "norms-w256-rmsnorm-seed1"]
    by_name = {r.name: cfg for r, cfg in runs}
    rms = by_name["norms-w1024-rmsnorm-seed2"]
    assert rms.model.norm.kind == "rmsnorm" and not rms.model.embedding_scale
    assert rms.model.hidden_size == 1024 and rms.model.num_heads == 16
    ident = by_name["squash-w512-identity-seed3"]
    assert (ident.model.norm.squash, ident.model.hidden_size, ident.model.norm.alpha_attn) == (
        "identity",
        512,
        1.0,
    )
    cell = by_name["alpha-w512-attn2-other0.5-seed1"]
    assert (cell.model.norm.alpha_attn, cell.model.norm.alpha_mlp) == (2.0, 0.5)
    assert cell.model.norm.alpha_final == 0.5 and cell.train.precision == "bf16"
    cpu = sweep_spec.validate(sweep_spec.load_spec(CPU_STUDY))
    assert len(cpu) == 18 and {r.part for r, _ in cpu} == {"alpha", "norms", "squash"}


def test_part_errors_name_the_part(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump(tiny_dict()))

    def spec(data: dict) -> Path:
        path = tmp_path / f"spec{len(list(tmp_path.glob('spec*.yaml')))}.yaml"
        path.write_text(yaml.safe_dump({"base": "base.yaml", **data}))
        return path

    seeds = {"seed": {"keys": ["train.seed"], "values": [1, 2]}}
    with pytest.raises(ConfigError, match=r"parts.a: unknown key 'gird' \(allowed: overrides"):
        sweep_spec.load_spec(spec({"parts": {"a": {"gird": {}}}, "grid": seeds}))
    clash = {"a": {"grid": {"s": {"keys": ["train.seed"], "values": [3]}}}}
    with pytest.raises(ConfigError, match="grid axes 's' and 'seed' both set train.seed"):
        sweep_spec.load_spec(spec({"parts": clash, "grid": seeds}))
    with pytest.raises(ConfigError, match="'parts' must map part names"):
        sweep_spec.load_spec(spec({"parts": [1], "grid": seeds}))
    # default names: part, its axes, the shared axes; a part may have no grid of its own
    ok = spec(
        {
            "parts": {
                "a": {"grid": {"model.norm.alpha_attn": [0.5, 1.0]}},
                "b": {"overrides": {"model.norm.kind": "rmsnorm"}},
            },
            "grid": seeds,
        }
    )
    runs = sweep_spec.validate(sweep_spec.load_spec(ok))
    assert [r.name for r, _ in runs] == [
        "a-alpha_attn0.5-seed1",
        "a-alpha_attn1-seed1",
        "b-seed1",
        "a-alpha_attn0.5-seed2",
        "a-alpha_attn1-seed2",
        "b-seed2",
    ]
    assert [cfg.model.norm.kind for _, cfg in runs[:3]] == ["dyt", "dyt", "rmsnorm"]
    # a spec template that leaves out the part's own name makes duplicates: one clear error
    dup = spec({"parts": {"a": {"grid": {"model.norm.alpha_attn": [0.5, 1.0]}}}, "grid": seeds,
                "name": "{part}-{seed}"})  # fmt: skip
    with pytest.raises(ConfigError, match="are both named 'a-1'"):
        sweep_spec.validate(sweep_spec.load_spec(dup))
    plan = state.prepare(ok, tmp_path / "out")
    assert [e["part"] for e in plan] == ["a", "a", "b"] * 2
    assert study.is_study(tmp_path / "out")


# ---- the statistics -----------------------------------------------------------------------------


def test_paired_interval_and_optimum_set_against_scipy():
    rng = np.random.default_rng(3)
    for n in (2, 3, 5, 8):
        a = dict(enumerate(rng.normal(3.0, 0.05, n)))
        b = {k: v + 0.03 + rng.normal(0, 0.02) for k, v in a.items()}
        b[99] = 1.0  # a seed only b has: not a pair, left out
        d = stats.paired(b, a)
        diffs = np.array([b[k] - a[k] for k in a])
        low, high = scipy_stats.t.interval(
            0.95, n - 1, loc=diffs.mean(), scale=scipy_stats.sem(diffs)
        )
        assert d.n == n and d.mean == pytest.approx(diffs.mean())
        assert (d.ci_low, d.ci_high) == (pytest.approx(low), pytest.approx(high))
    # the optimum set is the cells a two-sided paired t-test at 5% does not find worse
    for trial in range(20):
        cells = {
            (a, o): {s: 3.0 + 0.02 * (a - o) ** 2 + rng.normal(0, 0.01) + 0.005 * s for s in range(4)}
            for a, o in itertools.product([0.5, 1.0, 2.0], [0.5, 1.0])
        }  # fmt: skip
        best, near = stats.optimum_set(cells)
        assert best == min(cells, key=lambda k: np.mean(list(cells[k].values())))
        for key, values in cells.items():
            if key == best:
                assert key in near
                continue
            x = [values[s] for s in range(4)]
            y = [cells[best][s] for s in range(4)]
            test = scipy_stats.ttest_rel(x, y)
            worse = test.pvalue < 0.05 and np.mean(x) > np.mean(y)
            assert (key not in near) == worse, (trial, key)
    # one common seed: a cell cannot be ruled out
    best, near = stats.optimum_set({"a": {1: 1.0}, "b": {1: 2.0}})
    assert best == "a" and near == ["a", "b"]


def test_bootstrap_best_matches_exact_enumeration():
    # A wins on seeds 0 and 1, B on seed 2 by more: the best of a resample depends on the draw.
    cells = {"A": {0: 1.0, 1: 1.0, 2: 1.5}, "B": {0: 1.2, 1: 1.2, 2: 0.9}}
    exact = 0
    for draw in itertools.product(range(3), repeat=3):
        mean_a = np.mean([cells["A"][s] for s in draw])
        mean_b = np.mean([cells["B"][s] for s in draw])
        exact += mean_a <= mean_b
    exact /= 27
    picks = stats.bootstrap_best(cells, 20000, np.random.default_rng(0))
    assert picks.count("A") / len(picks) == pytest.approx(exact, abs=0.01)
    # the same generator seed, the same draws
    assert stats.bootstrap_best(cells, 50, np.random.default_rng(1)) == stats.bootstrap_best(
        cells, 50, np.random.default_rng(1)
    )
    # a cell missing a drawn seed is averaged over the seeds it has
    only = stats.bootstrap_best({"A": {0: 1.0}, "B": {1: 0.5}}, 200, np.random.default_rng(0))
    assert set(only) == {"A", "B"}
    low, high = stats.percentile_interval(list(range(101)))
    assert (low, high) == (pytest.approx(2.5), pytest.approx(97.5))


# ---- the study report on synthetic runs ---------------------------------------------------------

WIDTHS = [64, 128]
SEEDS = [1, 2, 3]
NOISE = {1: 0.0, 2: 0.01, 3: 0.03}


def _best(width: int) -> tuple[float, float]:
    return (1.0, 1.0) if width == 64 else (0.5, 0.5)


def _loss(kind: str, squash: str, width: int, a: float, o: float, seed: int) -> float:
    base = 3.0 - 0.1 * math.log2(width / 64) + NOISE[seed]
    if kind == "rmsnorm":
        return base - 0.05 - 0.004 * seed
    if kind == "derf":
        return base - 0.02
    ba, bo = _best(width)
    loss = base + 0.04 * math.log2(a / ba) ** 2 + 0.02 * math.log2(o / bo) ** 2
    return loss + {"tanh": 0.0, "hardtanh": 0.03, "sigmoid": 0.08}.get(squash, 0.0)


def _norm_record(cfg, step: int, growth: float) -> dict:
    rec = {}
    for name in [f"layers.{i}.{a}" for i in range(4) for a in ("attention_norm", "mlp_norm")]:
        sat = growth * (0.2 if "mlp" in name else 0.05)
        rec[f"norm/{name}/input_std"] = 1.0 + step / 10
        if cfg.model.norm.kind != "rmsnorm":
            rec[f"norm/{name}/alpha"] = cfg.model.norm.alpha_attn
            rec[f"norm/{name}/saturated"] = sat
    rec["norm/output.norm/input_std"] = 2.0
    if cfg.model.norm.kind != "rmsnorm":
        rec["norm/output.norm/alpha"] = 0.9
        rec["norm/output.norm/saturated"] = 0.1 * growth
    return rec


def _fake_study(tmp_path: Path) -> Path:
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(tiny_dict()))
    width = {"keys": ["model.hidden_size"], "values": WIDTHS}
    spec = {
        "base": "base.yaml",
        "parts": {
            "alpha": {
                "grid": {
                    "width": width,
                    "alpha_attn": {"keys": ["model.norm.alpha_attn"], "values": [0.5, 1.0, 2.0]},
                    "alpha_other": {
                        "keys": ["model.norm.alpha_mlp", "model.norm.alpha_final"],
                        "values": [0.5, 1.0],
                    },
                }
            },
            "norms": {"grid": {"width": width, "model.norm.kind": ["derf", "rmsnorm"]}},
            "squash": {
                "overrides": {
                    "model.hidden_size": 64,
                    "model.norm.alpha_attn": 1.0,
                    "model.norm.alpha_mlp": 1.0,
                    "model.norm.alpha_final": 1.0,
                },
                "grid": {"model.norm.squash": ["hardtanh", "sigmoid", "identity"]},
            },
        },
        "grid": {"seed": {"keys": ["train.seed"], "values": SEEDS}},
    }
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    out = tmp_path / "study"
    for e in state.prepare(tmp_path / "spec.yaml", out):
        run_dir = out / e["run_dir"]
        run_dir.mkdir(parents=True)
        cfg = config_from_dict(yaml.safe_load((out / e["config"]).read_text()))
        n = cfg.model.norm
        loss = _loss(
            n.kind, n.squash, cfg.model.hidden_size, n.alpha_attn, n.alpha_mlp, cfg.train.seed
        )
        writer = MetricsWriter(run_dir, cfg, enabled=True)
        writer.write(10, {"loss": loss + 0.5, **_norm_record(cfg, 10, 0.5)})
        if n.squash == "identity":  # diverges after its first record
            writer.close()
            state.write_status(run_dir, {"state": "diverged", "exit_code": 1, "message": "nan"})
            continue
        writer.write(20, {"loss": loss + 0.1, "valid_loss": loss, **_norm_record(cfg, 20, 1.0)})
        writer.close()
        state.write_status(run_dir, {"state": "done", "exit_code": 0, "seconds": 12.0})
    return out


@pytest.mark.slow
def test_study_report_answers_each_question_with_its_statistics(tmp_path):
    out = _fake_study(tmp_path)
    assert main(["sweep", "report", str(out)]) == 0
    rep = out / "report"
    md = (rep / "report.md").read_text()
    data = json.loads((rep / "study.json").read_text())
    for heading in (
        "## 1. The best α₀ per width",
        "## 2. Best α₀ against width",
        "## 3. DyT and Derf against RMSNorm",
        "## 4. Squashing functions",
        "## 5. Saturation",
        "## What we found",
        "## Runs not finished",
    ):
        assert heading in md, heading
    assert data["metric"] == "final_valid" and data["states"] == {"diverged": 3, "done": 54}
    assert len(data["runs"]) == 57 and data["tokens_per_run"]
    # 1: the best cell per width is the synthetic optimum; its interval is scipy's
    best = {b["width"]: b for b in data["best_alpha"]}
    assert best[64]["best"] == [1.0, 1.0] and best[128]["best"] == [0.5, 0.5]
    losses = [_loss("dyt", "tanh", 64, 1.0, 1.0, s) for s in SEEDS]
    low, high = scipy_stats.t.interval(0.95, 2, loc=np.mean(losses), scale=scipy_stats.sem(losses))
    assert best[64]["loss"]["ci_low"] == pytest.approx(low)
    assert best[64]["loss"]["ci_high"] == pytest.approx(high)
    assert best[64]["verdict"] == "agrees (paper's α₀ in the interval)"
    assert [1.0, 1.0] in best[64]["not_worse"] and best[64]["bootstrap_frequency"] == 1.0
    # seeds move every cell alike here: the worst cells are significantly worse
    assert [2.0, 0.5] not in best[64]["not_worse"]
    # 2: the trend: both components halve from 64 to 128, every bootstrap draw agrees
    trend = {t["component"]: t for t in data["trend"]}
    assert trend["attn"]["slope"] == pytest.approx(-1.0)
    assert trend["attn"]["ci"] == [pytest.approx(-1.0), pytest.approx(-1.0)]
    assert trend["attn"]["verdict"].startswith("agrees: shrinks with width")
    # 3: gaps paired by seed, against scipy's paired t-interval
    gap = next(g for g in data["gaps"] if g["width"] == 64 and g["label"].startswith("Derf"))
    diffs = [
        _loss("derf", "tanh", 64, 1, 1, s) - _loss("rmsnorm", "tanh", 64, 1, 1, s) for s in SEEDS
    ]
    low, high = scipy_stats.t.interval(0.95, 2, loc=np.mean(diffs), scale=scipy_stats.sem(diffs))
    assert gap["diff"]["mean"] == pytest.approx(np.mean(diffs))
    assert (gap["diff"]["ci_low"], gap["diff"]["ci_high"]) == (
        pytest.approx(low),
        pytest.approx(high),
    )
    labels = [g["label"] for g in data["gaps"] if g["width"] == 128]
    assert labels == [
        "DyT at the paper's α₀ 1/1",
        "DyT at the best α₀ 0.5/0.5 (optimistic)",
        "Derf at α₀ 0.8/0.3",
    ]
    # 4: squash ranking best first, identity diverged in every seed and named
    assert [s["squash"] for s in data["squash"]] == ["tanh", "hardtanh", "sigmoid", "identity"]
    assert data["squash"][-1]["diverged"] == [f"squash-squashidentity-seed{s}" for s in SEEDS]
    hard = data["squash"][1]["vs_tanh"]
    assert hard["mean"] == pytest.approx(0.03) and hard["n"] == 3
    assert "Ranking: agrees: tanh < hardtanh < sigmoid in loss" in md
    assert "Identity: agrees: diverged in all 3 seeds" in md
    # 5: saturation per site; the MLP sites saturate more in this synthetic study
    found = {f["question"]: f for f in data["findings"]}
    assert found["saturation at the MLP (SwiGLU gate) site"]["verdict"].startswith("agrees")
    assert "+15.0%" in found["saturation at the MLP (SwiGLU gate) site"]["ours"]
    run = next(
        r for r in data["runs"] if r["name"] == "alpha-width64-alpha_attn1-alpha_other1-seed1"
    )
    assert run["norms"]["layers.0.mlp_norm"]["saturated"] == [0.1, 0.2]
    assert run["norms"]["output.norm"]["site"] == "final"
    # every question is in the findings, each with a published figure and a verdict
    assert {"squash ranking", "identity squash", "DyT's saturated fraction"} <= set(found)
    assert any(q.startswith("α₀ᵃᵗᵗⁿ shrinks") for q in found)
    assert all(f["published"] and f["verdict"] for f in data["findings"])
    names = sorted(p.name for p in rep.glob("*.png"))
    assert names == [
        "alpha.png",
        "alpha_vs_width.png",
        "gaps.png",
        "heatmap_w128.png",
        "heatmap_w64.png",
        "saturation.png",
        "squash.png",
    ]
    for png in rep.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size < 200_000
    rows = list(csv.DictReader((rep / "results.csv").read_text().splitlines()))
    assert len(rows) == 57 and rows[0]["width"] == "64"


# ---- one run's diagnostics ----------------------------------------------------------------------


def _metrics(run_dir: Path, records: list[dict], status: dict | None = None) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(r) for r in records]
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    if status:
        (run_dir / "status.json").write_text(json.dumps(status))


def test_diagnose_flags_growing_saturation_and_std_blowups_by_site(tmp_path, capsys):
    def rec(step, sat_mlp, std_final, loss=3.0):
        return {
            "step": step,
            "loss": loss,
            "norm/layers.0.attention_norm/alpha": 0.5,
            "norm/layers.0.attention_norm/input_std": 1.0,
            "norm/layers.0.attention_norm/saturated": 0.2,  # high from the start: not grown
            "norm/layers.0.mlp_norm/alpha": 0.4,
            "norm/layers.0.mlp_norm/input_std": 1.0,
            "norm/layers.0.mlp_norm/saturated": sat_mlp,
            "norm/output.norm/alpha": 0.3,
            "norm/output.norm/input_std": std_final,
            "norm/output.norm/saturated": 0.0,
        }

    run = tmp_path / "run"
    records = [
        rec(10, 0.01, 1.0),
        {"step": 10, "event": "checkpoint", "path": "x"},
        rec(20, 0.05, 5.0),
        rec(30, 0.30, 12.0),
    ]
    _metrics(run, records, {"state": "finished", "step": 30, "train_steps": 30})
    with open(run / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 31, "loss": 2.')  # cut short by a crash
    d = diagnose.diagnose(run)
    assert [s.layer for s in d.layers] == ["layers.0.attention_norm", "layers.0.mlp_norm",
                                           "output.norm"]  # fmt: skip
    assert [s.site for s in d.layers] == ["attention", "mlp", "final"]
    assert d.layers[1].saturated == [0.01, 0.05, 0.30] and d.layers[1].steps == [10, 20, 30]
    assert [(f.layer, f.site, f.kind) for f in d.flags] == [
        ("layers.0.mlp_norm", "mlp", "saturation"),
        ("output.norm", "final", "input std"),
    ]
    assert "1.0% → 30.0%" in d.flags[0].detail and "12×" in d.flags[1].detail
    # a higher threshold: the MLP layer is not flagged
    assert [f.kind for f in diagnose.diagnose(run, threshold=0.5).flags] == ["input std"]

    assert main(["report", str(run), "--threshold", "0.1"]) == 0
    out = capsys.readouterr().out
    assert "State: **finished at step 30 of 30**" in out
    assert "| layers.0.mlp_norm | mlp | saturation: saturated 1.0% → 30.0%" in out
    assert "| layers.0.mlp_norm | mlp | 1.0% | 5.0% | 30.0% |" in out
    assert sorted(p.name for p in (run / "report").iterdir()) == [
        "diagnosis.json",
        "diagnosis.md",
        "norm_stats.png",
    ]
    assert json.loads((run / "report/diagnosis.json").read_text())["flags"][0]["site"] == "mlp"

    # a non-finite statistic (logged as null) is flagged where it happened
    nan = [rec(10, 0.0, 1.0), {**rec(20, 0.0, 1.0), "norm/output.norm/input_std": None}]
    _metrics(tmp_path / "nan", nan)
    flags = diagnose.diagnose(tmp_path / "nan").flags
    assert [(f.layer, f.detail) for f in flags] == [
        ("output.norm", "input std non-finite at step 20")
    ]


def test_report_run_errors_are_one_line(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("megatron-dyt: error: run folder") and "Traceback" not in err
    (tmp_path / "sweep").mkdir()
    (tmp_path / "sweep/plan.json").write_text("[]")
    assert main(["report", str(tmp_path / "sweep")]) == 2
    assert "it is a sweep folder: `megatron-dyt sweep report`" in capsys.readouterr().err
    _metrics(tmp_path / "run", [{"step": 1, "loss": 3.0}])
    with pytest.raises(SystemExit):
        main(["report", str(tmp_path / "run"), "--threshold", "1.5"])
    assert "expected a fraction" in capsys.readouterr().err
    assert main(["sweep", "report", str(tmp_path / "run")]) == 2
    assert "it is a run folder: `megatron-dyt report RUN`" in capsys.readouterr().err
    # no statistics recorded yet: said so, no figure
    assert main(["report", str(tmp_path / "run")]) == 0
    assert "No norm statistics were recorded" in capsys.readouterr().out
    assert not (tmp_path / "run/report/norm_stats.png").exists()


@pytest.mark.slow
def test_report_run_on_a_demo_run_and_a_diverged_run(corpus, tmp_path, capsys):
    ok = train_dict(corpus, train_steps=4, stats_interval=2)
    assert main(["train", _yaml(tmp_path / "ok.yaml", ok), "--run-dir", str(tmp_path / "ok"),
                 "--no-progress"]) == 0  # fmt: skip
    capsys.readouterr()
    assert main(["report", str(tmp_path / "ok")]) == 0
    out = capsys.readouterr().out
    assert "State: **finished at step 4 of 4**" in out
    d = json.loads((tmp_path / "ok/report/diagnosis.json").read_text())
    assert [s["site"] for s in d["layers"]] == ["attention", "mlp"] * 2 + ["final"]
    assert all(s["steps"] == [2, 4] for s in d["layers"])
    assert (tmp_path / "ok/report/norm_stats.png").is_file()

    # identity squashing (no squash at all) with a high learning rate and no clipping diverges
    bad = train_dict(corpus, train_steps=20, stats_interval=1, lr=50.0, grad_clip=0.0,
                     warmup_steps=0)  # fmt: skip
    bad["model"]["norm"]["squash"] = "identity"
    code = main(["train", _yaml(tmp_path / "bad.yaml", bad), "--run-dir", str(tmp_path / "bad"),
                 "--no-progress"])  # fmt: skip
    assert code == 1
    status = json.loads((tmp_path / "bad/status.json").read_text())
    assert status["state"] == "diverged"
    capsys.readouterr()
    assert main(["report", str(tmp_path / "bad")]) == 0
    out = capsys.readouterr().out
    assert f"State: **diverged after step {status['step']}" in out
    d = json.loads((tmp_path / "bad/report/diagnosis.json").read_text())
    assert d["state"] == "diverged" and d["layers"]
    assert all(s["steps"][-1] == status["step"] for s in d["layers"])


def _yaml(path: Path, data: dict) -> str:
    path.write_text(yaml.safe_dump(data))
    return str(path)


# ---- the CPU study end to end -------------------------------------------------------------------


@pytest.mark.slow
def test_cpu_study_runs_and_its_report_has_every_part(corpus, tmp_path, capsys):
    """configs/studies/alpha-width-cpu.yaml on this machine's CPUs (about 2-3 minutes on 2
    cores), then its report: the structure and statistics are checked, not the losses."""
    data = yaml.safe_load(CPU_STUDY.read_text())
    data["base"] = str(CPU_STUDY.parent / data["base"])
    data["overrides"].update({"data.cache_dir": corpus["cache"], "model.vocab_size": 512})
    spec = tmp_path / "study.yaml"
    spec.write_text(yaml.safe_dump(data, sort_keys=False))
    out = tmp_path / "study"
    t0 = time.time()
    code = main(["sweep", "run", str(spec), "--out", str(out), "--parallel", "2", "--no-progress"])
    seconds = time.time() - t0
    assert code == 0, capsys.readouterr()
    assert main(["sweep", "report", str(out)]) == 0
    rep = out / "report"
    study_json = json.loads((rep / "study.json").read_text())
    runs = study_json["runs"]
    assert len(runs) == 18 and all(r["state"] in ("done", "diverged") for r in runs)
    assert study_json["tokens_per_run"] == [16 * 1024]
    assert study_json["epochs"] and study_json["epochs"][0] < 1
    for r in runs:
        if r["state"] == "done" and r["kind"] != "rmsnorm":
            sites = {v["site"] for v in r["norms"].values()}
            assert sites == {"attention", "mlp", "final"}
            assert all(v["steps"][-1] == 16 for v in r["norms"].values())
    # the statistics, recomputed from results.csv with scipy
    rows = list(csv.DictReader((rep / "results.csv").read_text().splitlines()))

    def losses(**want):
        return {
            int(r["seed"]): float(r["final_valid_loss"])
            for r in rows
            if r["state"] == "done" and all(r[k] == v for k, v in want.items())
        }

    for best in study_json["best_alpha"]:
        cells = {
            a: losses(part="alpha", kind="dyt", width=str(best["width"]), alpha_attn=a)
            for a in ("0.5", "1.0")
        }
        means = {a: np.mean(list(v.values())) for a, v in cells.items() if v}
        assert best["best"][0] == float(min(means, key=means.get))
    gap = next(g for g in study_json["gaps"] if g["label"].startswith("Derf"))
    derf, rms = losses(kind="derf"), losses(kind="rmsnorm")
    diffs = [derf[s] - rms[s] for s in sorted(derf)]
    low, high = scipy_stats.t.interval(0.95, 1, loc=np.mean(diffs), scale=scipy_stats.sem(diffs))
    assert gap["diff"]["mean"] == pytest.approx(np.mean(diffs))
    assert (gap["diff"]["ci_low"], gap["diff"]["ci_high"]) == (
        pytest.approx(low),
        pytest.approx(high),
    )
    assert {s["squash"] for s in study_json["squash"]} == {
        "tanh",
        "hardtanh",
        "sigmoid",
        "identity",
    }
    md = (rep / "report.md").read_text()
    for heading in ("## 1.", "## 2.", "## 3.", "## 4.", "## 5.", "## What we found"):
        assert heading in md
    print(f"CPU study: 18 runs in {seconds:.0f} s")


# ---- the GPU script's phases --------------------------------------------------------------------


@pytest.mark.slow
def test_gpu_study_prunes_checkpoints_and_collects_the_summaries(tmp_path):
    import importlib.util
    import tarfile

    spec = importlib.util.spec_from_file_location("gpu_study", REPO / "benchmarks/gpu_study.py")
    gpu_study = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_study)
    out = _fake_study(tmp_path)
    done = out / "runs/alpha-width64-alpha_attn1-alpha_other1-seed1/checkpoints/step_0000020"
    running = out / "runs/alpha-width64-alpha_attn1-alpha_other1-seed2/checkpoints/step_0000010"
    for folder in (done, running):
        (folder / "global_step20").mkdir(parents=True)
        (folder / "global_step20/mp_rank_00_model_states.pt").write_bytes(b"x" * 100)
        (folder / "complete.json").write_text('{"step": 20}')
    state.write_status(running.parents[1], {"state": "running"})
    assert gpu_study.prune_once(out) == 1
    assert sorted(p.name for p in done.iterdir()) == ["complete.json"]  # still marks it done
    assert state.finished_step(done.parents[1]) == 20
    assert (running / "global_step20/mp_rank_00_model_states.pt").is_file()  # still training

    result = gpu_study.collect(
        gpu_study.argparse.Namespace(
            sweep_dir=str(out), out=str(tmp_path / "OUT"), device="test", spec="s.yaml",
            sweep_seconds=12.0,
        )
    )  # fmt: skip
    data = json.loads(result.read_text())
    assert result.name == "study-test.json" and data["device"] == {"slug": "test"}
    assert data["sweep_seconds"] == 12.0 and len(data["runs"]) == 57 and data["findings"]
    assert (tmp_path / "OUT/report.md").is_file() and (tmp_path / "OUT/report/gaps.png").is_file()
    with tarfile.open(tmp_path / "OUT/runs.tar.gz") as tar:
        names = tar.getnames()
    assert "runs/squash-squashidentity-seed1/metrics.jsonl" in names
    assert not any("checkpoints" in n for n in names)
