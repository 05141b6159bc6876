"""Typed run configuration: one pydantic tree loaded from YAML, with dotted command-line overrides.

The config is the single source of truth: the model, the parallel layout, the DeepSpeed JSON and
the run folder are all derived from it. Every model forbids unknown keys, so a typo is an error
that names the key and suggests the nearest valid one instead of being silently ignored.
"""

from __future__ import annotations

import difflib
import math
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, model_validator

from megatron_dyt.errors import MegatronDyTError
from megatron_dyt.fileio import read_text


class ConfigError(MegatronDyTError, ValueError):
    """A config that cannot be used; the message names the key, the value and what is allowed."""


def _saved(info: ValidationInfo) -> bool:
    """Validating a saved run's config (to resume, evaluate, export or reshard it): rules added
    after such a run could have been written are notices there, so its checkpoints stay usable."""
    return bool(info.context and info.context.get("saved"))


def accum_error(precision: str, accum: str, zero_stage: int) -> None:
    """Raise ValueError if DeepSpeed 0.19 cannot sum `precision` gradients in `accum`."""
    if accum not in ("fp32", precision):
        raise ValueError(
            f"train.grad_accum_dtype={accum!r} with train.precision={precision!r}: gradients"
            f" are summed in fp32 or in the training dtype ('fp32' or {precision!r})"
        )
    if precision == "bf16" and accum == "fp32" and zero_stage == 0:
        raise ValueError(
            "train.grad_accum_dtype='fp32' with train.precision='bf16' needs"
            " parallel.zero_stage >= 1: DeepSpeed sums bf16 gradients in fp32 only in its ZeRO"
            " and bf16 optimizers (ZeRO-1 costs no more memory than ZeRO-0); or set"
            " train.grad_accum_dtype=bf16"
        )


def _refuse(message: str, info: ValidationInfo) -> None:
    if not _saved(info):
        raise ValueError(message)
    warnings.warn(f"{message} (accepted in a saved run's config)", ConfigNotice, stacklevel=2)


class _Section(BaseModel):
    # No NaN or infinity in any float: a NaN eps or α₀ trains a model of NaNs without an error.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


NormKind = Literal["rmsnorm", "layernorm", "dyt", "derf"]
Squash = Literal["tanh", "hardtanh", "sigmoid", "identity"]
NormSite = Literal["attention", "mlp", "final"]
NormBackend = Literal["torch", "triton"]
Recompute = Literal["none", "selective", "full"]


class NormConfig(_Section):
    """Which normalization every site of the model gets (docs/design.md §1)."""

    kind: NormKind = Field(
        "rmsnorm",
        description="The norm at every site: rmsnorm, layernorm, dyt (γ·f(α·x)+β) or derf"
        " (γ·erf(α·x+s)+β).",
    )
    alpha_attn: float = Field(
        0.5, description="DyT/Derf initial α (α₀, > 0) of the norm in front of attention: α₀ᵃᵗᵗⁿ."
    )
    alpha_mlp: float = Field(
        0.5, description="DyT/Derf α₀ (> 0) of the norm in front of the FFN: the paper's α₀ᵒᵗʰᵉʳ."
    )
    alpha_final: float = Field(
        0.5, description="DyT/Derf α₀ (> 0) of the final norm, before the output head: α₀ᵒᵗʰᵉʳ too."
    )
    beta: bool = Field(
        True, description="DyT/Derf per-channel shift β; the paper drops it for LLaMA."
    )
    learnable_alpha: bool = Field(
        True, description="Train DyT/Derf α; false keeps it at α₀, with no optimizer state."
    )
    squash: Squash = Field(
        "tanh",
        description="DyT's squashing function f, the paper's ablation (identity is expected to"
        " diverge); DyT only.",
    )
    derf_shift: float = Field(0.0, description="Derf's learnable shift s: its initial value s₀.")
    eps: float = Field(1e-5, description="RMSNorm/LayerNorm epsilon (> 0), added to the variance.")
    backend: NormBackend = Field(
        "triton",
        description="DyT/Derf implementation: triton (fused kernels on CUDA; on CPU the torch"
        " reference, with a notice) or torch (the reference).",
    )

    def alpha(self, site: NormSite) -> float:
        return {"attention": self.alpha_attn, "mlp": self.alpha_mlp, "final": self.alpha_final}[
            site
        ]

    @model_validator(mode="after")
    def _check(self, info: ValidationInfo) -> NormConfig:
        for key in ("alpha_attn", "alpha_mlp", "alpha_final"):
            value = getattr(self, key)
            if not (value > 0 and math.isfinite(value)):
                raise ValueError(f"{key}={value!r}: α₀ must be a finite number > 0")
        if self.kind == "derf" and self.squash != "tanh":
            raise ValueError(
                f"squash={self.squash!r} applies to kind 'dyt' only; Derf always squashes with erf"
            )
        if self.kind in ("rmsnorm", "layernorm") and self.squash != "tanh":
            _refuse(
                f"squash={self.squash!r} applies to kind 'dyt' only, not {self.kind!r}, which"
                " has no squashing function",
                info,
            )
        if self.eps <= 0:
            raise ValueError(f"eps={self.eps!r}: must be > 0")
        return self


