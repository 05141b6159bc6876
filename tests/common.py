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
