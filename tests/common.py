"""Small configs shared by the tests."""

from __future__ import annotations

from typing import Any

from megatron_dyt.config import Config, config_from_dict


def tiny_dict(kind: str = "dyt", tp: int = 1, pp: int = 1, **model: Any) -> dict:
    norm: dict[str, Any] = {"kind": kind}
    if kind in ("dyt", "derf"):
        norm.update(alpha_attn=0.8, alpha_mlp=0.3, alpha_final=0.4, beta=kind == "derf")
    return {
        "model": {
            "name": f"test-{kind}",
            "hidden_size": 64,
            "num_layers": 4,
            "num_heads": 4,
            "num_kv_heads": 2,
            "ffn_hidden_size": 96,
            "vocab_size": 256,
            "make_vocab_size_divisible_by": 8,
            "seq_length": 16,
            "embedding_scale": kind in ("dyt", "derf"),
            "norm": norm,
            **model,
        },
        "parallel": {"tensor": tp, "pipeline": pp, "zero_stage": 0 if pp > 1 else 1},
        "train": {"seed": 7},
    }


def tiny(kind: str = "dyt", tp: int = 1, pp: int = 1, **model: Any) -> Config:
    return config_from_dict(tiny_dict(kind, tp, pp, **model))


STEPS = 8


def train_dict(corpus: dict, tp: int = 1, pp: int = 1, zero: int = 1, **train: Any) -> dict:
    """A 2-layer DyT model training on the `corpus` fixture, fp32, 8 sequences of 32 per step."""
    cfg = tiny_dict("dyt", tp=tp, pp=pp, num_layers=2, seq_length=32, vocab_size=512)
    cfg["parallel"]["zero_stage"] = zero
    cfg["parallel"]["zero3_param_persistence_threshold"] = 0  # really partition a tiny model
    cfg["train"].update(
        {
            "micro_batch_size": 2,
            "global_batch_tokens": 8 * 32,  # 8 sequences: 4 micro-batches at DP 1, 2 at DP 2
            "train_steps": STEPS,
            "lr": 2e-2,
            "warmup_steps": 2,
            "precision": "fp32",
            "save_interval": 0,
            "eval_interval": 0,
            "log_interval": 1,
            **train,
        }
    )
    cfg["data"] = {
        "tokenizer": corpus["tokenizer"],
        "paths": [corpus["prefix"]],
        "split": "90,10,0",
        "cache_dir": corpus["cache"],
    }
    return cfg


def train_worker(cfg_dict: dict, run_dir: str, stop_after: int | None = None) -> dict:
    """Run `megatron_dyt.training.trainer.train` in a test worker process; what the tests compare."""
    from pathlib import Path

    from megatron_dyt.training.trainer import train

    result = train(config_from_dict(cfg_dict), Path(run_dir), progress=False, stop_after=stop_after)
    return {
        "losses": result.losses,
        "valid": result.valid_losses,
        "step": result.step,
        "checkpoint": str(result.checkpoint),
    }