class InitConfig(_Section):
    """How the weights are initialised (megatron_dyt/model/init.py)."""

    std: float = Field(
        0.02, gt=0, description="Standard deviation of the normal init of every weight matrix."
    )
    scaled_output_init: bool = Field(
        True,
        description="Attention and MLP output projections get std / √(2·num_layers)"
        " (GPT-2 / Megatron).",
    )
    layout_invariant: bool = Field(
        True,
        description="Draw every weight from seeds of its canonical name (slab by slab, each"
        " rank only its own shard): the same model at any TP/PP layout. false: seeds also"
        " depend on the TP rank, so the model depends on the layout.",
    )


RopeScalingType = Literal["none", "llama3"]


class RopeScalingConfig(_Section):
    """How RoPE's inverse frequencies are rescaled for long context (docs/design.md §12).

    llama3 (Llama 3.1 / 3.2): frequencies whose wavelength exceeds
    original_max_position_embeddings / low_freq_factor are divided by factor, those shorter than
    original_max_position_embeddings / high_freq_factor are kept, and the band between is
    interpolated. The other keys apply to llama3 only; the defaults are Llama 3.1's.
    """

    type: RopeScalingType = Field(
        "none", description="none (plain RoPE) or llama3 (Llama 3.1's frequency rescaling)."
    )
    factor: float = Field(
        8.0, ge=1, description="llama3: long wavelengths are divided by this (context extension)."
    )
    low_freq_factor: float = Field(
        1.0,
        gt=0,
        description="llama3: wavelengths above original_max_position_embeddings / this are"
        " divided by factor.",
    )
    high_freq_factor: float = Field(
        4.0,
        gt=0,
        description="llama3: wavelengths below original_max_position_embeddings / this are kept;"
        " must be > low_freq_factor.",
    )
    original_max_position_embeddings: int = Field(
        8192, gt=0, description="llama3: the context length of the model's original pretraining."
    )

    @model_validator(mode="after")
    def _check(self) -> RopeScalingConfig:
        if self.type == "llama3" and self.high_freq_factor <= self.low_freq_factor:
            raise ValueError(
                f"high_freq_factor={self.high_freq_factor} must be > low_freq_factor="
                f"{self.low_freq_factor} (the band between them is interpolated)"
            )
        return self


