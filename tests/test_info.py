"""`megatron-dyt info`: published parameter counts and the memory estimate."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_dyt.cli import main
from megatron_dyt.config import load_config
from megatron_dyt.info import summarize

ROOT = Path(__file__).resolve().parents[1]

# LLaMA-2 7B / 13B / 70B as published; 34B is the Code Llama 34B layout with a 32000 vocab.
PUBLISHED = {
    "7b": 6_738_415_616,
    "13b": 13_015_864_320,
    "34b": 33_743_970_304,
    "70b": 68_976_648_192,
}
LAYERS = {"7b": 32, "13b": 40, "34b": 48, "70b": 80}


def _info_json(capsys, *args: str) -> dict:
    assert main(["info", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("size", PUBLISHED)
def test_published_parameter_counts(size, capsys):
    rms = _info_json(capsys, str(ROOT / f"configs/llama-{size}-rmsnorm.yaml"))
    assert rms["parameters"] == PUBLISHED[size]
    dyt = _info_json(capsys, str(ROOT / f"configs/llama-{size}-dyt.yaml"))
    # DyT adds one α per norm (2 per block + the final one) and the embedding scale; no β.
    assert dyt["parameters"] - rms["parameters"] == 2 * LAYERS[size] + 1 + 1
    assert dyt["norms"]["attention"].startswith("dyt") and "α₀" in dyt["norms"]["mlp"]


@pytest.mark.slow  # two CLI processes: ~9 s
def test_console_script(tmp_path):
    exe = shutil.which("megatron-dyt") or str(Path(sys.executable).parent / "megatron-dyt")
    proc = subprocess.run(
        [exe, "info", str(ROOT / "configs/llama-70b-rmsnorm.yaml"), "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert json.loads(proc.stdout)["parameters"] == PUBLISHED["70b"]
    text = subprocess.run(
        [exe, "info", str(ROOT / "configs/llama-7b-dyt.yaml")],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    assert "6,738,415,682 parameters" in text
    assert "attention  dyt γ·tanh(α·x), α₀=0.8" in text
    assert "mlp        dyt γ·tanh(α·x), α₀=0.2" in text
    assert "embedding scale: learnable, init √4096 = 64" in text


def test_per_gpu_parameters_follow_the_layout():
    base = load_config(ROOT / "configs/llama-70b-rmsnorm.yaml")
    whole = summarize(
        base.model_copy(
            update={"parallel": base.parallel.model_copy(update={"tensor": 1, "pipeline": 1})}
        ),
        gpus=1,
    )
    assert whole["parameters_per_gpu"] == PUBLISHED["70b"]
    split = summarize(base, gpus=32)  # TP 8 × PP 4
    h, L = 8192, 80
    block = (whole["layers"]["parameters_per_block"] - 2 * h) // 8 + 2 * h
    first = (L // 4) * block + 32000 * h // 8
    last = (L // 4) * block + h + 32000 * h // 8
    assert split["parameters_per_gpu"] == max(first, last)


def test_memory_estimate_responds_to_zero_and_checkpointing():
    cfg = load_config(ROOT / "configs/llama-7b-rmsnorm.yaml")

    def mem(**updates):
        parallel = cfg.parallel.model_copy(
            update={k: v for k, v in updates.items() if k == "zero_stage"}
        )
        train = cfg.train.model_copy(update={k: v for k, v in updates.items() if k != "zero_stage"})
        return summarize(cfg.model_copy(update={"parallel": parallel, "train": train}), gpus=8)[
            "memory_per_gpu_gib"
        ]

    z0, z1, z2, z3 = (mem(zero_stage=z) for z in range(4))
    n = PUBLISHED["7b"] / 1024**3
    assert z0["optimizer"] == pytest.approx(12 * n, rel=1e-3)
    assert z1["optimizer"] == pytest.approx(12 * n / 8, rel=1e-3)
    # gradients summed in fp32 (train.grad_accum_dtype): ZeRO-1 is DeepSpeed's bf16 optimizer,
    # bf16 gradients plus a full fp32 copy; ZeRO-2 sums its fp32 partition
    assert z1["gradients"] == pytest.approx((2 + 4) * n, rel=1e-3)
    assert z2["gradients"] == pytest.approx(4 * n / 8, rel=1e-3)
    assert mem(zero_stage=2, grad_accum_dtype="bf16")["gradients"] == pytest.approx(
        2 * n / 8, rel=1e-3
    )
    assert z3["weights"] == pytest.approx(2 * n / 8, rel=1e-3)
    assert z0["total"] > z1["total"] > z2["total"] > z3["total"]
    none, sel, full = (
        mem(activation_checkpointing=m)["activations"] for m in ("none", "selective", "full")
    )
    assert none > sel > full
    assert cfg.train.activation_checkpointing == "selective"
    assert mem(micro_batch_size=2)["activations"] == pytest.approx(2 * sel, rel=1e-3)


def test_gpus_must_fit_the_layout(capsys):
    assert main(["info", str(ROOT / "configs/llama-70b-dyt.yaml"), "--gpus", "12"]) == 2
    assert (
        "--gpus 12 is not a multiple of parallel.tensor × parallel.pipeline = 32"
        in capsys.readouterr().err
    )


@pytest.mark.interpreter  # the tiny DyT model on the default triton backend
def test_build_runs_a_real_step(capsys):
    out = _info_json(capsys, str(ROOT / "configs/tiny-dyt.yaml"), "--build")
    st = out["smoke_test"]
    assert abs(st["loss"] - st["uniform_loss"]) < 0.1  # a freshly initialised LM is near-uniform
    assert st["grad_norm"] > 0
    for bad in ("0", "-8"):
        with pytest.raises(SystemExit) as exit_:  # argparse: usage and one line, status 2
            main(["info", str(ROOT / "configs/tiny-dyt.yaml"), "--gpus", bad])
        assert exit_.value.code == 2
        assert f"argument --gpus: '{bad}': expected a positive whole number" in (
            capsys.readouterr().err
        )
