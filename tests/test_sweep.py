"""α₀ sweeps: grid expansion and validation, the local runner (done/failed/diverged, resume),
the SLURM array script, and the report's numbers and figures."""

from __future__ import annotations

import csv
import json
import math
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from common import tiny_dict, train_dict

from megatron_dyt.cli import main
from megatron_dyt.config import ConfigError, config_from_dict
from megatron_dyt.sweep import report, runner, slurm_array, state, stats
from megatron_dyt.sweep import spec as sweep_spec
from megatron_dyt.training.metrics import MetricsWriter


def _write_spec(tmp_path: Path, base: dict, grid: dict, **extra) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({"base": "base.yaml", "grid": grid, **extra}, sort_keys=False))
    return spec


# ---- expansion ---------------------------------------------------------------------------------


def test_cartesian_product_with_tied_keys(tmp_path):
    spec = _write_spec(
        tmp_path,
        tiny_dict(),
        {
            "width": {
                "keys": ["model.hidden_size", "model.num_heads", "model.ffn_hidden_size"],
                "values": [[64, 4, 96], [128, 8, 192]],
            },
            "model.norm.alpha_attn": [0.5, 1.0, 2.0],
            "alpha_other": {
                "keys": ["model.norm.alpha_mlp", "model.norm.alpha_final"],
                "values": [0.25, 0.5],
            },
        },
        overrides={"train.train_steps": 7},
        name="w{width}-a{model.norm.alpha_attn}-o{alpha_other:.2f}",
    )
    runs = sweep_spec.validate(sweep_spec.load_spec(spec))
    assert len(runs) == 2 * 3 * 2
    names = [r.name for r, _ in runs]
    assert names[:3] == ["w64-a0.5-o0.25", "w64-a0.5-o0.50", "w64-a1-o0.25"]
    assert len(set(names)) == 12
    for run, cfg in runs:  # every value of a tied axis lands on each of its keys
        width = run.axes["width"]
        assert (cfg.model.hidden_size, cfg.model.num_heads) == (width, width // 16)
        assert cfg.model.ffn_hidden_size == width * 3 // 2
        assert cfg.model.norm.alpha_attn == run.axes["model.norm.alpha_attn"]
        assert cfg.model.norm.alpha_mlp == cfg.model.norm.alpha_final == run.axes["alpha_other"]
        assert cfg.train.train_steps == 7
        assert cfg.model.num_layers == 4  # from the base config
    # The last axis varies fastest, like nested loops in spec order.
    assert [(r.axes["width"], r.axes["model.norm.alpha_attn"]) for r, _ in runs[:4]] == [
        (64, 0.5),
        (64, 0.5),
        (64, 1.0),
        (64, 1.0),
    ]


def test_bad_key_or_value_fails_before_running_naming_the_run(tmp_path, capsys):
    spec = _write_spec(tmp_path, tiny_dict(), {"model.norm.alpha_atn": [0.5, 1.0]})
    with pytest.raises(ConfigError) as err:
        sweep_spec.validate(sweep_spec.load_spec(spec))
    msg = str(err.value)
    assert "sweep run 0 'alpha_atn0.5'" in msg
    assert "unknown key 'model.norm.alpha_atn' (did you mean 'model.norm.alpha_attn'?)" in msg

    bad_value = _write_spec(tmp_path / "value", tiny_dict(), {"model.norm.alpha_attn": [0.5, -1.0]})
    with pytest.raises(ConfigError, match=r"(?s)sweep run 1 'alpha_attn-1'.*α₀ must be a finite"):
        sweep_spec.validate(sweep_spec.load_spec(bad_value))

    # The CLI: one line, exit 2, nothing written, no traceback.
    out = tmp_path / "out"
    assert main(["sweep", "run", str(spec), "--out", str(out), "--no-progress"]) == 2
    err_text = capsys.readouterr().err
    assert "unknown key 'model.norm.alpha_atn'" in err_text and "Traceback" not in err_text
    assert not out.exists()


@pytest.mark.parametrize(
    "grid,message",
    [
        ({"w": {"keys": ["a.b", "c.d"], "values": [[1, 2, 3]]}}, "has 3 entries for 2 keys"),
        ({"w": {"values": [1]}}, "expected a list of values or {keys"),
        ({"w": []}, "has no values"),
        ({"w": {"keys": ["train.seed"], "values": [1, 2]}}, None),
        (
            {"train.seed": [1], "s": {"keys": ["train.seed"], "values": [2]}},
            "grid axes 'train.seed' and 's' both set train.seed",
        ),
    ],
)
def test_spec_errors(tmp_path, grid, message):
    spec = _write_spec(tmp_path, tiny_dict(), grid, name="fixed")
    if message is None:  # a template that leaves out an axis makes duplicate names
        message = "runs 0 and 1 are both named 'fixed'"
    with pytest.raises(ConfigError, match=message.replace("{", r"\{")):
        sweep_spec.validate(sweep_spec.load_spec(spec))


def test_unknown_template_field_and_missing_base(tmp_path):
    spec = _write_spec(tmp_path, tiny_dict(), {"train.seed": [1]}, name="s{seed}")
    with pytest.raises(ConfigError, match=r"field \{seed\} is not an axis \(axes: train.seed\)"):
        sweep_spec.validate(sweep_spec.load_spec(spec))
    spec = _write_spec(tmp_path, tiny_dict(), {"train.seed": [1]}, name="s{train.seed:.2q}")
    with pytest.raises(ConfigError, match=r"field \{train.seed:.2q\} cannot format 1: Unknown"):
        sweep_spec.validate(sweep_spec.load_spec(spec))
    with pytest.raises(ConfigError, match="base config 'nope.yaml' not found"):
        sweep_spec.spec_from_dict({"base": "nope.yaml", "grid": {"train.seed": [1]}}, tmp_path)


def test_not_a_sweep_folder_is_one_clear_error(tmp_path, capsys):
    for action in (["report"], ["run-one", "--index", "0"]):
        assert main(["sweep", action[0], str(tmp_path), *action[1:]]) == 2
        err = capsys.readouterr().err
        assert f"'{tmp_path}' is not a sweep folder (no plan.json)" in err
        assert "Traceback" not in err


# ---- SLURM array -------------------------------------------------------------------------------


def test_array_script(tmp_path):
    assert slurm_array.array_ranges([8, 0, 1, 2, 5, 7]) == "0-2,5,7-8"
    assert slurm_array.array_ranges([3]) == "3"
    script = slurm_array.array_script(
        tmp_path / "sw", [0, 1, 2, 4], max_running=2, partition="debug", time_limit="01:00:00"
    )
    lines = script.splitlines()
    assert lines[0] == "#!/bin/bash"
    assert "#SBATCH --array=0-2,4%2" in lines
    assert "#SBATCH --partition=debug" in lines and "#SBATCH --time=01:00:00" in lines
    assert f"#SBATCH --output={(tmp_path / 'sw').resolve()}/slurm/%A_%a.out" in lines
    assert lines[-1].endswith(
        f'-m megatron_dyt sweep run-one {(tmp_path / "sw").resolve()} --index "$SLURM_ARRAY_TASK_ID"'
    )
    path = tmp_path / "s.sh"
    path.write_text(script)
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
    with pytest.raises(ValueError, match="no runs to submit"):
        slurm_array.array_script(tmp_path, [])
    retry = slurm_array.array_script(tmp_path / "sw", [3], gpus_per_run=2, retry_diverged=True)
    assert retry.rstrip().endswith(
        '--index "$SLURM_ARRAY_TASK_ID" --nproc-per-run 2 --retry-diverged'
    )


def test_array_tasks_on_several_nodes_with_the_sites_options(tmp_path):
    """--nodes-per-run: each array task holds N nodes, the run's GPUs split over them, and
    run-one starts one torchrun per node through srun; --qos and raw --sbatch lines pass on."""
    script = slurm_array.array_script(
        tmp_path / "sw",
        [0, 1],
        gpus_per_run=16,
        nodes_per_run=2,
        qos="high",
        extra=["--constraint=h100", "--exclusive"],
    )
    lines = script.splitlines()
    for line in [
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --qos=high",
        "#SBATCH --constraint=h100",
        "#SBATCH --exclusive",
    ]:
        assert line in lines, line
    assert lines[-1].endswith("--nproc-per-run 16 --nodes-per-run 2")
    with pytest.raises(ValueError, match="--gpus-per-run 3 does not split over --nodes-per-run 2"):
        slurm_array.array_script(tmp_path, [0], gpus_per_run=3, nodes_per_run=2)
    cmd = runner.train_command(Path("c.yaml"), Path("r"), nproc=16, nodes=2)
    assert cmd[:4] == ["srun", "--ntasks-per-node=1", "--nodes=2", "--kill-on-bad-exit=1"]
    assert "--nnodes=2" in cmd and "--nproc-per-node=8" in cmd and "--rdzv-backend=c10d" in cmd


def test_runs_that_would_not_fit_are_not_queued(tmp_path, capsys):
    """Every run is checked against the GPU's memory before the array is submitted: one line
    per run that does not fit (`info`'s estimate, what would make it fit), nothing queued."""
    spec = _write_spec(
        tmp_path, tiny_dict(), {"model.hidden_size": [64, 4096], "train.seed": [1, 2]}
    )
    args = ["sweep", "run", str(spec), "--out", str(tmp_path / "o"), "--slurm"]
    assert main([*args, "--gpu-memory", "1"]) == 2
    err = capsys.readouterr().err
    assert "2 of 4 runs would not fit one GPU; nothing was queued" in err
    assert "sweep run 2 " in err and "sweep run 3 " in err and "sweep run 0 " not in err
    assert "does not fit in 1 GiB" in err and "Traceback" not in err
    assert not (tmp_path / "o" / "sweep.sbatch").exists()
    assert main([*args, "--gpu-memory", "1", "--no-check", "--dry-run"]) == 0


def test_slurm_dry_run_prints_script(tmp_path, capsys):
    spec = _write_spec(tmp_path, tiny_dict(), {"train.seed": [1, 2, 3]})
    out = tmp_path / "out"
    assert main(["sweep", "run", str(spec), "--out", str(out), "--slurm", "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert "#SBATCH --array=0-2\n" in printed and "sweep run-one" in printed
    assert "#SBATCH --job-name=sweep-out\n" in printed
    assert not out.exists()  # a dry run writes nothing
    args = ["sweep", "run", str(spec), "--out", str(tmp_path / "sweep-x"), "--slurm", "--dry-run"]
    assert main([*args, "--parallel", "1"]) == 0  # an explicit 1 is a limit too
    printed = capsys.readouterr().out
    assert "#SBATCH --array=0-2%1\n" in printed and "#SBATCH --job-name=sweep-x\n" in printed


def test_a_run_held_by_another_sweep_process_is_not_started_again(tmp_path):
    spec = _write_spec(tmp_path, tiny_dict(), {"train.seed": [1]})
    out = tmp_path / "out"
    entry = state.prepare(spec, out)[0]
    run_dir = out / entry["run_dir"]
    with state.claim(run_dir) as mine:  # what a second process sees while the first trains
        assert mine
        status = runner.execute(out, entry)
    assert status["state"] == "running"
    assert not (run_dir / "train.log").exists()  # nothing was started


def test_runs_of_several_processes_go_through_the_node_wrapper(tmp_path):
    cmd = runner.train_command(tmp_path / "c.yaml", tmp_path / "r", nproc=2)
    assert cmd[1:3] == ["-m", "megatron_dyt.launch.node"] and "--nproc-per-node=2" in cmd
    # the trainer's own record decides how an invocation ended, not torchrun's exit code
    (tmp_path / "status.json").write_text(json.dumps({"state": "stopped", "time": 10.0}))
    assert state.trainer_state(tmp_path, since=5.0) == "stopped"
    assert state.trainer_state(tmp_path, since=20.0) is None  # an earlier invocation's


# ---- running: done, failed, diverged, resume ---------------------------------------------------


@pytest.mark.slow
def test_local_sweep_records_done_failed_diverged_and_resumes(corpus, tmp_path, capsys):
    base = train_dict(corpus, train_steps=3, save_interval=0)
    spec = _write_spec(
        tmp_path,
        base,
        {
            # ok: trains; diverged: lr 1e30 gives a NaN loss at step 2; failed: TP 2 in 1 process
            "case": {
                "keys": ["train.lr", "parallel.tensor"],
                "values": [[0.02, 1], [1.0e30, 1], [0.03, 2]],
            }
        },
        overrides={"train.grad_clip": 0.0},
        name="run{case}",
    )
    out = tmp_path / "sweep"
    args = ["sweep", "run", str(spec), "--out", str(out), "--parallel", "2", "--no-progress"]
    assert main(args) == 1  # a failed run makes the sweep exit non-zero
    plan = json.loads((out / "plan.json").read_text())
    status = [state.read_status(out / e["run_dir"]) for e in plan]
    assert [s["state"] for s in status] == ["done", "diverged", "failed"]
    assert [s["exit_code"] for s in status] == [0, 1, 2]
    assert "loss is nan at step 2: training diverged" in status[1]["message"]
    assert "world size 1 is not divisible by parallel.tensor" in status[2]["message"]
    assert all((out / s["log"]).is_file() for s in status)
    assert (out / "runs/run0.02/checkpoints/step_0000003/complete.json").is_file()

    # Again: the done and diverged runs are skipped, the failed one is retried.
    logs = [(out / s["log"]).stat().st_size for s in status]
    assert main(args) == 1
    again = [state.read_status(out / e["run_dir"]) for e in plan]
    assert again[0] == status[0] and again[1] == status[1]
    assert [(out / s["log"]).stat().st_size for s in again[:2]] == logs[:2]
    assert again[2]["state"] == "failed" and again[2]["started"] > status[2]["started"]
    assert (out / again[2]["log"]).stat().st_size > logs[2]
    assert "skipping 2 of 3 runs (1 diverged, 1 done)" in capsys.readouterr().out

    # `run-one` (a SLURM array task) skips a finished run; a bad index is one clear error.
    assert main(["sweep", "run-one", str(out), "--index", "0"]) == 0
    assert "already done, skipping" in capsys.readouterr().out
    assert main(["sweep", "run-one", str(out), "--index", "3"]) == 2
    assert "--index 3: this sweep has runs 0 to 2" in capsys.readouterr().err

    # The report of this real sweep: one row per run, the real final loss of the done run.
    assert main(["sweep", "report", str(out)]) == 0
    rows = list(csv.DictReader((out / "report/results.csv").read_text().splitlines()))
    assert [r["state"] for r in rows] == ["done", "diverged", "failed"]
    records = [json.loads(x) for x in (out / "runs/run0.02/metrics.jsonl").read_text().splitlines()]
    losses = [r for r in records if "event" not in r]  # not the checkpoint events
    assert float(rows[0]["final_train_loss"]) == pytest.approx(losses[-1]["loss"])
    assert rows[0]["case"] == "0.02" and rows[1]["exit_code"] == "1"
    md = (out / "report/report.md").read_text()
    assert "final training loss" in md and "| run1e+30 | diverged | 1 |" in md


# A stand-in for `megatron-dyt train`: writes the trainer's status.json (if given a state) and
# a log line, then exits 1 as the trainer does when it stops on a NaN/Inf loss.
_FAKE_TRAIN = """
import json, pathlib, sys, time
run_dir, state, line = pathlib.Path(sys.argv[1]), sys.argv[2], sys.argv[3]
if state:
    record = {"state": state, "step": 4, "train_steps": 10, "time": time.time()}
    (run_dir / "status.json").write_text(json.dumps(record))
print(line)
sys.exit(1)
"""


@pytest.mark.parametrize(
    "trainer,line,want",
    [
        ("diverged", "megatron-dyt: error: loss is inf at step 5", "diverged"),
        # the log's words alone decide nothing: no status.json from the trainer, a failure
        (None, "megatron-dyt: error: loss is nan at step 2: training diverged", "failed"),
    ],
    ids=["status-json-diverged", "log-words-only"],
)
def test_divergence_is_read_from_the_trainers_status_json(
    tmp_path, monkeypatch, trainer, line, want
):
    spec = _write_spec(tmp_path, tiny_dict(), {"train.seed": [1]})
    out = tmp_path / "out"
    entry = state.prepare(spec, out)[0]
    run_dir = out / entry["run_dir"]
    monkeypatch.setattr(
        runner,
        "train_command",
        lambda config, folder, nproc=1, nodes=1: (
            [sys.executable, "-c", _FAKE_TRAIN, str(folder)] + [trainer or "", line]
        ),
    )
    status = runner.execute(out, entry)
    assert status["state"] == want and status["exit_code"] == 1
    assert state.read_status(run_dir)["state"] == want
    assert status["message"] == line  # the log's last words are still shown, for context
    log = (run_dir / "train.log").read_text()
    assert ("training diverged" in log) == (trainer is None)
    rows = report.collect(out)
    assert [(r.name, r.state) for r in rows] == [(entry["name"], want)]


@pytest.mark.slow
def test_interrupted_sweep_checkpoints_and_resumes(corpus, tmp_path):
    spec = _write_spec(
        tmp_path, train_dict(corpus, train_steps=20, save_interval=0), {"train.seed": [7]}
    )
    out = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "megatron_dyt", "sweep", "run", str(spec), "--out", str(out)]
    # Ctrl-C as in a terminal. A shell that starts this suite in the background (`cmd &`) makes
    # it ignore SIGINT, and children inherit that, so the sweep gets the default disposition back.
    proc = subprocess.Popen(
        [*cmd, "--no-progress"],
        stdout=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    metrics = out / "runs/seed7/metrics.jsonl"
    deadline = time.time() + 180
    while time.time() < deadline and (
        not metrics.exists() or len(metrics.read_text().splitlines()) < 2
    ):
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)  # Ctrl-C: the sweep asks its training to save and stop
    proc.communicate(timeout=120)
    assert proc.returncode == 130
    status = state.read_status(out / "runs/seed7")
    assert status["state"] == "pending" and status["exit_code"] == 0
    assert 2 <= status["step"] < 20  # a checkpoint of where it stopped

    again = subprocess.run([*cmd, "--no-progress"], capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert state.read_status(out / "runs/seed7")["state"] == "done"
    log = (out / "runs/seed7/train.log").read_text()
    assert f"(step {status['step']})" in log  # resumed, not restarted
    steps = [json.loads(x)["step"] for x in metrics.read_text().splitlines()]
    assert steps[-1] == 20 and steps.count(status["step"] + 1) == 1


# ---- the report --------------------------------------------------------------------------------


def test_t_quantile_matches_tables():
    # Two-sided 95% Student t critical values.
    for df, t in [(1, 12.7062), (2, 4.3027), (3, 3.1824), (4, 2.7764), (10, 2.2281), (30, 2.0423)]:
        assert stats.t_quantile(0.95, df) == pytest.approx(t, abs=1e-4)
    scipy_stats = pytest.importorskip("scipy.stats")
    for df in range(1, 40):
        assert stats.t_quantile(0.95, df) == pytest.approx(scipy_stats.t.ppf(0.975, df), rel=1e-9)


def test_t_interval_against_closed_forms_and_tables():
    # df 1 and 2 have closed forms: t = tan(π·c/2) and t = c·√(2 / (1 − c²)).
    for c in (0.5, 0.9, 0.95, 0.99):
        assert stats.t_quantile(c, 1) == pytest.approx(math.tan(math.pi * c / 2), rel=1e-12)
        assert stats.t_quantile(c, 2) == pytest.approx(c * math.sqrt(2 / (1 - c * c)), rel=1e-12)
    # Other confidences than 95% (two-sided critical values from a t table).
    assert stats.t_quantile(0.99, 5) == pytest.approx(4.0321, abs=1e-4)
    assert stats.t_quantile(0.90, 10) == pytest.approx(1.8125, abs=1e-4)
    # A textbook interval: 2, 4, 6, 8 → mean 5, s = √(20/3), 5 ± 3.1824 · s / √4.
    s = stats.spread([2.0, 4.0, 6.0, 8.0])
    half = 3.182446 * math.sqrt(20 / 3) / 2
    assert (s.n, s.mean, s.std) == (4, 5.0, pytest.approx(math.sqrt(20 / 3)))
    assert (s.ci_low, s.ci_high) == (pytest.approx(5 - half), pytest.approx(5 + half))
    assert (round(s.ci_low, 3), round(s.ci_high, 3)) == (0.891, 9.109)
    # Identical seeds: no spread, an interval of zero width (not nan).
    same = stats.spread([3.0, 3.0, 3.0])
    assert (same.std, same.ci_low, same.ci_high) == (0.0, 3.0, 3.0)
    assert all(math.isnan(v) for v in (stats.spread([]).mean, stats.spread([]).std))
    with pytest.raises(ValueError, match="needs at least 1 degree of freedom"):
        stats.t_quantile(0.95, 0)


def test_spread_and_power_law_fit():
    s = stats.spread([3.0, 3.1, 3.2])
    half = 4.302652729911275 * 0.1 / math.sqrt(3)
    assert (s.n, s.mean, s.std) == (3, pytest.approx(3.1), pytest.approx(0.1))
    assert (s.ci_low, s.ci_high) == (pytest.approx(3.1 - half), pytest.approx(3.1 + half))
    one = stats.spread([2.0])
    assert one.mean == 2.0 and math.isnan(one.std) and math.isnan(one.ci_low)
    widths = [256, 512, 1024, 4096]
    slope, c = stats.fit_power_law(widths, [7.5 * w**-0.75 for w in widths])
    assert slope == pytest.approx(-0.75) and c == pytest.approx(7.5)
    with pytest.raises(ValueError, match="at least 2 different widths"):
        stats.fit_power_law([64, 64], [1.0, 0.5])


# Synthetic sweep: the best α₀ follows a known power law in width; seeds add 0, 0.01, 0.02.
WIDTHS = [64, 256, 1024]
ATTN = [0.25, 0.5, 1.0]
OTHER = [0.03125, 0.125, 0.5]
NOISE = {1: 0.0, 2: 0.01, 3: 0.02}


def _best_attn(w: int) -> float:
    return (w / 64) ** -0.5  # 64 → 1, 256 → 0.5, 1024 → 0.25


def _best_other(w: int) -> float:
    return 0.5 * (w / 64) ** -1.0  # 64 → 0.5, 256 → 0.125, 1024 → 0.03125


def _loss(w: int, a: float, o: float, seed: int) -> float:
    d = math.log2(a / _best_attn(w))
    return (
        3.0
        + 0.1 * d**2
        + 0.02 * d  # asymmetric: no ties between the neighbours of the optimum
        + 0.05 * math.log2(o / _best_other(w)) ** 2
        + NOISE[seed]
    )


def _fake_sweep(tmp_path: Path, widths: list[int], diverged: set[str] = frozenset()) -> Path:
    """A prepared sweep whose runs' metrics.jsonl the real MetricsWriter writes."""
    spec = _write_spec(
        tmp_path,
        tiny_dict(),
        {
            "width": {"keys": ["model.hidden_size"], "values": widths},
            "alpha_attn": {"keys": ["model.norm.alpha_attn"], "values": ATTN},
            "alpha_other": {
                "keys": ["model.norm.alpha_mlp", "model.norm.alpha_final"],
                "values": OTHER,
            },
            "seed": {"keys": ["train.seed"], "values": list(NOISE)},
        },
    )
    out = tmp_path / "sweep"
    plan = state.prepare(spec, out)
    for e in plan:
        run_dir = out / e["run_dir"]
        run_dir.mkdir(parents=True)
        cfg = config_from_dict(yaml.safe_load((out / e["config"]).read_text()))
        ax = e["axes"]
        loss = _loss(ax["width"], ax["alpha_attn"], ax["alpha_other"], ax["seed"])
        writer = MetricsWriter(run_dir, cfg, enabled=True)
        writer.write(10, {"loss": loss + 0.4, "valid_loss": loss + 0.2})
        if e["name"] in diverged:
            writer.close()
            state.write_status(
                run_dir,
                {"state": "diverged", "exit_code": 1, "message": "loss is nan at step 11"},
            )
            continue
        writer.write(20, {"loss": loss + 0.1, "valid_loss": loss})
        writer.write(30, {"loss": loss + 0.05, "valid_loss": loss + 0.003})  # overfits a bit
        writer.close()
        state.write_status(run_dir, {"state": "done", "exit_code": 0})
    return out


def test_report_numbers_tables_fit_and_figures(tmp_path):
    # Width 256: the cell that would be best has a diverged seed, so it must not win.
    out = _fake_sweep(
        tmp_path,
        WIDTHS,
        diverged={
            "width256-alpha_attn0.5-alpha_other0.125-seed2",
            *(f"width64-alpha_attn0.25-alpha_other0.03125-seed{s}" for s in NOISE),
        },
    )
    result = report.write_report(out, metric="best_valid")

    rows = list(csv.DictReader(result.csv.read_text().splitlines()))
    assert len(rows) == 3 * 3 * 3 * 3
    row = next(r for r in rows if r["name"] == "width64-alpha_attn0.5-alpha_other0.5-seed2")
    loss = _loss(64, 0.5, 0.5, 2)
    assert float(row["final_train_loss"]) == pytest.approx(loss + 0.05)
    assert float(row["final_valid_loss"]) == pytest.approx(loss + 0.003)
    assert float(row["best_valid_loss"]) == pytest.approx(loss)
    assert row["best_valid_step"] == "20" and row["state"] == "done"
    assert (row["width"], row["alpha_attn"], row["alpha_other"], row["seed"]) == (
        "64",
        "0.5",
        "0.5",
        "2",
    )

    md = result.markdown.read_text()
    # Width 64: best cell (1, 0.5), losses 3.00/3.01/3.02 → 3.01 ± 0.01, t(2) interval.
    half = 4.302652729911275 * 0.01 / math.sqrt(3)
    assert "| 1 | " in md and "**3.0100 ± 0.0100 (n=3)**" in md
    assert (
        "Best: α₀ᵃᵗᵗⁿ = 1, α₀ᵒᵗʰᵉʳ = 0.5: best validation loss 3.0100 ± 0.0100 (std over 3"
        f" seeds), 95% t-interval of the mean [{3.01 - half:.4f}, {3.01 + half:.4f}]."
    ) in md
    assert "diverged (3/3)" in md  # the fully diverged cell of width 64
    w256 = md.split("## width 256")[1].split("## width 1024")[0]
    assert "⚠ diverged 1/3" in w256 and "(n=2)" in w256
    # The true optimum (0.5, 0.125) lost a seed to divergence; the next best cell wins.
    second = min(
        ((a, o) for a in ATTN for o in OTHER if (a, o) != (0.5, 0.125)),
        key=lambda c: _loss(256, *c, 1),
    )
    assert f"Best: α₀ᵃᵗᵗⁿ = {second[0]:g}, α₀ᵒᵗʰᵉʳ = {second[1]:g}" in w256

    # Fit on widths 64 and 1024 (exact power laws) plus 256's runner-up.
    widths = [64, 256, 1024]
    want_attn = stats.fit_power_law(widths, [1.0, second[0], 0.25])[0]
    want_other = stats.fit_power_law(widths, [0.5, second[1], 0.03125])[0]
    slopes = {s["component"]: s["slope"] for s in result.fits}
    assert slopes == {"attn": pytest.approx(want_attn), "other": pytest.approx(want_other)}
    assert f"width^{want_attn:.3f}" in md

    assert sorted(p.name for p in result.figures) == [
        "alpha_vs_width.png",
        "heatmap_w1024.png",
        "heatmap_w256.png",
        "heatmap_w64.png",
    ]
    import matplotlib.image

    for png in result.figures:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        image = matplotlib.image.imread(png)
        assert image.shape[0] > 300 and image.shape[1] > 400
        assert np.asarray(image).std() > 0.05  # not blank


def test_report_exact_power_law_and_single_width(tmp_path):
    out = _fake_sweep(tmp_path / "all", WIDTHS)
    result = report.write_report(out)  # auto: every run has a validation loss
    slopes = {s["component"]: s["slope"] for s in result.fits}
    # Final validation loss ranks the same cells: the exact laws come back.
    assert slopes == {"attn": pytest.approx(-0.5), "other": pytest.approx(-1.0)}
    assert "final validation loss" in result.markdown.read_text()

    one = _fake_sweep(tmp_path / "one", [128])
    result = report.write_report(one, tmp_path / "rep")
    assert result.fits == []
    assert "needs at least 2 widths with a best cell; this sweep has 1" in result.summary
    assert [p.name for p in result.figures] == ["heatmap_w128.png"]
    assert (tmp_path / "rep/report.md").is_file() and (tmp_path / "rep/results.csv").is_file()


def test_report_keeps_other_axes_apart_and_unfinished_runs_are_not_failures(tmp_path):
    """An α₀ᶠⁱⁿᵃˡ axis of its own is a group, not extra seeds of a cell; a null axis value
    sorts with the numbers; a run not trained yet is not reported as failed."""
    spec = _write_spec(
        tmp_path,
        tiny_dict(),
        {
            "final": {"keys": ["model.norm.alpha_final"], "values": [0.5, 1.0]},
            "warmup": {"keys": ["train.warmup_steps"], "values": [None, 6]},
        },
    )
    out = tmp_path / "sweep"
    plan = state.prepare(spec, out)
    for e in plan:
        run_dir = out / e["run_dir"]
        if e["axes"] == {"final": 1.0, "warmup": 6}:
            continue  # never started
        run_dir.mkdir(parents=True)
        cfg = config_from_dict(yaml.safe_load((out / e["config"]).read_text()))
        writer = MetricsWriter(run_dir, cfg, enabled=True)
        writer.write(10, {"loss": 3.0, "valid_loss": 3.0 if e["axes"]["final"] == 0.5 else 5.0})
        writer.close()
        state.write_status(run_dir, {"state": "done", "exit_code": 0})
    tables = report.tables(report.collect(out), "final_valid")
    assert [dict(t.group) for t in tables] == [
        {"final": 0.5, "warmup": 6},
        {"final": 0.5, "warmup": None},
        {"final": 1.0, "warmup": 6},
        {"final": 1.0, "warmup": None},
    ]
    for t in tables:  # one run per cell: never pooled into a spread over "seeds"
        assert all(len(c.values) <= 1 for c in t.cells.values())
    md = report.write_report(out).markdown.read_text()
    assert "not run yet" in md and "failed" not in md


def test_parallel_runs_get_gpus_of_their_own(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3,4,5,6,7")
    assert runner.gpu_blocks(2, 4) == ["0,1,2,3", "4,5,6,7"]
    assert runner.gpu_blocks(1, 4) is None  # one run at a time sees every GPU
    with pytest.warns(UserWarning, match="--parallel 3 runs × --gpus-per-run 4 need 12 GPUs"):
        assert runner.gpu_blocks(3, 4) is None  # not enough for each its own: they share
    spec = _write_spec(tmp_path, tiny_dict(), {"train.seed": [1, 2, 3, 4, 5, 6]})
    out = tmp_path / "out"
    plan = state.prepare(spec, out)
    active, used, clashes, lock = set(), [], [], threading.Lock()

    def fake_execute(sweep_dir, entry, *, gpus, **kwargs):
        with lock:
            clashes.append(gpus in active)  # a block another run still trains on
            active.add(gpus)
            used.append(gpus)
        time.sleep(0.05)
        with lock:
            active.discard(gpus)
        return {"state": "done", "seconds": 0}

    monkeypatch.setattr(runner, "execute", fake_execute)
    summary = runner.run_local(out, plan, parallel=2, nproc=4, progress=False)
    assert summary.counts == {"done": 6} and not any(clashes)
    assert sorted(set(used)) == ["0,1,2,3", "4,5,6,7"]
