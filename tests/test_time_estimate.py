"""`info`'s time and cost: steps, FLOPs, wall time and GPU-hours at an MFU (docs/design.md §11),
for one config and for a sweep's dry run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from megatron_dyt import info
from megatron_dyt.cli import main
from megatron_dyt.config import load_config

ROOT = Path(__file__).resolve().parents[1]


def test_70b_on_128_gpus_for_2e11_tokens(capsys):
    """The figures against the arithmetic done here: 6 FLOPs per matmul weight and token plus
    attention's 12·L·h·s, at 40% of an H100's 989.4 TFLOP/s."""
    code = main(
        [
            "info",
            str(ROOT / "configs/llama-70b-dyt.yaml"),
            "--gpus",
            "128",
            "--tokens",
            "2e11",
            "--gpu",
            "h100",
            "--mfu",
            "0.4",
            "--json",
        ]
    )
    assert code == 0
    t = json.loads(capsys.readouterr().out)["time"]
    cfg = load_config(ROOT / "configs/llama-70b-dyt.yaml")
    m = cfg.model
    n = info.parameter_count(cfg)
    per_token = 6 * (n - cfg.padded_vocab_size * m.hidden_size) + 12 * 80 * 8192 * 4096
    steps = math.ceil(2e11 / 4_194_304)
    seconds = per_token * steps * 4_194_304 / (128 * 989.4e12 * 0.4)
    assert t["steps"] == steps == 47_684 and t["flops_per_token"] == per_token
    assert t["seconds"] == pytest.approx(seconds, rel=1e-12)
    assert t["gpu_hours"] == pytest.approx(seconds * 128 / 3600, rel=1e-12)
    assert 60_000 < t["gpu_hours"] < 65_000  # ~20 days on 128 GPUs


def test_the_text_output_says_the_time_and_the_gpu_hours(capsys):
    args = ["info", str(ROOT / "configs/llama-70b-dyt.yaml"), "--gpus", "128", "--tokens", "2e11"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "47,684 steps × 4,194,304 tokens" in out
    assert "on 128 GPUs: 20 d 07:" in out and "62,3" in out and "GPU-hours" in out


def test_a_measured_mfu_is_the_default_for_its_gpu(tmp_path, monkeypatch):
    """The best MFU the trainer measured on that GPU model (benchmarks/gpu_train.py rows),
    else 40%, and the estimate says which."""
    (tmp_path / "train-h200.json").write_text(
        json.dumps({"rows": [{"mfu": 0.31}, {"mfu": 0.42}, {"variant": "no mfu"}]})
    )
    monkeypatch.setattr(info, "RESULTS", tmp_path)
    cfg = load_config(ROOT / "configs/llama-7b-dyt.yaml")
    n = info.parameter_count(cfg)
    h200 = info.time_estimate(cfg, n, 8, gpu="H200")
    assert h200["mfu"] == 0.42 and "train-h200.json" in h200["mfu_source"]
    h100 = info.time_estimate(cfg, n, 8, gpu="H100")
    assert h100["mfu"] == info.DEFAULT_MFU and h100["mfu_source"].startswith("assumed")
    assert h100["seconds"] / h200["seconds"] == pytest.approx(0.42 / 0.40)


@pytest.mark.parametrize(
    "args,message",
    [
        (["--gpu", "x100"], "--gpu x100: expected one of H100"),
        (["--mfu", "1.5"], "'1.5': expected a fraction in (0, 1]"),
        (["--tokens", "-3"], "'-3': expected a positive number"),
    ],
)
def test_bad_arguments_are_one_line(args, message, capsys):
    try:  # argparse's own checks exit; the command's return 2
        code = main(["info", str(ROOT / "configs/tiny-dyt.yaml"), *args])
    except SystemExit as exit_:
        code = exit_.code
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err


def test_sweep_dry_run_prints_the_total(tmp_path, capsys):
    """The tiny sweep: 24 runs of 60 steps; the total is the sum of each run's estimate."""
    from megatron_dyt.sweep.spec import load_spec, validate

    spec = ROOT / "configs/sweeps/tiny.yaml"
    assert main(["sweep", "run", str(spec), "--out", str(tmp_path / "s"), "--dry-run"]) == 0
    err = capsys.readouterr().err
    cfgs = [cfg for _, cfg in validate(load_spec(spec))]
    total = info.sweep_time(cfgs)
    assert total["runs"] == 24
    assert total["tokens"] == sum(c.train.train_steps * c.train.global_batch_tokens for c in cfgs)
    assert f"time: 24 runs, {total['tokens']:.3g} tokens" in err
    assert not (tmp_path / "s").exists()  # a dry run writes nothing