class ModelConfig(_Section):
    """The LLaMA model: its shape, vocabulary, positions, attention, norms and init."""

    name: str = Field(
        "llama", description="The model's name in run summaries, reports and SLURM job names."
    )
    hidden_size: int = Field(4096, gt=0, description="Width d of the residual stream.")
    num_layers: int = Field(32, gt=0, description="Number of transformer blocks.")
    num_heads: int = Field(32, gt=0, description="Attention (query) heads per block.")
    num_kv_heads: int | None = Field(
        None,
        gt=0,
        description="Key/value heads for grouped-query attention; null: num_heads (no GQA).",
    )
    ffn_hidden_size: int = Field(11008, gt=0, description="Inner width of the SwiGLU FFN.")
    vocab_size: int = Field(32000, gt=0, description="Tokenizer vocabulary size.")
    make_vocab_size_divisible_by: int = Field(
        128,
        gt=0,
        description="The embedding table and output head are padded to a multiple of"
        " lcm(this, parallel.tensor) rows.",
    )
    seq_length: int = Field(4096, gt=0, description="Training sequence length in tokens.")
    rope_theta: float = Field(10000.0, gt=0, description="RoPE base frequency θ.")
    embedding_scale: bool = Field(
        False,
        description="A learnable scalar multiplies the token embeddings, initialised to √d"
        " (the DyT paper's LLaMA recipe).",
    )
    attention_backend: Literal["auto", "sdpa", "flash"] = Field(
        "auto",
        description="auto: flash-attn on CUDA in bf16/fp16 when installed, else PyTorch SDPA;"
        " sdpa or flash to force one.",
    )
    rope_scaling: RopeScalingConfig = Field(
        default_factory=RopeScalingConfig,
        description="RoPE frequency rescaling for long context: none, or llama3 (Llama 3.1+).",
    )
    norm: NormConfig = Field(default_factory=NormConfig, description=NormConfig.__doc__)
    init: InitConfig = Field(default_factory=InitConfig, description=InitConfig.__doc__)

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}"
            )
        if self.num_heads % self.kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} is not divisible by num_kv_heads={self.kv_heads}"
                " (grouped-query attention needs whole groups)"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for RoPE")
        return self


class ParallelConfig(_Section):
    """How the model is split over GPUs; data parallelism takes the remaining processes."""

    tensor: int = Field(1, ge=1, description="Tensor-parallel size (TP): ranks sharing each layer.")
    pipeline: int = Field(
        1, ge=1, description="Pipeline-parallel size (PP): stages with equal numbers of blocks."
    )
    sequence_parallel: bool = Field(
        False,
        description="Split the activations outside tensor-parallel layers (norms, residuals)"
        " along the sequence over the TP ranks; needs tensor > 1 and CUDA.",
    )
    zero_stage: Literal[0, 1, 2, 3] = Field(
        1,
        description="DeepSpeed ZeRO stage: 0 off, 1 partitions the optimizer state, 2 the"
        " gradients too, 3 the parameters too; 2 and 3 need pipeline 1.",
    )
    zero3_param_persistence_threshold: int = Field(
        100_000,
        ge=0,
        description="ZeRO-3 keeps parameters with fewer elements than this unpartitioned"
        " (DeepSpeed's default).",
    )
    overlap_comm: bool = Field(
        True,
        description="ZeRO 1-3: reduce each full gradient bucket on a side stream while the"
        " backward goes on (DeepSpeed's overlap_comm); holds two reduce buckets instead of one.",
    )
    contiguous_gradients: bool = Field(
        True,
        description="ZeRO 1-3: copy gradients into one contiguous buffer as they are reduced"
        " (less fragmentation, DeepSpeed's default).",
    )
    reduce_bucket_size: int = Field(
        200_000_000,
        ge=1,
        description="ZeRO 1-3: gradient elements reduced in one collective. Larger buckets use"
        " the network better and hold more memory (info counts them).",
    )
    allgather_bucket_size: int = Field(
        200_000_000,
        ge=1,
        description="ZeRO 1-2: updated parameter elements all-gathered in one collective after"
        " the optimizer step.",
    )


