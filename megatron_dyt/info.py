"""`megatron-dyt info`: parameter counts and a per-GPU memory estimate, built on the meta device.

The memory estimate and its assumptions are docs/design.md §11. In short, per GPU of the
heaviest pipeline stage: weights, gradients and Adam state as the ZeRO stage partitions them;
the tensors autograd keeps for the backward, counted per block from what each CUDA kernel saves
(flash attention, F.rms_norm, the DyT/Derf Triton kernels, or the fp32 copies of the torch
reference), times the micro-batches 1F1B keeps in flight; the loss's logits; DeepSpeed's
gradient-reduction bucket and the optimizer step's fp32 gradient partition. The peak is the
larger of the backward's and the optimizer step's. It counts tensors (what
`torch.cuda.max_memory_allocated` reports), not the CUDA context or allocator fragmentation, so
a config fits when the estimate is at most `USABLE_FRACTION` of the GPU's memory.

The time estimate (`time_estimate`) divides the run's model FLOPs (`flops_per_token`, as MFU is
quoted) by the GPUs' peak at an MFU: one given, else the best the trainer reached on that GPU
model in `benchmarks/results/train-<gpu>.json`, else `DEFAULT_MFU`.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from megatron_dyt import __version__
from megatron_dyt.config import Config, NormConfig, Recompute
from megatron_dyt.layout import data_parallel_size
from megatron_dyt.model.flops import PEAK_TFLOPS, flops_per_token, gpu_model
from megatron_dyt.norms import describe_norm

GIB = 1024**3
DEFAULT_GPU_MEMORY_GIB = 80.0  # no GPU here and no --gpu-memory: an 80 GB A100 / H100
USABLE_FRACTION = 0.9  # the rest: CUDA context, NCCL buffers, the caching allocator's fragmentation

# DeepSpeed's ZeRO defaults (deepspeed/runtime/zero/config.py), which
# `training.engine.deepspeed_config` leaves as they are (the reduce bucket is parallel's).
ZERO3_PREFETCH_BUCKET = 50_000_000  # elements of parameters ZeRO-3 fetches ahead
ZERO3_SUB_GROUP = 1_000_000_000  # elements ZeRO-3's optimizer steps at a time (sub_group_size)


# ---- what one block keeps for the backward --------------------------------------------------


@dataclass(frozen=True)
class NormSaves:
    """What one call of a norm keeps for its backward, in bytes: per element of its input, per
    row (token), per channel (fp32 copies of γ, β); and whether what it keeps per element is
    its input tensor itself (shared with anyone else who holds the input)."""

    per_element: float
    per_row: float
    per_channel: float
    keeps_input: bool
    what: str


def norm_saves(norm: NormConfig, act_bytes: int) -> NormSaves:
    """The saved tensors of one norm call on CUDA with `act_bytes`-byte activations (2: bf16 or
    fp16, 4: fp32). Parameters are not activations; copies of them in another dtype are."""
    half = act_bytes < 4
    if norm.kind == "rmsnorm":
        # One fused kernel (torch's _fused_rms_norm): the input, and 1/rms in fp32 per row.
        return NormSaves(
            act_bytes, 4, 0, True, "its input + an fp32 statistic per row (F.rms_norm)"
        )
    if norm.kind == "layernorm":
        # The module upcasts: layer_norm keeps the fp32 input, mean and rstd, and fp32 γ and β.
        return NormSaves(
            4,
            8,
            8 if half else 0,
            not half,
            "an fp32 copy of its input + 2 fp32 statistics per row",
        )
    if norm.backend == "triton":
        # The kernels keep x (h = x + r for the fused residual) and recompute f(α·x) backward.
        return NormSaves(act_bytes, 0, 0, True, "its input only (Triton kernel)")
    # The torch reference, in fp32: α·x keeps x (for dα, if α trains); tanh and sigmoid keep
    # their output, which ·γ keeps too; hardtanh keeps its input and ·γ its output; identity: ·γ
    # keeps α·x. Derf: erf keeps its input and ·γ its output. γ is copied to fp32 for ·γ.
    x_copy = 4 if norm.learnable_alpha else 0
    squash = 8 if norm.kind == "derf" or norm.squash == "hardtanh" else 4
    return NormSaves(
        x_copy + squash,
        0,
        4 if half else 0,
        not half and norm.learnable_alpha,
        f"{(x_copy + squash) // 4} fp32 tensors the size of its input (torch reference)",
    )


def _act_bytes(cfg: Config) -> int:
    return 4 if cfg.train.precision == "fp32" else 2


def block_activation_bytes(cfg: Config, mode: Recompute | None = None) -> dict[str, float]:
    """Bytes one transformer block keeps for its backward, per micro-batch on one GPU, by part,
    with activation checkpointing `mode` (default: the config's); docs/design.md §11.

    Models CUDA: flash attention (SDPA's flash backend or flash-attn) keeps q, k, v, its output
    (which the output projection keeps too: the same storage) and an fp32 log-sum-exp per head
    and token; the norms keep what `norm_saves` says; SwiGLU keeps gate/up, silu(gate) and the
    product. `selective` recomputes the attention core: its inputs and output stay (the
    checkpoint and the projection keep them), only the log-sum-exp goes. `full` keeps the
    block's input.
    """
    m, p, t = cfg.model, cfg.parallel, cfg.train
    mode = mode or t.activation_checkpointing
    a = _act_bytes(cfg)
    tokens = m.seq_length * t.micro_batch_size
    tp = p.tensor
    sp = tp if p.sequence_parallel else 1
    h, k, f = m.hidden_size, m.kv_heads * m.head_dim, m.ffn_hidden_size
    if mode == "full":
        return {"block input": a * tokens * h / sp}
    ns = norm_saves(m.norm, a)
    parts = {
        # the attention and MLP norms (under sequence parallelism on this rank's tokens)
        "norms": 2 * (ns.per_element * tokens * h / sp + ns.per_row * tokens / sp)
        + 2 * ns.per_channel * h,
        # their outputs, which QKV and gate/up keep (their local part under sequence parallelism)
        "norm outputs": 2 * a * tokens * h / sp,
        "attention": a * (2 * h + 2 * k) * tokens / tp,  # q, k, v and the output
        "log-sum-exp": 4 * m.num_heads * tokens / tp,
        "mlp": 4 * a * f * tokens / tp,  # gate/up (2f), silu(gate), silu(gate)·up
    }
    if mode == "selective":
        del parts["log-sum-exp"]
    return parts


def rope_table_bytes(cfg: Config) -> float:
    """Each block's attention caches fp32 cos and sin tables [seq, head_dim]: module state,
    once per block whatever the micro-batches in flight."""
    return 2 * 4 * cfg.model.seq_length * cfg.model.head_dim


# ---- one GPU of a pipeline stage ------------------------------------------------------------


@dataclass
class MemoryEstimate:
    """Bytes on one GPU of one pipeline stage (docs/design.md §11)."""

    weights: float
    gradients: float
    optimizer: float
    activations: float  # kept for the backward: every block of every in-flight micro-batch
    logits: float  # last stage: the head's half-precision logits and the fp32 softmax
    reduce_bucket: float  # ZeRO-1/2: allocated at the first gradient of each backward
    persistent_buffers: float  # RoPE tables; ZeRO-3's bucket, prefetch and gathered block
    step_buffers: float  # the optimizer step: fp32 gradient partition, AdamW's temporary
    gradients_held: bool  # gradients outlive a micro-batch (accumulation): there at the peak

    @property
    def backward(self) -> float:
        """At the start of a backward with every in-flight micro-batch's activations. The loss
        frees the logits before the first parameter gradient brings the reduce bucket."""
        held = self.gradients if self.gradients_held else 0.0
        return (
            self.weights
            + self.optimizer
            + held
            + self.activations
            + max(self.logits, self.reduce_bucket)
            + self.persistent_buffers
        )

    @property
    def step(self) -> float:
        """In the optimizer step: no activations; the gradient partition copied to fp32."""
        return self.weights + self.optimizer + self.step_buffers + self.persistent_buffers

    @property
    def total(self) -> float:
        return max(self.backward, self.step)

    def as_gib(self) -> dict[str, float]:
        out = {k: round(v / GIB, 3) for k, v in asdict(self).items() if not isinstance(v, bool)}
        out.update(
            backward=round(self.backward / GIB, 3),
            step=round(self.step / GIB, 3),
            total=round(self.total / GIB, 3),
        )
        return out


def micro_batches_per_step(cfg: Config, dp: int) -> float:
    """Micro-batches each GPU runs per optimizer step (not rounded: the trainer, not `info`,
    insists that the global batch divides)."""
    sequences = cfg.train.global_batch_tokens / cfg.model.seq_length
    return sequences / (cfg.train.micro_batch_size * dp)


def in_flight(cfg: Config, stage: int, micro_batches: float) -> int:
    """Micro-batches whose activations pipeline stage `stage` holds at once: PP − stage in
    1F1B, no more than a step has."""
    return max(1, min(cfg.parallel.pipeline - stage, math.ceil(micro_batches)))


def _activation_bytes(cfg: Config, stage: int, micro_batches: float) -> tuple[float, float]:
    """(activations, logits) on one GPU of pipeline stage `stage`, in bytes."""
    m, p, t = cfg.model, cfg.parallel, cfg.train
    a = _act_bytes(cfg)
    tokens = m.seq_length * t.micro_batch_size
    h, tp, pp = m.hidden_size, p.tensor, p.pipeline
    sp = tp if p.sequence_parallel else 1
    mode = t.activation_checkpointing
    ns = norm_saves(m.norm, a)
    per_micro_batch = sum(block_activation_bytes(cfg).values()) * (m.num_layers // pp)
    if stage == 0:
        per_micro_batch += 8 * tokens  # the token ids the embedding's backward indexes with
        if m.embedding_scale:
            per_micro_batch += a * tokens * h / sp  # the word embeddings, kept by · scale
    elif mode != "full" and not ns.keeps_input:
        per_micro_batch += a * tokens * h  # the received input, kept by the pipeline engine
    if stage < pp - 1:
        # the stage's output, kept for its backward by the pipeline engine (with TP > 1 it
        # keeps this rank's 1/TP part only)
        per_micro_batch += a * tokens * h / tp
    total = per_micro_batch * in_flight(cfg, stage, micro_batches)
    if mode == "full":  # one block's whole working set while it is recomputed
        total += sum(block_activation_bytes(cfg, "none").values())
    logits = 0.0
    if stage == pp - 1:
        # the final norm, and its output, which the head keeps
        total += ns.per_element * tokens * h / sp + ns.per_row * tokens / sp
        total += ns.per_channel * h + a * tokens * h / sp
        # the head's logits and their fp32 copy, in which the cross-entropy keeps the softmax:
        # 2 + 4 bytes per logit in half precision, 4 in fp32 (`.float()` copies nothing)
        logits = (a + 4 if a < 4 else 4) * tokens * cfg.padded_vocab_size / tp
    return total, logits


def _deepspeed_buffers(
    cfg: Config, n: int, dp: int, block_params: int
) -> tuple[float, float, float]:
    """(reduce bucket, persistent buffers, step buffers) of DeepSpeed in bytes, for `n`
    parameters on this GPU (`block_params` of them in one block)."""
    zero = cfg.parallel.zero_stage
    a = _act_bytes(cfg)
    bucket = persistent = 0.0
    reduce_bucket = cfg.parallel.reduce_bucket_size
    if zero in (1, 2):
        # one bucket of reduce_bucket_size gradients from each backward's first gradient; the
        # ZeRO optimizer holds two with overlap_comm (DeepSpeed's bf16 optimizer, ZeRO-1 with
        # fp32 accumulation, reduces once after the backward)
        bf16_optimizer = zero == 1 and a == 2 and cfg.train.grad_accum_dtype == "fp32"
        double = cfg.parallel.overlap_comm and not bf16_optimizer
        bucket = reduce_bucket * a * (2 if double else 1)
        stepped = n / dp
    elif zero == 3:
        # allocated at start-up and kept: the reduce bucket, the prefetched parameters and one
        # block's weights gathered whole
        persistent = (reduce_bucket + ZERO3_PREFETCH_BUCKET + block_params) * a
        stepped = min(n / dp, ZERO3_SUB_GROUP)
    else:
        stepped = n
    # The step copies the partition's gradients into one flat fp32 tensor and AdamW (torch's
    # foreach implementation) makes one temporary of its size; just before, the half-precision
    # gradients, their flat copy and the fp32 copy are alive together (2 + 2 + 4 bytes). Either
    # way 8 bytes per parameter stepped.
    return bucket, persistent, 8 * stepped


def memory_estimate(
    cfg: Config, stage_params: list[int], dp: int, block_params: int = 0
) -> tuple[MemoryEstimate, int]:
    """The estimate for one GPU of the heaviest pipeline stage, and that stage.
    `block_params` (one block's parameters on one GPU) matters under ZeRO-3 only."""
    fp32 = cfg.train.precision == "fp32"
    zero = cfg.parallel.zero_stage
    w_bytes, g_bytes = (4, 4) if fp32 else (2, 2)
    # Adam's m and v in fp32, and an fp32 master copy where there is one: in mixed precision,
    # and under ZeRO always (it clones its partition even when training in fp32).
    o_bytes = 8 if fp32 and zero == 0 else 12
    # bf16/fp16 gradients summed in fp32 (train.grad_accum_dtype, docs/design.md §3)
    accum32 = not fp32 and cfg.train.grad_accum_dtype == "fp32"
    micro_batches = micro_batches_per_step(cfg, dp)
    rope = rope_table_bytes(cfg) * (cfg.model.num_layers // cfg.parallel.pipeline)
    best: tuple[MemoryEstimate, int] | None = None
    for stage, n in enumerate(stage_params):
        activations, logits = _activation_bytes(cfg, stage, micro_batches)
        bucket, persistent, step = _deepspeed_buffers(cfg, n, dp, block_params)
        gradients, held = n * g_bytes / (dp if zero >= 2 else 1), micro_batches > 1
        if accum32 and zero == 1:
            # DeepSpeed's bf16 optimizer: the bf16 gradients (zeroed, never freed) and a
            # full-size fp32 buffer they are added into after every micro-batch; its step
            # reads the fp32 partition in place, AdamW adds one temporary of it.
            gradients, held, step = n * (g_bytes + 4), True, 4 * n / dp
        elif accum32 and zero >= 2:
            # the partition of the gradients is summed in fp32 and stepped in place
            gradients, held, step = n * 4 / dp, True, 4 * n / dp
        est = MemoryEstimate(
            weights=n * w_bytes / (dp if zero >= 3 else 1),
            gradients=gradients,
            optimizer=n * o_bytes / (dp if zero >= 1 else 1),
            activations=activations,
            logits=logits,
            reduce_bucket=bucket,
            persistent_buffers=persistent + rope,
            step_buffers=step,
            gradients_held=held,
        )
        if best is None or est.total > best[0].total:
            best = (est, stage)
    assert best is not None
    return best


# ---- how long it takes ------------------------------------------------------------------------

DEFAULT_MFU = 0.40  # what well-tuned Megatron-style training reaches at scale (design §11)
RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


def default_gpu() -> str:
    """This machine's GPU model when `PEAK_TFLOPS` knows it, else H100."""
    if torch.cuda.is_available():
        return gpu_model(torch.cuda.get_device_name()) or "H100"
    return "H100"


def measured_mfu(gpu: str) -> tuple[float | None, str]:
    """(the best MFU the trainer measured on `gpu`, its source), or (None, why not)."""
    path = RESULTS / f"train-{gpu.lower()}.json"
    try:
        rows = json.loads(path.read_text()).get("rows", [])
    except (OSError, ValueError, AttributeError):
        return None, f"no trainer measurement for {gpu} in benchmarks/results"
    mfus = [r["mfu"] for r in rows if isinstance(r, dict) and isinstance(r.get("mfu"), float)]
    if not mfus:
        return None, f"no trainer measurement for {gpu} in benchmarks/results"
    return max(mfus), f"the best the trainer measured on one {gpu} ({path.name})"


def time_estimate(
    cfg: Config,
    parameters: int,
    gpus: int,
    tokens: float | None = None,
    mfu: float | None = None,
    gpu: str | None = None,
) -> dict[str, Any]:
    """Steps, FLOPs, wall time and GPU-hours of training `cfg` on `gpus` GPUs for `tokens`
    tokens (default: `train.train_steps` steps) at `mfu` (default: `measured_mfu`, else
    `DEFAULT_MFU`) of `gpu`'s peak (`train.peak_tflops` when set)."""
    gpu = gpu or default_gpu()
    if gpu not in PEAK_TFLOPS:
        raise ValueError(f"gpu={gpu!r}: expected one of {', '.join(PEAK_TFLOPS)}")
    if mfu is not None and not 0 < mfu <= 1:
        raise ValueError(f"mfu={mfu!r}: expected a fraction in (0, 1]")
    peak = cfg.train.peak_tflops or PEAK_TFLOPS[gpu]
    if mfu is not None:
        source = "given"
    else:
        mfu, source = measured_mfu(gpu)
        if mfu is None:
            mfu, source = DEFAULT_MFU, f"assumed: {source}"
    per_step = cfg.train.global_batch_tokens
    steps = math.ceil(tokens / per_step) if tokens else cfg.train.train_steps
    per_token = flops_per_token(cfg, parameters)
    flops = per_token * steps * per_step
    seconds = flops / (gpus * peak * 1e12 * mfu)
    return {
        "tokens_per_step": per_step,
        "steps": steps,
        "tokens": steps * per_step,
        "flops_per_token": per_token,
        "flops": flops,
        "gpus": gpus,
        "gpu": gpu,
        "peak_tflops": peak,
        "mfu": mfu,
        "mfu_source": source,
        "seconds": seconds,
        "gpu_hours": seconds * gpus / 3600,
    }


def _shape_key(cfg: Config, *sections: str) -> str:
    """`cfg` without what changes no count or byte (the name, α₀ values): a sweep's cells
    differ mostly in α₀, so most share a key."""
    tree = cfg.to_dict()
    model = {k: v for k, v in tree["model"].items() if k != "name"}
    model["norm"] = {k: v for k, v in model["norm"].items() if not k.startswith("alpha")}
    return json.dumps([model, cfg.padded_vocab_size, *(tree[s] for s in sections)], sort_keys=True)


def parameter_count(cfg: Config, _cache: dict[str, int] = {}) -> int:  # noqa: B006 - memo
    """The model's parameters, counted on the meta device once per shape."""
    key = _shape_key(cfg)
    if key not in _cache:
        _cache[key] = sum(p.numel() for p in build_meta_model(cfg).parameters())
    return _cache[key]


def sweep_fit(
    cfgs: list[Config], gpus_per_run: int | None = None, gpu_memory: float | None = None
) -> list[tuple[int, dict[str, Any]]]:
    """(position, `fit_check` result) of every run of a sweep that does not fit one GPU, each
    on `gpus_per_run` GPUs (default: its TP × PP); one estimate per distinct shape."""
    seen: dict[str, dict[str, Any]] = {}
    misfits = []
    for i, cfg in enumerate(cfgs):
        gpus = gpus_per_run or cfg.parallel.tensor * cfg.parallel.pipeline
        key = _shape_key(cfg, "parallel", "train") + f"|{gpus}"
        if key not in seen:
            seen[key] = summarize(cfg, gpus=gpus, gpu_memory=gpu_memory)["fit"]
        if not seen[key]["fits"]:
            misfits.append((i, seen[key]))
    return misfits


def sweep_time(
    cfgs: list[Config], gpus_per_run: int | None = None, gpu: str | None = None
) -> dict[str, Any]:
    """Totals of `time_estimate` over a sweep's runs, each on `gpus_per_run` GPUs (default:
    its TP × PP)."""
    rows = [
        time_estimate(
            cfg,
            parameter_count(cfg),
            gpus_per_run or cfg.parallel.tensor * cfg.parallel.pipeline,
            gpu=gpu,
        )
        for cfg in cfgs
    ]
    return {
        "runs": len(rows),
        "tokens": sum(r["tokens"] for r in rows),
        "flops": sum(r["flops"] for r in rows),
        "gpu_hours": sum(r["gpu_hours"] for r in rows),
        "longest_run_seconds": max((r["seconds"] for r in rows), default=0.0),
        "gpu": rows[0]["gpu"] if rows else gpu,
        "mfu": rows[0]["mfu"] if rows else None,
        "mfu_source": rows[0]["mfu_source"] if rows else None,
    }


def format_sweep_time(t: dict[str, Any]) -> str:
    return (
        f"time: {t['runs']} runs, {t['tokens']:.3g} tokens, {t['flops']:.3g} FLOPs in all; at"
        f" {t['mfu']:.0%} MFU ({t['mfu_source']}) of {t['gpu']}: {_gpu_hours(t['gpu_hours'])},"
        f" the longest run {format_duration(t['longest_run_seconds'])}"
    )


def _gpu_hours(hours: float) -> str:
    return f"{hours:,.0f} GPU-hours" if hours >= 10 else f"{hours * 60:,.1f} GPU-minutes"


def format_duration(seconds: float) -> str:
    """`3 d 04:05`, `4:05 h` (hours and minutes) or `12.5 s`."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes = round(seconds / 60)
    days, rest = divmod(minutes, 24 * 60)
    hours, mins = divmod(rest, 60)
    return f"{days} d {hours:02d}:{mins:02d}" if days else f"{hours}:{mins:02d} h"


def format_time(t: dict[str, Any]) -> str:
    return (
        f"time: {t['steps']:,} steps × {t['tokens_per_step']:,} tokens = {t['tokens']:.3g}"
        f" tokens, {t['flops']:.3g} FLOPs ({t['flops_per_token']:.3g} per token)\n"
        f"  at {t['mfu']:.0%} MFU ({t['mfu_source']}) of {t['gpu']}'s {t['peak_tflops']:g}"
        f" TFLOP/s on {t['gpus']} GPUs: {format_duration(t['seconds'])},"
        f" {_gpu_hours(t['gpu_hours'])}"
    )


# ---- does it fit ----------------------------------------------------------------------------


def gpu_memory_gib(override: float | None = None) -> tuple[float, str]:
    """(GiB, where the figure comes from): `override`, else this machine's GPU, else the
    default."""
    if override is not None:
        if not 0 < override < math.inf:
            raise ValueError(f"gpu_memory={override!r}: expected a positive number of GiB")
        return override, "--gpu-memory"
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        return props.total_memory / GIB, props.name
    return DEFAULT_GPU_MEMORY_GIB, "no GPU here: the default; --gpu-memory GIB to change"


def _with(cfg: Config, settings: dict[str, Any]) -> Config:
    """`cfg` with dotted `section.key` settings changed (values already valid)."""
    sections: dict[str, dict[str, Any]] = {}
    for key, value in settings.items():
        section, name = key.split(".")
        sections.setdefault(section, {})[name] = value
    return cfg.model_copy(
        update={s: getattr(cfg, s).model_copy(update=u) for s, u in sections.items()}
    )


def _candidates(cfg: Config, dp: int) -> list[dict[str, Any]]:
    """Single changes that cut memory, cheapest in compute first."""
    p, t = cfg.parallel, cfg.train
    out: list[dict[str, Any]] = []
    order = ["none", "selective", "full"]
    for mode in order[order.index(t.activation_checkpointing) + 1 :]:
        out.append({"train.activation_checkpointing": mode})
    if p.tensor > 1 and p.pipeline == 1 and not p.sequence_parallel:
        out.append({"parallel.sequence_parallel": True})
    if p.pipeline == 1 and dp > 1:
        out += [{"parallel.zero_stage": z} for z in (2, 3) if z > p.zero_stage]
    micro = t.micro_batch_size // 2
    while micro >= 1:
        out.append({"train.micro_batch_size": micro})
        micro //= 2
    if t.activation_checkpointing != "full" and t.micro_batch_size > 1:
        out.append({"train.activation_checkpointing": "full", "train.micro_batch_size": 1})
    return out


def _setting(settings: dict[str, Any]) -> str:
    return " ".join(
        f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in settings.items()
    )


def fit_check(
    cfg: Config,
    stage_params: list[int],
    dp: int,
    block_params: int,
    total_gib: float,
    memory_gib: float,
    source: str,
) -> dict[str, Any]:
    """Whether the estimate fits the GPU, and if not the first single setting that makes it."""
    usable = memory_gib * USABLE_FRACTION
    out: dict[str, Any] = {
        "gpu_memory_gib": round(memory_gib, 2),
        "gpu_memory_source": source,
        "usable_gib": round(usable, 2),
        "fits": total_gib <= usable,
        "suggestion": None,
    }
    gpu = f"{memory_gib:.0f} GiB"
    if out["fits"]:
        out["message"] = f"fits in {gpu}: est. {total_gib:.1f} GiB of the {usable:.1f} GiB usable"
        return out
    for settings in _candidates(cfg, dp):
        est, _ = memory_estimate(_with(cfg, settings), stage_params, dp, block_params)
        if est.total / GIB <= usable:
            out["suggestion"] = _setting(settings)
            out["suggestion_total_gib"] = round(est.total / GIB, 3)
            out["message"] = (
                f"does not fit in {gpu} (est. {total_gib:.1f} GiB, {usable:.1f} usable):"
                f" set {out['suggestion']} (est. {est.total / GIB:.1f} GiB)"
            )
            return out
    out["message"] = (
        f"does not fit in {gpu} (est. {total_gib:.1f} GiB, {usable:.1f} usable), and no single"
        " setting of activation checkpointing, sequence parallelism, ZeRO stage or micro-batch"
        " makes it fit: use more pipeline stages (parallel.pipeline) or tensor parallelism"
    )
    return out


# ---- the summary ----------------------------------------------------------------------------


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


def _local_params(module: nn.Module, tp: int) -> int:
    """Parameters of `module` on one GPU (TP-sharded tensors divided by TP)."""
    from megatron_dyt.parallel import is_sharded

    return sum(p.numel() // tp if is_sharded(p) else p.numel() for p in module.parameters())


def _stage_param_counts(model: nn.Module, cfg: Config) -> list[int]:
    """Parameters held by one GPU of each pipeline stage."""
    tp, pp = cfg.parallel.tensor, cfg.parallel.pipeline
    per_stage = cfg.model.num_layers // pp
    counts = []
    for stage in range(pp):
        blocks = model.layers[stage * per_stage : (stage + 1) * per_stage]
        n = sum(_local_params(b, tp) for b in blocks)
        if stage == 0:
            n += _local_params(model.embedding, tp)
        if stage == pp - 1:
            n += _local_params(model.output, tp)
        counts.append(n)
    return counts


def _block_rows(model: nn.Module) -> list[tuple[str, str, int]]:
    rows = []
    for name, module in model.layers[0].named_children():
        shapes = ", ".join(
            f"{pn}{list(p.shape)}" for pn, p in module.named_parameters(recurse=True)
        )
        rows.append((name, shapes, sum(p.numel() for p in module.parameters())))
    return rows


def summarize(
    cfg: Config,
    gpus: int | None = None,
    gpu_memory: float | None = None,
    tokens: float | None = None,
    mfu: float | None = None,
    gpu: str | None = None,
) -> dict[str, Any]:
    """Everything `info` prints, as one JSON-able dict. `gpu_memory` (GiB) is what the fit
    check compares with; default: this machine's GPU, else `DEFAULT_GPU_MEMORY_GIB`. `tokens`,
    `mfu` and `gpu` are `time_estimate`'s."""
    model = build_meta_model(cfg)
    total = sum(p.numel() for p in model.parameters())
    model_parallel = cfg.parallel.tensor * cfg.parallel.pipeline
    if gpus is None:
        gpus = 8 if 8 % model_parallel == 0 else model_parallel
    dp = data_parallel_size(cfg.parallel, gpus, what=f"--gpus {gpus}")
    stage_params = _stage_param_counts(model, cfg)
    block_params = _local_params(model.layers[0], cfg.parallel.tensor)
    mem, stage = memory_estimate(cfg, stage_params, dp, block_params)
    micro_batches = micro_batches_per_step(cfg, dp)
    memory_gib, source = gpu_memory_gib(gpu_memory)
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
            "precision": "fp32"
            if cfg.train.precision == "fp32"
            else f"bf16 mixed (2+2+12 B/param), gradients summed in {cfg.train.grad_accum_dtype}",
            "micro_batch_size": cfg.train.micro_batch_size,
            "activation_checkpointing": cfg.train.activation_checkpointing,
            "micro_batches_per_step": round(micro_batches, 3),
            "stage": stage,
            "micro_batches_in_flight": in_flight(cfg, stage, micro_batches),
            "gradients_held": mem.gradients_held,
            "norm_saves": norm_saves(m.norm, _act_bytes(cfg)).what,
            "block_activations_gib": round(sum(block_activation_bytes(cfg).values()) / GIB, 4),
        },
        "fit": fit_check(cfg, stage_params, dp, block_params, mem.total / GIB, memory_gib, source),
        "time": time_estimate(cfg, total, gpus, tokens, mfu, gpu),
    }


def format_summary(info: dict[str, Any]) -> str:
    lay, shp, mem = info["layout"], info["shape"], info["memory_per_gpu_gib"]
    ma, fit = info["memory_assumptions"], info["fit"]
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
    held = (
        f"held across the {ma['micro_batches_per_step']:g} micro-batches of a step"
        if ma["gradients_held"]
        else "allocated as the backward frees activations: not at the peak"
    )
    peak = "the backward" if mem["backward"] >= mem["step"] else "the optimizer step"
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
        f"memory per GPU of pipeline stage {ma['stage']}, the heaviest (GiB; {ma['precision']},"
        f" micro-batch {ma['micro_batch_size']}, checkpointing {ma['activation_checkpointing']},"
        f" {ma['micro_batches_in_flight']} in flight):",
        f"  {'weights':<14}{mem['weights']:>8.2f}",
        f"  {'gradients':<14}{mem['gradients']:>8.2f}  {held}",
        f"  {'optimizer':<14}{mem['optimizer']:>8.2f}",
        f"  {'activations':<14}{mem['activations']:>8.2f}  {ma['block_activations_gib']:.3f}"
        f" per block and micro-batch; a norm keeps {ma['norm_saves']}",
        f"  {'logits':<14}{mem['logits']:>8.2f}  the loss's, freed before the reduce bucket comes",
        f"  {'reduce bucket':<14}{mem['reduce_bucket']:>8.2f}  DeepSpeed ZeRO-1/2, in the backward",
        f"  {'buffers':<14}{mem['persistent_buffers']:>8.2f}  RoPE tables (+ ZeRO-3's buckets)",
        f"  {'step buffers':<14}{mem['step_buffers']:>8.2f}  fp32 gradient partition + AdamW's"
        " temporary",
        f"  {'backward':<14}{mem['backward']:>8.2f}  weights + optimizer + gradients held +"
        " activations + max(logits, reduce bucket) + buffers",
        f"  {'step':<14}{mem['step']:>8.2f}  weights + optimizer + step buffers + buffers",
        f"  {'total':<14}{mem['total']:>8.2f}  the peak, in {peak}",
        fit["message"],
        f"  GPU memory {fit['gpu_memory_gib']:g} GiB ({fit['gpu_memory_source']}), of which"
        f" {USABLE_FRACTION:.0%} is counted usable",
        "",
        format_time(info["time"]),
    ]
    return "\n".join(lines)
