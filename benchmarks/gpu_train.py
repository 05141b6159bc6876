"""`megatron-dyt train` itself on one GPU: tokens/s, peak memory and losses of short runs.

    python benchmarks/gpu_train.py data --cache DIR               # the demo corpus, once
    python benchmarks/gpu_train.py run VARIANT --cache DIR --json OUT.json [--steps 25]
    python benchmarks/gpu_train.py list

Each `run` is one process and one short run of the real trainer (DeepSpeed engine, ZeRO, the
data pipeline, checkpoints) on the TinyLlama-1.1B shape (hidden 2048, 22 layers, GQA 32/4, FFN
5632, vocabulary 32000, sequence 2048, micro-batch 4), bf16. Step times come from the trainer's
own step function (it synchronises every step: the loss is read back), skipping the first
`--warmup` steps (Triton JIT, cuDNN/cuBLAS autotuning). The run's final checkpoint is timed too.
The row is merged into the JSON file, which is rewritten atomically, so a call cut short keeps
the rows it finished. `--tiny` swaps in a small shape so the path can be tested on CPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from megatron_dyt.kernels.bench_step import PRESETS

SHAPES = {
    # the model `bench_step` times in its plain loop, so the two benchmarks compare
    "1b": {k: v for k, v in PRESETS["1b"].items() if k != "micro_batch_size"},
    "tiny": dict(
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        ffn_hidden_size=160,
        vocab_size=4096,
        seq_length=64,
    ),
}
# The DyT paper's α₀ for width 2048 (docs/design.md §1).
DYT = {"kind": "dyt", "alpha_attn": 1.0, "alpha_mlp": 0.5, "alpha_final": 0.5, "beta": False}
VARIANTS: dict[str, dict[str, Any]] = {
    "dyt-triton-z1": {"norm": {**DYT, "backend": "triton"}, "zero": 1},
    "rmsnorm-z1": {"norm": {"kind": "rmsnorm"}, "zero": 1},
    "dyt-torch-z1": {"norm": {**DYT, "backend": "torch"}, "zero": 1},
    "dyt-triton-z1-noscalars": {
        "norm": {**DYT, "backend": "triton", "learnable_alpha": False},
        "zero": 1,
        "scale": False,
    },
    "dyt-triton-z1-eager": {"norm": {**DYT, "backend": "triton"}, "zero": 1, "compile": "none"},
    "rmsnorm-z1-eager": {"norm": {"kind": "rmsnorm"}, "zero": 1, "compile": "none"},
    "dyt-triton-z2": {"norm": {**DYT, "backend": "triton"}, "zero": 2},
    "dyt-triton-z1-selective": {"norm": {**DYT, "backend": "triton"}, "zero": 1, "ac": "selective"},
    "dyt-triton-z1-full": {"norm": {**DYT, "backend": "triton"}, "zero": 1, "ac": "full"},
}
DEMO_VOCAB = 4096  # the corpus' tokenizer; the model's vocabulary is bigger, which is allowed


def demo_data(cache: Path) -> dict[str, Any]:
    """The `data` section: the demo corpus and its tokenizer, built in `cache` once."""
    from megatron_dyt.data import ensure_demo_data

    demo = ensure_demo_data(cache, DEMO_VOCAB, progress=False)
    return {"tokenizer": str(demo.tokenizer_path), "paths": [str(demo.data_prefix)]}


def config_tree(variant: str, steps: int, data: dict[str, Any], tiny: bool) -> dict[str, Any]:
    """The run's config; `data` is its data section (tests estimate memory with a stand-in)."""
    v = VARIANTS[variant]
    shape = SHAPES["tiny" if tiny else "1b"]
    micro = 4
    return {
        "model": {
            "name": f"tinyllama-{variant}",
            **shape,
            "norm": v["norm"],
            "embedding_scale": v.get("scale", v["norm"]["kind"] == "dyt"),
        },
        "parallel": {"tensor": 1, "pipeline": 1, "zero_stage": v["zero"]},
        "train": {
            "micro_batch_size": micro,
            "global_batch_tokens": micro * shape["seq_length"],
            "train_steps": steps,
            "warmup_steps": 2,
            "lr": 3e-4,
            "log_interval": steps,  # one metrics record, at the end
            "stats_interval": steps,  # norm statistics once, at the end
            "save_interval": 0,  # only the final checkpoint
            "eval_interval": 0,
            "activation_checkpointing": v.get("ac", "none"),
            "compile": v.get("compile", "auto"),  # auto: compiled blocks on CUDA
            "precision": "fp32" if tiny else "bf16",
        },
        "data": data,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from megatron_dyt import checkpoint
    from megatron_dyt.config import config_from_dict
    from megatron_dyt.info import summarize
    from megatron_dyt.training import trainer

    cache = Path(args.cache)
    cfg = config_from_dict(config_tree(args.variant, args.steps, demo_data(cache), args.tiny))
    step_s: list[float] = []
    save_s: list[float] = []
    real_step, real_save = trainer._train_step, checkpoint.save

    def timed_step(engine, batches, pipeline):
        t0 = time.perf_counter()
        loss = real_step(engine, batches, pipeline)  # reads the loss back: synchronised
        step_s.append(time.perf_counter() - t0)
        return loss

    def timed_save(*a, **k):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        folder = real_save(*a, **k)
        save_s.append(time.perf_counter() - t0)
        return folder

    trainer._train_step, checkpoint.save = timed_step, timed_save
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    run_dir = cache / "runs" / args.variant
    t0 = time.perf_counter()
    result = trainer.train(cfg, run_dir, progress=False)
    total = time.perf_counter() - t0
    timed = step_s[args.warmup :]
    ms = statistics.median(timed) * 1e3 if timed else None
    tokens = cfg.train.global_batch_tokens
    folder = result.checkpoint
    ckpt_bytes = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder else 0
    info = summarize(cfg, gpus=1)
    return {
        "variant": args.variant,
        "norm": cfg.model.norm.kind,
        "backend": cfg.model.norm.backend,
        "zero_stage": cfg.parallel.zero_stage,
        "grad_accum_dtype": cfg.train.grad_accum_dtype,
        "compile": cfg.train.compile,
        "activation_checkpointing": cfg.train.activation_checkpointing,
        "steps": len(step_s),
        "timed_steps": len(timed),
        "ms_per_step": ms,
        "tokens_per_s": tokens / (ms / 1e3) if ms else None,
        "first_step_s": step_s[0] if step_s else None,
        # the measured peak next to `info`'s estimate of it (docs/design.md §11): allocated
        # tensors, what the estimate counts, and what the caching allocator reserved
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30
        if torch.cuda.is_available()
        else None,
        "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30
        if torch.cuda.is_available()
        else None,
        "info_estimate_gib": info["memory_per_gpu_gib"],
        "info_estimate_total_gib": info["memory_per_gpu_gib"]["total"],
        "info_version": info["version"],
        "parameters": info["parameters"],
        "losses": {str(k): v for k, v in sorted(result.losses.items())},
        "checkpoint_s": save_s[-1] if save_s else None,
        "checkpoint_gb": ckpt_bytes / 1e9,
        "checkpoint_gb_per_s": ckpt_bytes / 1e9 / save_s[-1] if save_s else None,
        "total_s": total,
    }


def merge_row(path: Path, row: dict[str, Any]) -> None:
    import torch

    from megatron_dyt.fileio import atomic_write

    data = json.loads(path.read_text()) if path.is_file() else {"rows": []}
    if torch.cuda.is_available():
        data["device"] = torch.cuda.get_device_name()
    data["torch"] = torch.__version__
    try:
        import deepspeed
        import triton

        data["triton"], data["deepspeed"] = triton.__version__, deepspeed.__version__
    except ImportError:
        pass
    data["rows"] = [r for r in data["rows"] if r["variant"] != row["variant"]] + [row]
    atomic_write(path, json.dumps(data, indent=1) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("data", help="build the demo corpus and its tokenizer")
    d.add_argument("--cache", required=True)
    r = sub.add_parser("run", help="one short training run of a variant")
    r.add_argument("variant", choices=sorted(VARIANTS))
    r.add_argument("--cache", required=True)
    r.add_argument("--json", required=True)
    r.add_argument("--steps", type=int, default=25)
    r.add_argument("--warmup", type=int, default=5)
    r.add_argument("--tiny", action="store_true", help="a small shape, to test the path on CPU")
    sub.add_parser("list", help="the variants")
    args = parser.parse_args(argv)
    if args.cmd == "list":
        print("\n".join(VARIANTS))
        return 0
    if args.cmd == "data":
        from megatron_dyt.data import ensure_demo_data

        t0 = time.perf_counter()
        demo = ensure_demo_data(Path(args.cache), DEMO_VOCAB, progress=False)
        print(f"demo data {demo.data_prefix} in {time.perf_counter() - t0:.1f} s")
        return 0
    row = run(args)
    merge_row(Path(args.json), row)
    keys = ("variant", "ms_per_step", "tokens_per_s", "peak_gib", "info_estimate_total_gib")
    print(json.dumps({k: row[k] for k in keys}))
    print(f"losses: {list(row['losses'].values())[:3]} ... {list(row['losses'].values())[-3:]}")
    print(f"checkpoint: {row['checkpoint_gb']:.2f} GB in {row['checkpoint_s']:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
