"""The `megatron-dyt` command. Subcommands: info (more arrive with training, eval, launch, convert)."""

from __future__ import annotations

import argparse
import json
import math
import sys
import warnings


def _quiet_imports() -> None:
    # megatron-core warns on import when Transformer Engine / Apex are absent; nothing here uses them.
    warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
    warnings.filterwarnings("ignore", category=DeprecationWarning)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"note: {message}", file=sys.stderr)


def cmd_info(args: argparse.Namespace) -> int:
    from megatron_dyt.config import load_config
    from megatron_dyt.info import format_summary, summarize

    cfg = load_config(args.config, args.overrides)
    info = summarize(cfg, gpus=args.gpus)
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
        raise ValueError(
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
    init_weights(model, cfg)
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="megatron-dyt",
        description="Tensor/pipeline-parallel LLaMA pretraining with DyT, Derf and RMSNorm norms.",
    )
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
        type=int,
        default=None,
        help="GPUs in the job (default: 8 if the layout fits, else TP×PP)",
    )
    info.add_argument(
        "--build",
        action="store_true",
        help="also build the model on CPU and run forward+backward once",
    )
    info.set_defaults(func=cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    _quiet_imports()
    warnings.showwarning = _show_warning
    parser = build_parser()
    args = parser.parse_args(argv)
    from megatron_dyt.config import ConfigError

    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"megatron-dyt: {exc}", file=sys.stderr)
        return 2
    except (ValueError, KeyError, FileNotFoundError) as exc:
        print(f"megatron-dyt: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("megatron-dyt: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
