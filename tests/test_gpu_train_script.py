"""`benchmarks/gpu_train.py`, the GPU issue's one prepared script, run on CPU with `--tiny`: every
phase `gpu_train.sh` calls works and its results reach the JSON and the Markdown table, so the
lent GPU's minutes go to measuring."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks/gpu_train.py"


def _run(*args: str, timeout: int = 600) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.slow
def test_gpu_train_phases_on_cpu(tmp_path):
    cache, out = tmp_path / "cache", tmp_path / "train.json"
    _run("data", "--cache", str(cache))
    variant = "rmsnorm-z1-eager"
    _run(
        "run",
        variant,
        "--cache",
        str(cache),
        "--json",
        str(out),
        "--tiny",
        "--steps",
        "20",
        "--warmup",
        "2",
        "--save-at",
        "10",
    )
    _run("resume", variant, "--cache", str(cache), "--json", str(out))
    for accum in ("fp32", "bf16"):
        _run("accum", "--zero", "2", "--accum", accum, "--json", str(out), "--tiny")
    data = json.loads(out.read_text())

    (row,) = data["rows"]
    assert row["variant"] == variant and row["steps"] == 20 and row["timed_steps"] == 18
    assert sorted(map(int, row["losses"])) == list(range(1, 21))
    assert row["checkpoint_gb"] > 0 and row["checkpoint_gb_per_s"] > 0
    # fp32 on CPU: the resumed steps 11-20 are the uninterrupted run's, bit for bit
    (resumed,) = data["resume"]
    assert sorted(map(int, resumed["loss_differences"])) == list(range(11, 21))
    assert resumed["max_abs_difference"] == 0.0 and resumed["continues"]
    accum = {r["grad_accum_dtype"]: r for r in data["accum"]}
    assert accum["fp32"]["alpha"] < 1e-6 and accum["bf16"]["alpha"] > 1e-4

    # the anchor of the same call, as bench_step --compile writes it
    data["train_step_compiled"] = {
        "rows": [
            {
                "variant": "rmsnorm",
                "norm": "rmsnorm",
                "ms": 2.0,
                "peak_gib": 0.0,
                "tokens_per_s": row["tokens_per_s"] / 2,
            }
        ]
    }
    out.write_text(json.dumps(data))
    md = _run("table", str(out))
    assert f"| {variant} | none | 1 | none |" in md and "| 2.00× |" in md
    assert "| rmsnorm-z1-eager | 10 | 0.00e+00 | 0.02 | yes |" in md
    assert "| 2 | fp32 | DeepSpeedZeroOptimizer | 16 |" in md