class TrainConfig(_Section):
    """The optimizer, lr schedule, batch, precision, checkpoints and logging of a run."""

    # < 2**32: numpy's and megatron's seeds are 32-bit
    seed: int = Field(
        1234, ge=0, lt=2**32, description="Seed of the weight init, torch and the data order."
    )
    micro_batch_size: int = Field(
        1, ge=1, description="Sequences per forward/backward pass on each data-parallel rank."
    )
    global_batch_tokens: int = Field(
        4 * 1024 * 1024,
        ge=1,
        description="Tokens per optimizer step; a whole number of sequences, divisible by"
        " micro_batch_size × data-parallel size.",
    )
    train_steps: int = Field(50000, ge=1, description="Optimizer steps in the run.")
    lr: float = Field(3e-4, gt=0, description="Peak learning rate, reached at the end of warm-up.")
    min_lr_ratio: float = Field(
        0.1, ge=0, le=1, description="The cosine decay ends at this fraction of lr."
    )
    warmup_steps: int | None = Field(
        None,
        ge=0,
        description="Steps of quadratic lr warm-up; null: min(2000, train_steps // 20).",
    )
    weight_decay: float = Field(0.1, ge=0, description="AdamW weight decay.")
    weight_decay_policy: Literal["all", "matrices"] = Field(
        "all",
        description="all: decay every parameter, α, γ and the embedding scale included (the DyT"
        " paper); matrices: no decay on vectors and scalars (Megatron's habit).",
    )
    dyt_lr_multiplier: float = Field(
        1.0,
        gt=0,
        description="lr multiplier for the DyT/Derf α and s and the embedding scale.",
    )
    adam_beta1: float = Field(0.9, ge=0, lt=1, description="AdamW β₁.")
    adam_beta2: float = Field(0.95, ge=0, lt=1, description="AdamW β₂.")
    adam_eps: float = Field(1e-8, gt=0, description="AdamW ε.")
    grad_clip: float = Field(
        1.0, ge=0, description="Clip the global gradient norm to this (0: no clipping)."
    )
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto",
        description="Training precision; auto: bf16 on GPU, fp32 on CPU. fp16 only with"
        " rmsnorm/layernorm (DyT/Derf's dα overflows it).",
    )
    grad_accum_dtype: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32",
        description="Dtype gradients are summed in over micro-batches when training in bf16 or"
        " fp16 (DeepSpeed's data_types.grad_accum_dtype). fp32, as Megatron does: a bf16 sum of"
        " 128 micro-batches loses the small gradients of α and the embedding scale. bf16/fp16"
        " must equal train.precision.",
    )
    activation_checkpointing: Recompute = Field(
        "none",
        description="Recompute activations in backward: selective (the attention core) or full"
        " (whole blocks), to save memory.",
    )
    compile: Literal["auto", "blocks", "none"] = Field(
        "auto",
        description="torch.compile each transformer block (fullgraph, Inductor) inside the"
        " DeepSpeed engine: blocks: always; none: never; auto: on CUDA only (on CPU a short run"
        " would spend longer compiling than it saves).",
    )
    log_interval: int = Field(
        1,
        ge=1,
        description="Steps between the loss, lr and throughput records of metrics.jsonl and"
        " TensorBoard (the norm statistics: stats_interval).",
    )
    stats_interval: int = Field(
        100,
        ge=1,
        description="Steps between the norm statistics (per norm layer: α, input std, saturated"
        " fraction |α·x| > 2), and at the last step; each costs one all_reduce.",
    )
    save_interval: int = Field(
        1000, ge=0, description="Steps between checkpoints (0: only at the end)."
    )
    save_interval_minutes: float | None = Field(
        None,
        gt=0,
        description="Also save when this many minutes have passed since the last save (rank"
        " 0's clock), so a crash or a pre-emption loses at most that much; null: by steps only.",
    )
    keep_checkpoints: int = Field(3, ge=1, description="The newest K checkpoints are kept.")
    eval_interval: int = Field(
        1000, ge=0, description="Steps between validation losses (0: never)."
    )
    eval_samples: int = Field(64, ge=1, description="Validation sequences per evaluation.")
    skip_nonfinite_steps: int = Field(
        0,
        ge=0,
        description="Steps with a NaN/Inf loss that may be survived by rewinding to the last"
        " checkpoint and leaving that step's batch out; 0: stop at the first one.",
    )
    peak_tflops: float | None = Field(
        None,
        gt=0,
        description="Per-GPU peak TFLOP/s for MFU; null: known GPUs' dense bf16 peak.",
    )
    wandb_project: str | None = Field(
        None, description="Also log to this Weights & Biases project (if wandb is installed)."
    )
    wandb_entity: str | None = Field(
        None, description="The W&B team or user the run is logged under (null: wandb's default)."
    )
    wandb_name: str | None = Field(
        None, description="The W&B run's display name (null: the run folder's name)."
    )
    wandb_group: str | None = Field(
        None, description="The W&B group (a sweep's runs get the sweep's name when null)."
    )
    wandb_tags: list[str] = Field(default_factory=list, description="W&B tags of the run.")
    init_from: str | None = Field(
        None,
        description="Start from these weights: a checkpoint of ours (a run folder, its"
        " checkpoints/ or a step_* folder, saved at any TP/PP/ZeRO layout) or a Hugging Face"
        " LLaMA folder; resharded to this run's layout, with a fresh optimizer, lr schedule and"
        " data position (step 0). Only for a fresh run: a run folder with a checkpoint resumes"
        " from it and ignores this.",
    )
    init_from_convert_norms: bool = Field(
        False,
        description="init_from holds an RMSNorm model and model.norm.kind is dyt or derf: keep"
        " its γ, set α = α₀ of each site (β = 0, s = s₀) and a missing embedding scale to 1.0,"
        " as `convert from-hf --norm` does.",
    )

    @model_validator(mode="after")
    def _check_init_from(self) -> TrainConfig:
        if self.init_from_convert_norms and not self.init_from:
            raise ValueError(
                "init_from_convert_norms=true needs init_from (the weights to convert)"
            )
        return self


