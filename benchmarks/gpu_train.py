"""`megatron-dyt train` itself on one GPU: tokens/s, peak memory and losses of short runs.

    python benchmarks/gpu_train.py data --cache DIR               # the demo corpus, once
    python benchmarks/gpu_train.py run VARIANT --cache DIR --json OUT.json [--steps 25]
    python benchmarks/gpu_train.py resume VARIANT --cache DIR --json OUT.json
    python benchmarks/gpu_train.py accum --zero 2 --accum fp32 --json OUT.json
    python benchmarks/gpu_train.py table OUT.json                 # Markdown
    python benchmarks/gpu_train.py list

Each `run` is one process and one short run of the real trainer (DeepSpeed engine, ZeRO, the
data pipeline, checkpoints) on the TinyLlama-1.1B shape (hidden 2048, 22 layers, GQA 32/4, FFN
5632, vocabulary 32000, sequence 2048, micro-batch 4), bf16. Step times come from the trainer's
own step function (it synchronises every step: the loss is read back), skipping the first
`--warmup` steps (Triton JIT, cuDNN/cuBLAS autotuning). The run's final checkpoint is timed too.
The row is merged into the JSON file, which is rewritten atomically, so a call cut short keeps
the rows it finished. `--tiny` swaps in a small shape so the path can be tested on CPU.

`resume` restarts a finished `run` from its step-10 checkpoint in a fresh run folder, trains
steps 11-20 and compares their losses with the uninterrupted run's. `accum` measures how exactly
DeepSpeed sums 16 bf16 micro-batch gradients (`training/accum_check.py`) on a 2-layer model of
the same width. `table` prints the Markdown tables of the JSON, each run against the compiled
plain loop of `bench_step --compile` measured in the same call (key `train_step_compiled`).
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
RESUME_FROM, RESUME_TO = 10, 20
RESUME_TOLERANCE = 0.02  # |Δloss| of a resumed bf16 run (compiled kernels need not be bitwise)


def demo_data(cache: Path) -> dict[str, Any]:
    """The `data` section: the demo corpus and its tokenizer, built in `cache` once."""
    from megatron_dyt.data import ensure_demo_data

    demo = ensure_demo_data(cache, DEMO_VOCAB, progress=False)
    return {"tokenizer": str(demo.tokenizer_path), "paths": [str(demo.data_prefix)]}


def config_tree(
    variant: str, steps: int, data: dict[str, Any], tiny: bool, save_at: int = 0
) -> dict[str, Any]:
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
            "save_interval": save_at,  # 0: only the final checkpoint
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
    from megatron_dyt.model.flops import flops_per_token
    from megatron_dyt.training import trainer
    from megatron_dyt.training.metrics import peak_tflops

    cache = Path(args.cache)
    tree = config_tree(args.variant, args.steps, demo_data(cache), args.tiny, args.save_at)
    cfg = config_from_dict(tree)
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
    tokens_per_s = tokens / (ms / 1e3) if ms else None
    # model TFLOP/s and MFU as the trainer's log line counts them; `info` reads the MFU back
    tflops = flops_per_token(cfg, info["parameters"]) * tokens_per_s / 1e12 if ms else None
    peak = peak_tflops(cfg)
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
        "tokens_per_s": tokens_per_s,
        "tflops_per_gpu": tflops,
        "mfu": tflops / peak if tflops and peak else None,
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
    data["rows"] = [r for r in data.get("rows", []) if r["variant"] != row["variant"]] + [row]
    atomic_write(path, json.dumps(data, indent=1) + "\n")


def resume(args: argparse.Namespace) -> dict[str, Any]:
    """Steps RESUME_FROM+1 … RESUME_TO of `args.variant`'s finished run, resumed in a fresh
    folder from its step-RESUME_FROM checkpoint, against the losses the run logged."""
    import shutil

    from megatron_dyt.checkpoint.format import CONFIG, LATEST, tag_for
    from megatron_dyt.config import load_config
    from megatron_dyt.fileio import atomic_write
    from megatron_dyt.training import trainer

    source = Path(args.cache) / "runs" / args.variant
    row = next(
        r for r in json.loads(Path(args.json).read_text())["rows"] if r["variant"] == args.variant
    )
    tag = tag_for(RESUME_FROM)
    target = Path(args.cache) / "runs" / f"{args.variant}-resume"
    shutil.rmtree(target, ignore_errors=True)
    (target / "checkpoints").mkdir(parents=True)
    shutil.copy2(source / CONFIG, target / CONFIG)
    shutil.copytree(source / "checkpoints" / tag, target / "checkpoints" / tag)
    atomic_write(target / "checkpoints" / LATEST, tag)
    cfg = load_config(target / CONFIG)
    result = trainer.train(cfg, target, progress=False, stop_after=RESUME_TO - RESUME_FROM)
    diffs = {
        str(step): loss - row["losses"][str(step)]
        for step, loss in sorted(result.losses.items())
        if str(step) in row["losses"]
    }
    worst = max(abs(d) for d in diffs.values()) if diffs else None
    shutil.rmtree(target, ignore_errors=True)
    return {
        "variant": args.variant,
        "from_step": RESUME_FROM,
        "steps": sorted(result.losses),
        "loss_differences": diffs,
        "max_abs_difference": worst,
        "tolerance": RESUME_TOLERANCE,
        "continues": worst is not None and worst <= RESUME_TOLERANCE,
    }


def accum(args: argparse.Namespace) -> dict[str, Any]:
    from megatron_dyt.training.accum_check import accumulation_error

    shape = SHAPES["tiny" if args.tiny else "1b"]
    tree = {
        "model": {
            "name": "accum",
            **{**shape, "num_layers": 2},
            "norm": {**DYT, "backend": "triton"},
            "embedding_scale": True,
        },
        "parallel": {"tensor": 1, "pipeline": 1, "zero_stage": args.zero},
        "train": {"micro_batch_size": 1 if args.tiny else 4, "grad_accum_dtype": args.accum},
    }
    return accumulation_error(tree, args.micro_batches)


def merge(path: Path, key: str, row: dict[str, Any], match: str) -> None:
    """Put `row` in the list `key` of the JSON file, replacing the row with the same `match`
    field; atomically, so a cut-off call keeps what it finished."""
    from megatron_dyt.fileio import atomic_write

    data = json.loads(path.read_text()) if path.is_file() else {"rows": []}
    rows = [r for r in data.get(key, []) if r.get(match) != row.get(match)]
    data[key] = rows + [row]
    atomic_write(path, json.dumps(data, indent=1) + "\n")


def _fmt(value: float | None, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def table(data: dict[str, Any]) -> str:
    """The Markdown tables of a results file: each run against the compiled plain loop with
    the same norm, peak memory against `info`, the resumed runs and the accumulation errors."""
    anchor = {r["norm"]: r for r in data.get("train_step_compiled", {}).get("rows", [])}
    out = [
        f"Device: {data.get('device', '?')}; torch {data.get('torch', '?')}, Triton"
        f" {data.get('triton', '?')}, DeepSpeed {data.get('deepspeed', '?')}.",
        "",
        "| variant | compile | ZeRO | AC | ms/step | tokens/s | vs compiled plain loop |"
        " peak GiB | `info` GiB | peak / `info` | checkpoint GB/s | loss first → last |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in data.get("rows", []):
        plain = anchor.get(r["norm"])
        ratio = (
            f"{r['tokens_per_s'] / plain['tokens_per_s']:.2f}×"
            if plain and r.get("tokens_per_s")
            else "–"
        )
        losses = list(r.get("losses", {}).values())
        peak, est = r.get("peak_gib"), r.get("info_estimate_total_gib")
        out.append(
            f"| {r['variant']} | {r['compile']} | {r['zero_stage']} |"
            f" {r['activation_checkpointing']} | {_fmt(r.get('ms_per_step'), '.1f')} |"
            f" {_fmt(r.get('tokens_per_s'), ',.0f')} | {ratio} | {_fmt(peak, '.1f')} |"
            f" {_fmt(est, '.1f')} | {_fmt(peak / est if peak and est else None, '.2f')} |"
            f" {_fmt(r.get('checkpoint_gb_per_s'), '.2f')} |"
            f" {_fmt(losses[0] if losses else None, '.3f')} → {_fmt(losses[-1] if losses else None, '.3f')} |"
        )
    if anchor:
        out += ["", "Compiled plain loop (`bench_step --compile`, no DeepSpeed):", ""]
        out += ["| norm | ms/step | tokens/s | peak GiB |", "|---|---:|---:|---:|"]
        for r in anchor.values():
            out.append(
                f"| {r['variant']} | {r['ms']:.1f} | {r['tokens_per_s']:,.0f} | {r['peak_gib']:.1f} |"
            )
    if data.get("resume"):
        out += ["", "| resumed run | from step | max |Δloss| | tolerance | continues |"]
        out.append("|---|---:|---:|---:|---|")
        for r in data["resume"]:
            out.append(
                f"| {r['variant']} | {r['from_step']} | {_fmt(r['max_abs_difference'], '.2e')} |"
                f" {r['tolerance']} | {'yes' if r['continues'] else 'no'} |"
            )
    if data.get("accum"):
        out += [
            "",
            "| ZeRO | accumulation | optimizer | micro-batches | matrices rel. err | α rel. err |",
        ]
        out.append("|---:|---|---|---:|---:|---:|")
        for r in data["accum"]:
            out.append(
                f"| {r['zero_stage']} | {r['grad_accum_dtype']} | {r['optimizer']} |"
                f" {r['micro_batches']} | {_fmt(r['matrices'], '.1e')} | {_fmt(r['alpha'], '.1e')} |"
            )
    return "\n".join(out)


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
    r.add_argument(
        "--save-at",
        type=int,
        default=0,
        help=f"also save every N steps (`resume` needs {RESUME_FROM})",
    )
    res = sub.add_parser("resume", help="resume a finished run from step 10 and compare")
    res.add_argument("variant", choices=sorted(VARIANTS))
    res.add_argument("--cache", required=True)
    res.add_argument("--json", required=True)
    acc = sub.add_parser("accum", help="gradient-accumulation numerics (bf16 vs fp32 sums)")
    acc.add_argument("--zero", type=int, choices=[1, 2], default=2)
    acc.add_argument("--accum", choices=["fp32", "bf16"], required=True)
    acc.add_argument("--micro-batches", type=int, default=16)
    acc.add_argument("--json", required=True)
    acc.add_argument("--tiny", action="store_true", help="a small shape, to test the path on CPU")
    tab = sub.add_parser("table", help="print the Markdown tables of a results file")
    tab.add_argument("json")
    sub.add_parser("list", help="the variants")
    args = parser.parse_args(argv)
    if args.cmd == "list":
        print("\n".join(VARIANTS))
        return 0
    if args.cmd == "table":
        print(table(json.loads(Path(args.json).read_text())))
        return 0
    if args.cmd == "resume":
        row = resume(args)
        merge(Path(args.json), "resume", row, "variant")
        print(json.dumps({k: row[k] for k in ("variant", "max_abs_difference", "continues")}))
        return 0
    if args.cmd == "accum":
        row = accum(args)
        row["id"] = f"zero{row['zero_stage']}-{row['grad_accum_dtype']}"
        merge(Path(args.json), "accum", row, "id")
        print(json.dumps(row))
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
