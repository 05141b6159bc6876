"""`megatron-dyt info`: parameter counts and a per-GPU memory estimate, built on the meta device.

Memory model (bytes per parameter, mixed precision as in the ZeRO paper): bf16/fp16 weights 2,
gradients 2, optimizer 12 (fp32 master copy + Adam m and v); fp32 training: 4, 4, 8. ZeRO-1
divides the optimizer by DP, ZeRO-2 the gradients too, ZeRO-3 the weights too.

Activations per block (bytes, half precision; s sequence, b micro-batch, h hidden, k kv width,
f FFN, t TP): the two norm inputs and outputs 8·s·b·h (÷t under sequence parallelism) plus
(4·h + 4·k + 8·f)·s·b/t for what attention (q, k, v, output) and SwiGLU (gate, up, silu, product)
keep for backward. `selective` recomputes the attention core (its output is not kept), `full`
keeps only each block's input and recomputes one block at a time. With pipeline parallelism,
1F1B keeps (PP − stage) micro-batches in flight; the last stage also holds fp32 logits.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from megatron_dyt import __version__
from megatron_dyt.config import Config
from megatron_dyt.layout import data_parallel_size
from megatron_dyt.norms import describe_norm

GIB = 1024**3


@dataclass
class MemoryEstimate:
    weights: float
    gradients: float
    optimizer: float
    activations: float

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations

    def as_gib(self) -> dict[str, float]:
        out = {k: round(v / GIB, 3) for k, v in asdict(self).items()}
        out["total"] = round(self.total / GIB, 3)
        return out


def build_meta_model(cfg: Config) -> nn.Module:
    """The whole model at TP=1 on the meta device: shapes and counts, no memory."""
    from megatron_dyt import parallel
    from megatron_dyt.model import LlamaModel

    # Same padded vocabulary as the real layout, built unsharded in this one process.
    multiple = math.lcm(cfg.model.make_vocab_size_divisible_by, cfg.parallel.tensor)
    meta_cfg = cfg.model_copy(
        update={
            "model": cfg.model.model_copy(update={"make_vocab_size_divisible_by": multiple}),
            "parallel": cfg.parallel.model_copy(
                update={"tensor": 1, "pipeline": 1, "sequence_parallel": False}
            ),
        }
    )
    parallel.init_distributed("gloo")
    parallel.initialize_model_parallel(meta_cfg.parallel)
    with torch.device("meta"):
        return LlamaModel(meta_cfg)


def _stage_param_counts(model: nn.Module, cfg: Config) -> list[int]:
    """Parameters held by one GPU of each pipeline stage (TP-sharded tensors divided by TP)."""
    from megatron_dyt.parallel import is_sharded

    tp, pp = cfg.parallel.tensor, cfg.parallel.pipeline

    def local(module: nn.Module) -> int:
        return sum(p.numel() // tp if is_sharded(p) else p.numel() for p in module.parameters())

    per_stage = cfg.model.num_layers // pp
    counts = []
    for stage in range(pp):
        n = sum(local(b) for b in model.layers[stage * per_stage : (stage + 1) * per_stage])
        if stage == 0:
            n += local(model.embedding)
        if stage == pp - 1:
            n += local(model.output)
        counts.append(n)
    return counts


def _activation_bytes(cfg: Config, stage: int) -> float:
    m, p, t = cfg.model, cfg.parallel, cfg.train
    s, b, h, f = m.seq_length, t.micro_batch_size, m.hidden_size, m.ffn_hidden_size
    k = m.kv_heads * m.head_dim
    tp, pp = p.tensor, p.pipeline
    act = 4 if t.precision == "fp32" else 2
    half = act / 2  # the formula below is written for 2-byte activations
    sp = tp if p.sequence_parallel else 1
    norms = 8 * s * b * h / sp
    attn = (4 * h + 4 * k) * s * b / tp
    mlp = 8 * f * s * b / tp
    block_input = 2 * s * b * h / sp
    mode = t.activation_checkpointing
    if mode == "none":
        per_block = norms + attn + mlp
    elif mode == "selective":
        per_block = norms + attn - 2 * s * b * h / tp + mlp
    else:
        per_block = block_input
    blocks = m.num_layers // pp
    in_flight = pp - stage
    total = per_block * blocks * in_flight
    if mode == "full":  # one block's full working set while it is recomputed
        total += norms + attn + mlp
    if stage == 0:
        total += 2 * s * b * h / sp * in_flight  # embedding output
    if stage == pp - 1:
        total += 6 * s * b * cfg.padded_vocab_size / tp  # fp32 logits for the loss + half copy
    return total * half


def memory_estimate(cfg: Config, stage_params: list[int], dp: int) -> MemoryEstimate:
    """Per-GPU estimate for the heaviest pipeline stage."""
    fp32 = cfg.train.precision == "fp32"
    w_bytes, g_bytes, o_bytes = (4, 4, 8) if fp32 else (2, 2, 12)
    zero = cfg.parallel.zero_stage
    best = None
    for stage, n in enumerate(stage_params):
        est = MemoryEstimate(
            weights=n * w_bytes / (dp if zero >= 3 else 1),
            gradients=n * g_bytes / (dp if zero >= 2 else 1),
            optimizer=n * o_bytes / (dp if zero >= 1 else 1),
            activations=_activation_bytes(cfg, stage),
        )
        if best is None or est.total > best.total:
            best = est
    assert best is not None
    return best


def _block_rows(model: nn.Module) -> list[tuple[str, str, int]]:
    rows = []
    for name, module in model.layers[0].named_children():
        shapes = ", ".join(
            f"{pn}{list(p.shape)}" for pn, p in module.named_parameters(recurse=True)
        )
        rows.append((name, shapes, sum(p.numel() for p in module.parameters())))
    return rows


def summarize(cfg: Config, gpus: int | None = None) -> dict:
    """Everything `info` prints, as one JSON-able dict."""
    model = build_meta_model(cfg)
    total = sum(p.numel() for p in model.parameters())
    model_parallel = cfg.parallel.tensor * cfg.parallel.pipeline
    if gpus is None:
        gpus = 8 if 8 % model_parallel == 0 else model_parallel
    dp = data_parallel_size(cfg.parallel, gpus, what=f"--gpus {gpus}")
    stage_params = _stage_param_counts(model, cfg)
    mem = memory_estimate(cfg, stage_params, dp)
    m = cfg.model
    embedding = sum(p.numel() for p in model.embedding.parameters())
    output = sum(p.numel() for p in model.output.parameters())
    return {
        "version": __version__,
        "name": m.name,
        "parameters": total,
        "parameters_per_gpu": max(stage_params),
        "layout": {
            "gpus": gpus,
            "tensor": cfg.parallel.tensor,
            "pipeline": cfg.parallel.pipeline,
            "data": dp,
            "zero_stage": cfg.parallel.zero_stage,
            "sequence_parallel": cfg.parallel.sequence_parallel,
        },
        "shape": {
            "hidden_size": m.hidden_size,
            "num_layers": m.num_layers,
            "num_heads": m.num_heads,
            "num_kv_heads": m.kv_heads,
            "ffn_hidden_size": m.ffn_hidden_size,
            "vocab_size": m.vocab_size,
            "padded_vocab_size": cfg.padded_vocab_size,
            "seq_length": m.seq_length,
        },
        "layers": {
            "embedding": embedding,
            "block": [
                {"module": n, "shapes": s, "parameters": c} for n, s, c in _block_rows(model)
            ],
            "blocks": m.num_layers,
            "parameters_per_block": sum(p.numel() for p in model.layers[0].parameters()),
            "output": output,
        },
        "norms": {site: describe_norm(site, m.norm) for site in ("attention", "mlp", "final")},
        "embedding_scale": (
            f"learnable, init √{m.hidden_size} = {math.sqrt(m.hidden_size):.4g}"
            if m.embedding_scale
            else "off"
        ),
        "memory_per_gpu_gib": mem.as_gib(),
        "memory_assumptions": {
            "precision": "fp32" if cfg.train.precision == "fp32" else "bf16 mixed (2+2+12 B/param)",
            "micro_batch_size": cfg.train.micro_batch_size,
            "activation_checkpointing": cfg.train.activation_checkpointing,
        },
    }


def format_summary(info: dict) -> str:
    lay, shp, mem = info["layout"], info["shape"], info["memory_per_gpu_gib"]
    lines = [
        f"model {info['name']}: {info['parameters']:,} parameters"
        f" ({info['parameters'] / 1e9:.2f} B)",
        f"  hidden {shp['hidden_size']}, {shp['num_layers']} layers, heads {shp['num_heads']}"
        f" / kv {shp['num_kv_heads']}, FFN {shp['ffn_hidden_size']},"
        f" vocab {shp['vocab_size']} (padded {shp['padded_vocab_size']}), seq {shp['seq_length']}",
        "",
        f"{'layer':<28}{'parameters':>16}  shapes",
        f"{'embedding':<28}{info['layers']['embedding']:>16,}",
    ]
    for row in info["layers"]["block"]:
        lines.append(f"{'  block.' + row['module']:<28}{row['parameters']:>16,}  {row['shapes']}")
    lines += [
        f"{'block':<28}{info['layers']['parameters_per_block']:>16,}  × {info['layers']['blocks']}",
        f"{'output (final norm + head)':<28}{info['layers']['output']:>16,}",
        "",
        "norms:",
        *[f"  {site:<10} {desc}" for site, desc in info["norms"].items()],
        f"  embedding scale: {info['embedding_scale']}",
        "",
        f"layout: {lay['gpus']} GPUs = TP {lay['tensor']} × PP {lay['pipeline']} × DP {lay['data']},"
        f" ZeRO-{lay['zero_stage']}, sequence parallel {'on' if lay['sequence_parallel'] else 'off'}",
        f"parameters per GPU: {info['parameters_per_gpu']:,}",
        f"memory per GPU (GiB, {info['memory_assumptions']['precision']},"
        f" micro-batch {info['memory_assumptions']['micro_batch_size']},"
        f" checkpointing {info['memory_assumptions']['activation_checkpointing']}):",
        *[f"  {k:<12}{v:>10.2f}" for k, v in mem.items()],
    ]
    return "\n".join(lines)