class DataConfig(_Section):
    """Where training text comes from. `demo: true` uses the embedded corpus (no download)."""

    demo: bool = Field(
        False,
        description="Train on the embedded demo corpus with its own tokenizer (no download).",
    )
    tokenizer: str | None = Field(
        None,
        description="sentencepiece .model, Hugging Face tokenizer.json, or a folder holding"
        " either; the demo builds its own.",
    )
    paths: list[str] = Field(
        default_factory=list,
        description="Indexed-dataset prefixes (without .bin/.idx), e.g. from `megatron-dyt data"
        " preprocess`.",
    )
    weights: list[float] | None = Field(
        None,
        description="Blend weights, one per path; null: proportional to each dataset's size.",
    )
    split: str = Field(
        "98,2,0", description="train,valid,test shares of every dataset, e.g. '98,2,0'."
    )
    cache_dir: str = Field(
        ".cache/megatron-dyt",
        description="Folder for the demo corpus, its tokenizer and the dataset index caches.",
    )

    @model_validator(mode="after")
    def _check(self, info: ValidationInfo) -> DataConfig:
        given = [k for k in ("paths", "tokenizer", "weights") if getattr(self, k)]
        if self.demo and given:
            _refuse(
                f"demo=true trains on the embedded demo corpus, but {' and '.join(given)}"
                " given too; set data.demo=false to train on them",
                info,
            )
        if self.weights is not None:
            if len(self.weights) != len(self.paths):
                raise ValueError(
                    f"weights has {len(self.weights)} entries but paths has {len(self.paths)};"
                    " give one weight per path"
                )
            if any(w < 0 for w in self.weights) or not any(w > 0 for w in self.weights):
                raise ValueError(f"weights={self.weights}: must be >= 0 with at least one > 0")
        parts = self.split.split(",")
        try:
            shares = [float(p) for p in parts]
        except ValueError:
            shares = []
        if len(shares) != 3 or any(not (x >= 0 and math.isfinite(x)) for x in shares):
            raise ValueError(
                f"split={self.split!r}: expected three non-negative numbers 'train,valid,test'"
                " such as '98,2,0'"
            )
        if shares[0] <= 0:
            raise ValueError(f"split={self.split!r}: the train share (the first) must be > 0")
        return self


class EvalConfig(_Section):
    """Zero-shot evaluation during training (`megatron-dyt eval` takes its own options)."""

    suite: str = Field(
        "quick",
        description="lm-eval task suite: paper15, quick or offline (megatron_dyt/eval/suites.py).",
    )
    every_n_steps: int = Field(
        0, ge=0, description="Steps between zero-shot evaluations (0: never during training)."
    )
    batch_size: int = Field(8, ge=1, description="Requests per forward pass.")
    limit: int | None = Field(
        None, ge=1, description="At most this many documents per task; null: all."
    )


