"""The `megatron-dyt` command: info, config, train, eval, lm-eval, generate, report, data, launch,
convert, sweep."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import warnings
from pathlib import Path

from megatron_dyt import __version__
from megatron_dyt.arguments import (
    fraction,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
)
from megatron_dyt.errors import MegatronDyTError, UsageError


def _quiet_imports() -> None:
    # megatron-core warns on import when Transformer Engine / Apex are absent; nothing here uses them.
    warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
    warnings.filterwarnings("ignore", category=DeprecationWarning)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"note: {message}", file=sys.stderr)


def cmd_info(args: argparse.Namespace) -> int:
    from megatron_dyt.config import load_config
    from megatron_dyt.info import format_summary, summarize
    from megatron_dyt.model.flops import PEAK_TFLOPS

    if args.gpu is not None and args.gpu.upper() not in PEAK_TFLOPS:
        raise UsageError(f"--gpu {args.gpu}: expected one of {', '.join(PEAK_TFLOPS)}")
    cfg = load_config(args.config, args.overrides)
    info = summarize(
        cfg,
        gpus=args.gpus,
        gpu_memory=args.gpu_memory,
        tokens=args.tokens,
        mfu=args.mfu,
        gpu=args.gpu and args.gpu.upper(),
    )
    if args.build:
        info["smoke_test"] = _smoke_test(cfg, info["parameters"])
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        print(format_summary(info))
        if args.build:
            st = info["smoke_test"]
            print(
                f"\nbuilt on CPU and ran forward+backward on {st['tokens']} random tokens:"
                f" loss {st['loss']:.4f} (uniform prediction: ln {st['padded_vocab']} ="
                f" {st['uniform_loss']:.4f}), gradient norm {st['grad_norm']:.4f}"
            )
    return 0


def _smoke_test(cfg, parameters: int) -> dict:
    """Materialise a small model for real and run one forward+backward pass."""
    import torch

    from megatron_dyt import parallel
    from megatron_dyt.model import LlamaModel, init_weights

    if parameters > 2_000_000_000:
        raise UsageError(
            f"--build materialises the model on this CPU; {parameters:,} parameters is too many"
            " (allowed: up to 2,000,000,000)"
        )
    if cfg.parallel.tensor * cfg.parallel.pipeline != 1:
        cfg = cfg.model_copy(
            update={"parallel": cfg.parallel.model_copy(update={"tensor": 1, "pipeline": 1})}
        )
    parallel.initialize_model_parallel(cfg.parallel)
    torch.manual_seed(cfg.train.seed)
    model = LlamaModel(cfg)
    init_weights(model, cfg.model, cfg.train.seed)
    seq = min(cfg.model.seq_length, 128)
    tokens = torch.randint(0, cfg.model.vocab_size, (cfg.train.micro_batch_size, seq + 1))
    loss = model(tokens[:, :-1], tokens[:, 1:])
    loss.backward()
    grad_norm = torch.sqrt(
        sum(p.grad.pow(2).sum() for p in model.parameters() if p.grad is not None)
    )
    return {
        "tokens": tokens[:, :-1].numel(),
        "loss": loss.item(),
        "uniform_loss": math.log(cfg.padded_vocab_size),
        "padded_vocab": cfg.padded_vocab_size,
        "grad_norm": grad_norm.item(),
    }


def cmd_train(args: argparse.Namespace) -> int:
    from megatron_dyt.config import load_config
    from megatron_dyt.training.trainer import train

    cfg = load_config(args.config, args.overrides)
    run_dir = Path(args.run_dir) if args.run_dir else Path("runs") / Path(args.config).stem
    result = train(
        cfg, run_dir, allow_config_change=args.allow_config_change, progress=not args.no_progress
    )
    if int(os.environ.get("RANK", "0")) == 0:
        _print_train_summary(result)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from megatron_dyt.eval.run import evaluate_checkpoint
    from megatron_dyt.eval.suites import expand

    if args.tasks and args.suite:
        raise UsageError("give either --tasks or --suite, not both")
    tasks = expand(args.tasks, args.suite or (None if args.tasks else "offline"))
    batch = args.batch_size if args.batch_size == "auto" else _positive_int(args.batch_size)
    out = evaluate_checkpoint(
        args.checkpoint,
        tasks,
        overrides=args.overrides,
        batch_size=batch,
        limit=args.limit,
        out_dir=args.out,
        num_fewshot=args.num_fewshot,
        include_path=args.include_path,
        log_samples=args.log_samples,
    )
    if out.table is not None:
        print("\n" + out.table)
        print(f"results: {out.out_dir / 'results.json'}")
        if args.log_samples:
            print(f"samples: {out.out_dir / 'samples_<task>.jsonl'}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from megatron_dyt.sweep.diagnose import diagnose, markdown, write_diagnosis

    d = diagnose(args.run_dir, threshold=args.threshold, std_growth=args.std_growth)
    out = Path(args.out) if args.out else Path(args.run_dir) / "report"
    written = write_diagnosis(d, out)
    print(json.dumps(d.to_dict(), indent=1) if args.json else markdown(d), end="")
    print(f"wrote {', '.join(p.name for p in written)} in {out}", file=sys.stderr)
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    import torch.distributed as dist

    from megatron_dyt.inference.generate import Sampling, generate_text

    sampling = Sampling(temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    text, result = generate_text(
        args.checkpoint,
        args.prompt,
        max_new_tokens=args.max_new_tokens,
        sampling=sampling,
        overrides=args.overrides,
    )
    if dist.get_rank() == 0:
        print(text, flush=True)
        end = "EOS" if result.stopped_at_eos else "--max-new-tokens"
        print(
            f"{len(result.prompt)} prompt tokens, {len(result.tokens)} new (stopped by {end});"
            f" prefill {result.prefill_s:.3f} s, decoding {result.tokens_per_s:.1f} tokens/s",
            file=sys.stderr,
        )
    return 0


def cmd_lm_eval(args: list[str]) -> int:
    from megatron_dyt.eval.lm_eval_cli import run_lm_eval

    return run_lm_eval(args)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise UsageError(f"--batch-size {text!r}: expected a positive integer or 'auto'")
    return value


def _print_train_summary(result) -> None:
    losses = result.losses
    if not losses:
        print(f"nothing to do: {result.run_dir} is already trained to step {result.step}")
        return
    steps = sorted(losses)
    marks = sorted({steps[0], *steps[len(steps) // 4 :: max(1, len(steps) // 4)], steps[-1]})
    print(f"\nloss curve ({result.run_dir}):")
    for s in marks:
        valid = result.valid_losses.get(s)
        print(f"  step {s:>6}  loss {losses[s]:.4f}" + (f"  valid {valid:.4f}" if valid else ""))
    if result.checkpoint:
        print(f"checkpoint: {result.checkpoint}")
    print(f"metrics:    {result.run_dir / 'metrics.jsonl'}")
    print(f"tensorboard --logdir {result.run_dir / 'tensorboard'}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="megatron-dyt",
        description="Tensor/pipeline-parallel LLaMA pretraining with DyT, Derf and RMSNorm norms.",
    )
    parser.add_argument("--version", action="version", version=f"megatron-dyt {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    info = sub.add_parser(
        "info",
        help="layer table, parameter count, norms and a per-GPU memory estimate",
        description="Describe the model a config builds, counted on the meta device.",
    )
    info.add_argument(
        "config", metavar="CONFIG", help="YAML config, e.g. configs/llama-7b-dyt.yaml"
    )
    info.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="e.g. model.norm.alpha_attn=0.5"
    )
    info.add_argument("--json", action="store_true", help="print one JSON object")
    info.add_argument(
        "--gpus",
        type=positive_int,
        default=None,
        help="GPUs in the job (default: 8 if the layout fits, else TP×PP)",
    )
    info.add_argument(
        "--gpu-memory",
        type=positive_float,
        default=None,
        metavar="GIB",
        help="memory of one GPU in GiB, for the fit check (default: this machine's GPU, else 80)",
    )
    info.add_argument(
        "--tokens",
        type=positive_float,
        default=None,
        help="tokens to train on, for the time estimate, e.g. 2e11 (default: train.train_steps"
        " steps)",
    )
    info.add_argument(
        "--mfu",
        type=fraction,
        default=None,
        help="model FLOPs utilisation for the time estimate, in (0, 1] (default: the best the"
        " trainer measured on that GPU in benchmarks/results, else 0.4)",
    )
    info.add_argument(
        "--gpu",
        default=None,
        metavar="MODEL",
        help="GPU model whose peak TFLOP/s the time estimate uses: H100, H200, A100, …"
        " (default: this machine's, else H100; train.peak_tflops overrides the peak)",
    )
    info.add_argument(
        "--build",
        action="store_true",
        help="also build the model on CPU and run forward+backward once",
    )
    info.set_defaults(func=cmd_info)

    from megatron_dyt.config_cli import add_config_parser

    add_config_parser(sub)

    train = sub.add_parser(
        "train",
        help="pretrain (or resume) a model with DeepSpeed",
        description="Train the model a config describes. Launch with torchrun for several"
        " processes; running the same command again resumes from the run folder's latest"
        " checkpoint.",
    )
    train.add_argument("config", metavar="CONFIG")
    train.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    train.add_argument("--run-dir", help="run folder (default: runs/<config file name>)")
    train.add_argument(
        "--allow-config-change",
        action="store_true",
        help="resume a run folder whose saved config differs from this one",
    )
    train.add_argument(
        "--no-progress",
        action="store_true",
        help="plain log lines instead of the progress bar (the default where stderr is no terminal)",
    )
    train.set_defaults(func=cmd_train)

    ev = sub.add_parser(
        "eval",
        help="lm-eval tasks on a checkpoint (zero- or few-shot), suites and a results table",
        description="Evaluate a checkpoint saved by `megatron-dyt train` with lm-eval-harness, at"
        " the layout it was saved with (launch as many processes as it had, e.g. with torchrun)"
        " or at TP=PP=1 in one process. Default: the bundled offline suite.",
    )
    ev.add_argument(
        "checkpoint", metavar="CHECKPOINT", help="run folder, its checkpoints/ or a step_* folder"
    )
    ev.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. parallel.tensor=1")
    ev.add_argument("--tasks", help="comma-separated lm-eval task names (suite names allowed)")
    ev.add_argument("--suite", help="paper15, quick or offline")
    ev.add_argument("--batch-size", default="8", help="requests per forward pass, or 'auto'")
    ev.add_argument("--limit", type=positive_int, default=None, help="at most N documents per task")
    ev.add_argument("--out", help="output folder (default: <run>/eval/<step>)")
    ev.add_argument(
        "--num-fewshot",
        type=non_negative_int,
        default=None,
        metavar="N",
        help="examples in front of each prompt (default: each task's own, 0 for most)",
    )
    ev.add_argument(
        "--include-path",
        metavar="DIR",
        help="a folder of your own lm-eval task YAML files (their tasks join the known ones)",
    )
    ev.add_argument(
        "--log-samples",
        action="store_true",
        help="also write samples_<task>.jsonl: every document's requests, scores and metrics",
    )
    ev.set_defaults(func=cmd_eval)

    gen = sub.add_parser(
        "generate",
        help="continue a prompt with a checkpoint (KV cache; greedy or sampled)",
        description="Generate text from a checkpoint at the layout it was saved with (launch as"
        " many processes as it had, e.g. with torchrun) or at TP=PP=1 in one process. No BOS is"
        " added to the prompt; decoding stops at EOS. The new text goes to stdout.",
    )
    gen.add_argument(
        "checkpoint", metavar="CHECKPOINT", help="run folder, its checkpoints/ or a step_* folder"
    )
    gen.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. train.precision=fp32")
    gen.add_argument("--prompt", required=True, help="the text to continue")
    gen.add_argument(
        "--max-new-tokens", type=positive_int, default=64, help="at most N new tokens (default 64)"
    )
    gen.add_argument(
        "--temperature",
        type=non_negative_float,
        default=0.0,
        help="sampling temperature (default 0: greedy)",
    )
    gen.add_argument(
        "--top-p",
        type=positive_float,
        default=1.0,
        help="sample from the smallest set of tokens whose probability reaches P (default 1)",
    )
    gen.add_argument(
        "--seed", type=non_negative_int, default=0, help="seed of the sampling (default 0)"
    )
    gen.set_defaults(func=cmd_generate)

    sub.add_parser(
        "lm-eval",
        add_help=False,
        help="lm-eval's own command line, with the model 'megatron-dyt' registered",
        description="Everything after `lm-eval` goes to lm-eval's CLI (`lm_eval --help`);"
        " --model defaults to megatron-dyt, e.g. --model_args pretrained=runs/demo,batch_size=8.",
    )
    rep = sub.add_parser(
        "report",
        help="one run's norm statistics over training (α, input std, saturation per layer)",
        description="Read RUN/metrics.jsonl and RUN/status.json: how the run ended and, per"
        " norm layer and site (attention, mlp, final), α, the input std and the saturated"
        " fraction |α·x| > 2 over training; flags layers whose saturation grows past"
        " --threshold or whose input std blows up. Writes diagnosis.md, diagnosis.json and"
        " norm_stats.png. A sweep's report: `megatron-dyt sweep report`.",
    )
    rep.add_argument("run_dir", metavar="RUN", help="a run folder of `megatron-dyt train`")
    rep.add_argument(
        "--threshold",
        type=fraction,
        default=0.1,
        help="saturated fraction above which a layer whose saturation grew is flagged"
        " (default 0.1)",
    )
    rep.add_argument(
        "--std-growth",
        type=positive_float,
        default=10.0,
        help="flag a layer whose input std grew by this factor or more (default 10)",
    )
    rep.add_argument("--out", help="folder for the files (default: RUN/report)")
    rep.add_argument("--json", action="store_true", help="print JSON instead of Markdown")
    rep.set_defaults(func=cmd_report)

    from megatron_dyt.convert.cli import add_convert_parser
    from megatron_dyt.data.cli import add_data_commands
    from megatron_dyt.launch.cli import add_launch_parser
    from megatron_dyt.sweep.cli import add_sweep_parser

    add_data_commands(sub)
    add_launch_parser(sub)
    add_convert_parser(sub)
    add_sweep_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    _quiet_imports()
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    warnings.showwarning = _show_warning
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["lm-eval"]:  # lm-eval parses its own arguments
        return _run(cmd_lm_eval, argv[1:])
    # KEY=VALUE overrides may also come after options (`train CFG --run-dir R a.b=1`).
    args, extra = parser.parse_known_args(argv)
    if extra:
        if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides += extra
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return _run(args.func, args)


def _run(func, args) -> int:
    """Run a subcommand: bad input is one line on stderr and exit 2, no traceback."""
    try:
        return func(args)
    except MegatronDyTError as exc:  # bad input: one line, no traceback
        print(f"megatron-dyt: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:
        if exc.filename is None:  # not about a path the user gave: a bug, show it all
            raise
        print(f"megatron-dyt: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("megatron-dyt: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
