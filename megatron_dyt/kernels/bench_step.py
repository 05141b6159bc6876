"""Time a whole training step of one model with DyT (Triton kernels), DyT (torch) and RMSNorm.

    python -m megatron_dyt.kernels.bench_step [--preset 1b] [--compile] [--json PATH]

The kernels only matter if they make the model faster, so this times forward + backward +
AdamW of the same LLaMA (one GPU, TP=1, bf16 weights, fused AdamW, no DeepSpeed so the numbers
are the model's own) for three norms: `dyt` with `backend: triton`, `dyt` with `backend: torch`
and `rmsnorm` (the project's `RMSNorm` module, on `F.rms_norm`). It prints ms per step,
tokens/s and the ratio to RMSNorm. With `--compile` the whole model is compiled with
`torch.compile`, as a user's own loop would be: the anchor `benchmarks/gpu_train.py` holds the
real trainer against. With `--json` the figures go under the key `train_step` (compiled:
`train_step_compiled`) of that file, which may hold the kernel benchmark's results already.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from megatron_dyt.config import Config, config_from_dict
from megatron_dyt.kernels import bench

# A TinyLlama-1.1B-shaped model (GQA), and a small one for testing the code path on CPU.
PRESETS: dict[str, dict[str, Any]] = {
    "1b": dict(
        hidden_size=2048,
        num_layers=22,
        num_heads=32,
        num_kv_heads=4,
        ffn_hidden_size=5632,
        vocab_size=32000,
        seq_length=2048,
        micro_batch_size=4,
    ),
    "tiny": dict(
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        ffn_hidden_size=96,
        vocab_size=256,
        seq_length=32,
        micro_batch_size=2,
    ),
}
VARIANTS = {  # name → (norm kind, backend)
    "dyt-triton": ("dyt", "triton"),
    "dyt-torch": ("dyt", "torch"),
    "rmsnorm": ("rmsnorm", "torch"),
}


def variant_config(preset: str, variant: str) -> Config:
    shape = dict(PRESETS[preset])
    micro = shape.pop("micro_batch_size")
    kind, backend = VARIANTS[variant]
    norm: dict[str, Any] = {"kind": kind, "backend": backend}
    if kind == "dyt":
        norm.update(alpha_attn=0.8, alpha_mlp=0.2, alpha_final=0.2)
    return config_from_dict(
        {
            "model": {
                "name": f"bench-{preset}-{variant}",
                "embedding_scale": kind == "dyt",
                "norm": norm,
                **shape,
            },
            "parallel": {"tensor": 1, "pipeline": 1, "zero_stage": 0},
            # one micro-batch per step and no DeepSpeed: nothing is accumulated
            "train": {"micro_batch_size": micro, "precision": "bf16", "grad_accum_dtype": "bf16"},
        }
    )


def time_variant(
    preset: str, variant: str, steps: int, warmup: int, device: str, compile: bool = False
) -> dict[str, Any]:
    """Median wall time of a full optimizer step (synchronised) over `steps` after `warmup`
    (which includes the compilation when `compile`)."""
    from megatron_dyt import parallel
    from megatron_dyt.model import LlamaModel, init_weights

    cfg = variant_config(preset, variant)
    parallel.initialize_model_parallel(cfg.parallel)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    with torch.device(device):
        model = LlamaModel(cfg)
    init_weights(model, cfg.model, cfg.train.seed)
    model.to(dtype)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=1e-4, weight_decay=0.1, fused=device == "cuda"
    )
    step_model = torch.compile(model) if compile else model
    micro, seq = cfg.train.micro_batch_size, cfg.model.seq_length
    generator = torch.Generator(device).manual_seed(0)
    tokens = torch.randint(
        0, cfg.model.vocab_size, (micro, seq + 1), device=device, generator=generator
    )

    losses, times = [], []
    for i in range(warmup + steps):
        start = time.perf_counter()
        loss = step_model(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())  # also synchronises
        if i >= warmup:
            times.append(time.perf_counter() - start)
    ms = statistics.median(times) * 1e3
    parameters = sum(p.numel() for p in model.parameters())
    del model, step_model, optimizer, loss
    torch._dynamo.reset()
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**30
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    else:
        peak = 0.0
    return {
        "variant": variant,
        "compiled": compile,
        "norm": VARIANTS[variant][0],
        "backend": VARIANTS[variant][1],
        "parameters": parameters,
        "tokens_per_step": micro * seq,
        "ms": ms,
        "tokens_per_s": micro * seq / (ms * 1e-3),
        "peak_gib": peak,
        "first_loss": losses[0],
        "last_loss": losses[-1],
    }


def run(
    preset: str,
    steps: int,
    warmup: int,
    device: str,
    compile: bool = False,
    variants: list[str] | None = None,
) -> dict[str, Any]:
    """Every variant (or `variants`, which must include rmsnorm, the reference)."""
    from megatron_dyt import parallel

    parallel.init_distributed("nccl" if device == "cuda" else "gloo")
    rows = [time_variant(preset, v, steps, warmup, device, compile) for v in variants or VARIANTS]
    reference = next(r for r in rows if r["variant"] == "rmsnorm")["ms"]
    for row in rows:
        row["ratio_to_rmsnorm"] = row["ms"] / reference
    return {
        "device": torch.cuda.get_device_name() if device == "cuda" else device,
        "preset": preset,
        "shape": PRESETS[preset],
        "steps": steps,
        "compiled": compile,
        "optimizer": "torch.optim.AdamW (fused), bf16 weights",
        "rows": rows,
    }


def write_json(path: Path, result: dict[str, Any]) -> None:
    """Put `result` under `train_step` (`train_step_compiled`) in `path`, keeping what the
    file already holds."""
    data = json.loads(path.read_text()) if path.exists() else {}
    data["train_step_compiled" if result["compiled"] else "train_step"] = result
    bench.write_json(path, data)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m megatron_dyt.kernels.bench_step", description=__doc__
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), default="1b")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--compile", action="store_true", help="torch.compile the whole model")
    parser.add_argument(
        "--variants",
        nargs="+",
        choices=sorted(VARIANTS),
        help="these variants only (rmsnorm, the reference, is always run)",
    )
    parser.add_argument("--json", type=Path, help="merge the results into this file")
    args = parser.parse_args(argv)
    variants = None if not args.variants else sorted({"rmsnorm", *args.variants})
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench_step: needs a CUDA GPU; none is available here", file=sys.stderr)
        return 2
    result = run(args.preset, args.steps, args.warmup, args.device, args.compile, variants)
    print(f"{'variant':<12} {'ms/step':>9} {'tokens/s':>10} {'vs rmsnorm':>10} {'peak GiB':>9}")
    for row in result["rows"]:
        print(
            f"{row['variant']:<12} {row['ms']:>9.1f} {row['tokens_per_s']:>10.0f}"
            f" {row['ratio_to_rmsnorm']:>9.3f}x {row['peak_gib']:>9.1f}"
        )
    print(f"device: {result['device']}, {result['rows'][0]['parameters']:,} parameters (DyT)")
    if args.json:
        write_json(args.json, result)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