class ResumeConfig(_Section):
    """How a run folder's latest checkpoint is resumed (not part of the run's identity)."""

    reshard: bool = Field(
        False,
        description="Resume a checkpoint saved at another TP/PP/DP/ZeRO layout: weights, Adam"
        " moments and step are converted to this run's layout while loading (megatron_dyt/checkpoint/universal.py).",
    )


class Config(_Section):
    """A whole run: the model, its parallel layout, training, data and evaluation."""

    model: ModelConfig = Field(default_factory=ModelConfig, description=ModelConfig.__doc__)
    parallel: ParallelConfig = Field(
        default_factory=ParallelConfig, description=ParallelConfig.__doc__
    )
    train: TrainConfig = Field(default_factory=TrainConfig, description=TrainConfig.__doc__)
    data: DataConfig = Field(default_factory=DataConfig, description=DataConfig.__doc__)
    eval: EvalConfig = Field(default_factory=EvalConfig, description=EvalConfig.__doc__)
    resume: ResumeConfig = Field(default_factory=ResumeConfig, description=ResumeConfig.__doc__)

    @model_validator(mode="after")
    def _check_layout(self, info: ValidationInfo) -> Config:
        m, p = self.model, self.parallel
        if m.num_heads % p.tensor:
            raise ValueError(
                f"model.num_heads={m.num_heads} is not divisible by parallel.tensor={p.tensor};"
                " every tensor-parallel rank needs whole attention heads"
            )
        if m.kv_heads % p.tensor:
            raise ValueError(
                f"model.num_kv_heads={m.kv_heads} is not divisible by parallel.tensor={p.tensor};"
                " every tensor-parallel rank needs whole key/value heads"
            )
        if m.ffn_hidden_size % p.tensor:
            raise ValueError(
                f"model.ffn_hidden_size={m.ffn_hidden_size} is not divisible by"
                f" parallel.tensor={p.tensor}"
            )
        if m.num_layers % p.pipeline:
            raise ValueError(
                f"model.num_layers={m.num_layers} is not divisible by parallel.pipeline={p.pipeline};"
                " every pipeline stage needs the same number of blocks"
            )
        if p.pipeline > 1 and p.zero_stage > 1:
            raise ValueError(
                f"parallel.zero_stage={p.zero_stage} cannot be combined with"
                f" parallel.pipeline={p.pipeline}: DeepSpeed's pipeline engine supports ZeRO"
                " stage 0 or 1 only (use zero_stage 0/1, or pipeline 1 for ZeRO-2/3)"
            )
        if p.sequence_parallel and p.tensor == 1:
            raise ValueError(
                "parallel.sequence_parallel=true needs parallel.tensor > 1 (it splits the"
                " sequence over the tensor-parallel ranks)"
            )
        if p.sequence_parallel and p.pipeline > 1:
            _refuse(
                f"parallel.sequence_parallel=true cannot be combined with parallel.pipeline="
                f"{p.pipeline}: DeepSpeed's pipeline engine splits each stage's output over the"
                " tensor-parallel ranks and gathers it again on the next stage, assuming every"
                " rank holds the same activation, which sequence parallelism breaks (each rank"
                " holds its own part of the sequence); use sequence_parallel=false with"
                " pipeline > 1, or pipeline=1 with sequence parallelism",
                info,
            )
        t = self.train
        if t.precision in ("bf16", "fp16", "fp32"):
            accum_error(t.precision, t.grad_accum_dtype, p.zero_stage)
        if p.sequence_parallel and m.seq_length % p.tensor:
            raise ValueError(
                f"model.seq_length={m.seq_length} is not divisible by parallel.tensor={p.tensor};"
                " sequence parallelism gives every tensor-parallel rank an equal part of it"
            )
        return self

    @model_validator(mode="after")
    def _check_init_from(self) -> Config:
        kind = self.model.norm.kind
        if self.train.init_from_convert_norms and kind not in ("dyt", "derf"):
            raise ValueError(
                f"train.init_from_convert_norms=true turns RMSNorms into DyT or Derf, but"
                f" model.norm.kind={kind!r}; allowed: 'dyt', 'derf' (or set it false)"
            )
        return self

    @model_validator(mode="after")
    def _check_precision(self, info: ValidationInfo) -> Config:
        kind = self.model.norm.kind
        if self.train.precision == "fp16" and kind in ("dyt", "derf"):
            # docs/design.md §7: dα (and Derf's ds) sum over every element of an activation, and
            # DeepSpeed's fp16 parameters hold them in fp16.
            _refuse(
                f"train.precision='fp16' cannot be combined with model.norm.kind={kind!r}: the"
                " gradient of α (and of Derf's shift) sums over every element of an activation,"
                " which overflows fp16, and DeepSpeed's dynamic loss scaling then skips steps"
                " that the trainer still counts; use train.precision bf16 or fp32 (auto: bf16 on"
                " a GPU) with dyt/derf, or fp16 with rmsnorm/layernorm",
                info,
            )
        return self

    # ---- derived values -------------------------------------------------------------------
    @property
    def padded_vocab_size(self) -> int:
        """Vocab rounded up so each TP rank holds an equal, aligned slice (megatron-core needs it)."""
        multiple = math.lcm(self.model.make_vocab_size_divisible_by, self.parallel.tensor)
        return -(-self.model.vocab_size // multiple) * multiple

    @property
    def warmup_steps(self) -> int:
        t = self.train
        return t.warmup_steps if t.warmup_steps is not None else min(2000, t.train_steps // 20)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None)


# ---- loading --------------------------------------------------------------------------------


def _known_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        path = f"{prefix}{name}"
        keys.append(path)
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys.extend(_known_keys(ann, path + "."))
    return keys


def _suggest(key: str) -> str:
    known = _known_keys(Config)
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    if not close:  # a typo in the last part only: compare leaf names within the same section
        parent, _, leaf = key.rpartition(".")
        siblings = [k.rpartition(".")[2] for k in known if k.rpartition(".")[0] == parent]
        leaf_match = difflib.get_close_matches(leaf, siblings, n=1, cutoff=0.5)
        close = [f"{parent}.{leaf_match[0]}" if parent else leaf_match[0]] if leaf_match else []
    return f" (did you mean '{close[0]}'?)" if close else ""


def _format_error(exc: ValidationError, source: str) -> str:
    lines = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden" and key == "base":
            lines.append(
                "key 'base' was not resolved: only config files read by load_config or"
                " load_tree inherit from a base"
            )
        elif err["type"] == "extra_forbidden":
            lines.append(f"unknown key '{key}'{_suggest(key)}")
        elif err["type"] == "value_error":
            lines.append(f"{key + ': ' if key else ''}{msg}")
        else:
            lines.append(f"{key}={err.get('input')!r}: {msg}")
    return f"invalid config {source}:\n  " + "\n  ".join(lines)


def apply_overrides(
    tree: dict[str, Any], overrides: Iterable[str] | Mapping[str, Any]
) -> dict[str, Any]:
    """Set dotted keys in a config tree (a plain dict, before validation), in place; returns it.

    `overrides` is either `KEY=VALUE` texts (the command line: VALUE is YAML) or a mapping of
    dotted keys to values (a sweep's axes). Every key is checked against the config's schema, so a
    typo fails here with the nearest valid key; values are checked when the tree is validated.
    """
    items = (
        [(key, value, f"{key}={value}") for key, value in overrides.items()]
        if isinstance(overrides, Mapping)
        else [(*_split(text), text) for text in overrides]
    )
    for key, value, text in items:
        _set_key(tree, str(key).split("."), value, text)
    return tree


def _split(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not KEY=VALUE (e.g. model.norm.alpha_attn=0.5)")
    key, _, raw = text.partition("=")
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key; use dotted keys like train.lr=1e-4")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({exc.problem})") from None
    return key, value


def _set_key(tree: dict[str, Any], path: list[str], value: Any, text: str) -> None:
    model: type[BaseModel] | None = Config
    node = tree
    for i, part in enumerate(path):
        dotted = ".".join(path[: i + 1])
        if model is None or part not in model.model_fields:
            raise ConfigError(f"override {text!r}: unknown key '{dotted}'{_suggest(dotted)}")
        ann = model.model_fields[part].annotation
        is_section = isinstance(ann, type) and issubclass(ann, BaseModel)
        if i == len(path) - 1:
            if is_section:
                raise ConfigError(
                    f"override {text!r}: '{dotted}' is a section; set one of its keys"
                )
            node[part] = value
            return
        if not is_section:
            raise ConfigError(f"override {text!r}: '{dotted}' is a value, not a section")
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"'{dotted}' must be a mapping, got {child!r}")
        node, model = child, ann


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    *,
    saved: bool = False,
) -> Config:
    """Load a YAML config (or the defaults), resolving its `base:` chain (see `load_tree`), and
    apply `a.b.c=value` overrides; `saved`: a run's own config.yaml, read back (see `_saved`)."""
    tree: dict[str, Any] = {}
    source = "(defaults)"
    if path is not None:
        source = str(path)
        tree = load_tree(path)
    apply_overrides(tree, overrides)
    return config_from_dict(tree, source, saved=saved)


