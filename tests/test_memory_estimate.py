"""`info`'s memory estimate (docs/design.md §11) against what autograd really keeps, the GPU
peaks measured in benchmarks/results/train-h200.json, and the fit check of the 70B presets."""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from common import tiny_dict

from megatron_dyt import parallel
from megatron_dyt.cli import main
from megatron_dyt.config import Config, config_from_dict, load_config
from megatron_dyt.info import block_activation_bytes, summarize
from megatron_dyt.model.attention import Attention
from megatron_dyt.model.layers import BuildSpec
from megatron_dyt.model.llama import TransformerBlock
from megatron_dyt.norms import RMSNorm

ROOT = Path(__file__).resolve().parents[1]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# small but with every part: GQA (4 heads, 2 kv heads), FFN ≠ 4·hidden, two sequences
SHAPE = dict(hidden_size=256, num_heads=4, num_kv_heads=2, ffn_hidden_size=704, seq_length=128)
MICRO = 2


def block_config(kind: str, mode: str, backend: str = "triton", **norm: Any) -> Config:
    d = tiny_dict(kind, **SHAPE)
    d["model"]["norm"].update(backend=backend, **norm)
    d["train"].update(micro_batch_size=MICRO, activation_checkpointing=mode, precision="bf16")
    return config_from_dict(d)