def load_tree(path: str | Path) -> dict[str, Any]:
    """The unvalidated tree a config file describes, its `base:` chain merged in.

    A file's top-level `base: PATH` (relative to that file) names the config it builds on: the
    file's tree is deep-merged over the base's (mappings key by key, other values replaced), and
    bases may have bases. Public so that other loaders (sweep specs) resolve bases the same way;
    the result holds no `base` key.
    """
    return _load_chain(Path(path), [])


def _load_chain(path: Path, chain: list[Path]) -> dict[str, Any]:
    """`chain`: the files that named this one as their base, outermost first."""
    what = f"base config '{path}' (named in '{chain[-1]}')" if chain else f"config file '{path}'"
    if not path.is_file():
        raise ConfigError(f"{what} does not exist")
    if any(path.resolve() == seen.resolve() for seen in chain):
        cycle = " -> ".join(str(p) for p in [*chain, path])
        raise ConfigError(f"config bases form a cycle: {cycle}")
    try:
        tree = yaml.safe_load(read_text(path, "config file")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{what} is not valid YAML: {exc}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{what} must hold a mapping, got {type(tree).__name__}")
    base = tree.pop("base", None)
    if base is None:
        return tree
    if not isinstance(base, str) or not base.strip():
        raise ConfigError(f"{what}: 'base' must be the path of a config file, got {base!r}")
    return _deep_merge(_load_chain(path.parent / base, [*chain, path]), tree)


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """`over` on top of `base`: mappings merged key by key, any other value replaced."""
    merged = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def config_from_dict(
    tree: dict[str, Any], source: str = "(dict)", *, saved: bool = False
) -> Config:
    try:
        cfg = Config.model_validate(tree, context={"saved": saved})
    except ValidationError as exc:
        raise ConfigError(_format_error(exc, source)) from None
    if cfg.padded_vocab_size != cfg.model.vocab_size:
        warnings.warn(
            f"model.vocab_size={cfg.model.vocab_size} padded to {cfg.padded_vocab_size} (a multiple"
            f" of lcm(model.make_vocab_size_divisible_by={cfg.model.make_vocab_size_divisible_by},"
            f" parallel.tensor={cfg.parallel.tensor})); the extra rows match no token",
            VocabPaddedWarning,
            stacklevel=2,
        )
    if cfg.warmup_steps > cfg.train.train_steps:  # a smoke test may mean it: not an error
        warnings.warn(
            f"train.warmup_steps={cfg.warmup_steps} is more than train.train_steps="
            f"{cfg.train.train_steps}: the run ends in warm-up and never reaches train.lr",
            ScheduleWarning,
            stacklevel=2,
        )
    return cfg


class VocabPaddedWarning(UserWarning):
    """The vocabulary was padded for tensor parallelism."""


class ConfigNotice(UserWarning):
    """A saved run's config breaks a rule that new configs must follow."""


class ScheduleWarning(UserWarning):
    """The lr schedule will not run as the config's numbers suggest."""