@dataclass
class Saved:
    """The activation bytes one block's forward left for its backward, each storage once."""

    bytes: int = 0
    substituted: list[str] = field(default_factory=list)
    attention_core: dict[int, int] = field(default_factory=dict)  # what SDPA kept: bytes
    attention_io: dict[str, int] = field(default_factory=dict)  # q, k, v, out → storage


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def measure_block(cfg: Config, monkeypatch: pytest.MonkeyPatch) -> Saved:
    """Run one block's forward in bf16 under `saved_tensors_hooks` and count what it saved.

    Left out: parameters (not activations) and the RoPE tables each block's attention caches
    (module state, counted apart by `info.rope_table_bytes`). Substituted: on CPU `F.rms_norm`
    decomposes into fp32 ops that keep two fp32 copies of the input and 1/rms; on CUDA it is
    one kernel keeping its input and 1/rms in fp32 per row, which `info` models. The tensors
    saved inside each RMSNorm call are identified (by tagging the call) and replaced by that.
    """
    parallel.init_distributed("gloo")
    parallel.initialize_model_parallel(cfg.parallel)
    torch.manual_seed(0)
    block = TransformerBlock(cfg.model, BuildSpec.of(cfg), 0).to(DEVICE, torch.bfloat16)
    with torch.no_grad():
        for p in block.parameters():
            if p.dim() == 2:  # megatron's linears are left uninitialised here
                p.normal_(0, 0.02)
    params = {_storage(p) for p in block.parameters()}

    where: list[str] = []  # the call the hook is in, innermost last
    rms_inputs: list[torch.Tensor] = []
    result = Saved()
    rms_forward, core = RMSNorm.forward, Attention.core

    def tagged_rms(self, x):
        where.append(f"rmsnorm {len(rms_inputs)}")
        rms_inputs.append(x)
        try:
            return rms_forward(self, x)
        finally:
            where.pop()

    def tagged_core(self, q, k, v):
        where.append("attention core")
        try:
            out = core(self, q, k, v)
        finally:
            where.pop()
        result.attention_io = {n: _storage(t) for n, t in zip("qkv", (q, k, v), strict=True)}
        result.attention_io["out"] = _storage(out)
        return out

    monkeypatch.setattr(RMSNorm, "forward", tagged_rms)
    monkeypatch.setattr(Attention, "core", tagged_core)
    saved: list[tuple[torch.Tensor, str | None]] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append((t, where[-1] if where else None))
        return t

    s, b, h = cfg.model.seq_length, MICRO, cfg.model.hidden_size
    x = torch.randn(s, b, h, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        block(x)
    rope = {_storage(t) for t in block.attention._rope_cache[2:]}

    storages: dict[int, int] = {}
    rms_calls_seen: set[int] = set()
    for t, tag in saved:
        ptr = _storage(t)
        if ptr in params or ptr in rope:
            continue
        if tag is not None and tag.startswith("rmsnorm"):
            rms_calls_seen.add(int(tag.split()[1]))
            continue
        if tag == "attention core":
            result.attention_core[ptr] = t.untyped_storage().nbytes()
        storages[ptr] = t.untyped_storage().nbytes()
    for i in sorted(rms_calls_seen):
        inp = rms_inputs[i]
        storages[_storage(inp)] = inp.untyped_storage().nbytes()
        rows = inp.numel() // inp.shape[-1]
        result.bytes += 4 * rows
        result.substituted.append(f"RMSNorm call {i}: its saves → its input + {rows} fp32")
    result.bytes += sum(storages.values())
    return result


def check_block(cfg: Config, monkeypatch: pytest.MonkeyPatch) -> tuple[int, float]:
    saved = measure_block(cfg, monkeypatch)
    estimate = sum(block_activation_bytes(cfg).values())
    mode = cfg.train.activation_checkpointing
    if mode == "none":
        # No substitution for attention: SDPA keeps on CPU what flash attention keeps on CUDA,
        # q, k, v, its output (which the projection keeps too: one storage) and the fp32
        # log-sum-exp (on CUDA also flash's tiny RNG state). Fail loudly if that ever changes.
        io = set(saved.attention_io.values())
        assert io <= saved.attention_core.keys(), "SDPA no longer keeps q, k, v and its output"
        lse = 4 * MICRO * cfg.model.num_heads * cfg.model.seq_length
        other = sum(n for ptr, n in saved.attention_core.items() if ptr not in io)
        assert lse <= other <= lse + 64, f"SDPA keeps {other} B besides q, k, v, out"
    if cfg.model.norm.kind == "rmsnorm" and mode != "full":
        assert len(saved.substituted) == 2, saved.substituted  # the attention and MLP norms
    else:
        assert not saved.substituted
    # The issue asks for 5%; they agree to a few bytes, and 1% catches one extra tensor of
    # hidden size (5.5% of a block here).
    assert saved.bytes == pytest.approx(estimate, rel=0.01), (
        f"measured {saved.bytes} B, info {estimate:.0f} B"
    )
    return saved.bytes, estimate


@pytest.mark.interpreter  # the DyT / Derf Triton kernels
@pytest.mark.parametrize("mode", ["none", "selective", "full"])
@pytest.mark.parametrize("kind", ["dyt", "derf"])
def test_block_activations_with_the_triton_kernels(kind, mode, monkeypatch):
    from megatron_dyt.kernels import ops

    if DEVICE == "cpu" and not ops.INTERPRET:
        pytest.skip("TRITON_INTERPRET=0 on CPU: the torch reference runs, not the kernels")
    check_block(block_config(kind, mode), monkeypatch)


@pytest.mark.parametrize("mode", ["none", "selective", "full"])
def test_block_activations_with_rmsnorm(mode, monkeypatch):
    check_block(block_config("rmsnorm", mode), monkeypatch)


@pytest.mark.parametrize(
    ("kind", "norm"),
    [
        ("dyt", {}),
        ("dyt", {"squash": "hardtanh"}),
        ("dyt", {"learnable_alpha": False}),
        ("derf", {}),
        ("layernorm", {}),
    ],
)
def test_block_activations_with_fp32_copies(kind, norm, monkeypatch):
    # The torch reference and LayerNorm upcast to fp32, and autograd keeps the fp32 copies.
    check_block(block_config(kind, "none", backend="torch", **norm), monkeypatch)


def test_torch_backend_keeps_six_more_bytes_per_norm_element():
    # The "+12·s·b·h bytes per block": two norms, 8 bytes of fp32 copies against 2 of
    # bf16 input each.
    triton = sum(block_activation_bytes(block_config("dyt", "none")).values())
    torch_ = sum(block_activation_bytes(block_config("dyt", "none", backend="torch")).values())
    s, h = SHAPE["seq_length"], SHAPE["hidden_size"]
    assert torch_ - triton == 12 * s * MICRO * h + 2 * 4 * h  # + γ's fp32 copies


# ---- the GPU peaks measured by benchmarks/gpu_train.py --------------------------------------


def _gpu_train():
    spec = importlib.util.spec_from_file_location("gpu_train", ROOT / "benchmarks/gpu_train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_estimate_matches_the_measured_gpu_peaks():
    gpu_train = _gpu_train()
    rows = json.loads((ROOT / "benchmarks/results/train-h200.json").read_text())["rows"]
    checked = 0
    for row in rows:
        if row["norm"] == "rmsnorm":  # measured the unfused fp32 module of then (README)
            continue
        tree = gpu_train.config_tree(row["variant"], steps=25, data={"demo": True}, tiny=False)
        # rows without the field were measured with DeepSpeed's default, bf16 sums
        tree["train"]["grad_accum_dtype"] = row.get("grad_accum_dtype", "bf16")
        cfg = config_from_dict(tree)
        total = summarize(cfg, gpus=1)["memory_per_gpu_gib"]["total"]
        assert total == pytest.approx(row["peak_gib"], rel=0.05), row["variant"]
        checked += 1
    assert checked >= 3


# ---- the fit check --------------------------------------------------------------------------


def test_70b_presets_fit_in_80_gib():
    rms = load_config(ROOT / "configs/llama-70b-rmsnorm.yaml")
    dyt = load_config(ROOT / "configs/llama-70b-dyt.yaml")
    assert rms.parallel == dyt.parallel
    assert rms.train.activation_checkpointing == dyt.train.activation_checkpointing
    for cfg in (rms, dyt):
        fit = summarize(cfg, gpu_memory=80)["fit"]
        assert fit["fits"], fit["message"]
        assert fit["message"].startswith("fits in 80 GiB: est. ")


def test_a_config_that_does_not_fit_names_the_setting_that_does(capsys):
    # DyT's torch reference keeps fp32 copies: 30 GiB more on the 70B preset's first stage.
    preset = str(ROOT / "configs/llama-70b-dyt.yaml")
    assert main(["info", preset, "model.norm.backend=torch", "--gpu-memory", "80"]) == 0
    out = capsys.readouterr().out
    assert "does not fit in 80 GiB (est. " in out
    assert ": set train.activation_checkpointing=full (est. " in out
    assert main(["info", preset, "model.norm.backend=torch", "--gpu-memory", "80", "--json"]) == 0
    fit = json.loads(capsys.readouterr().out)["fit"]
    assert not fit["fits"] and fit["suggestion"] == "train.activation_checkpointing=full"
    assert fit["suggestion_total_gib"] <= fit["usable_gib"]
    cfg = load_config(preset, ["model.norm.backend=torch", fit["suggestion"]])
    assert summarize(cfg, gpu_memory=80)["fit"]["fits"]
    # a GPU too small for anything a single setting can do
    assert main(["info", preset, "--gpu-memory", "16"]) == 0
    assert "no single setting" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_:  # argparse: usage and one line, status 2
        main(["info", preset, "--gpu-memory", "0"])
    assert exit_.value.code == 2
    assert "argument --gpu-memory: '0': expected a positive number" in capsys.readouterr().err
    with pytest.raises(ValueError, match="gpu_memory=-1: expected a positive number of GiB"):
        summarize(load_config(preset), gpu_memory=-1)
