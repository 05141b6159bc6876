"""lm-eval 0.4 model class around our model, parallel as trained.

Every rank of the job holds one piece of the model (a TP shard of a pipeline stage). lm-eval sees
only data parallelism: its `rank`/`world_size` are the DP rank/size, so each DP replica scores its
own share of the requests, and the TP/PP peers of a replica run the same requests in the same
order. Activations move stage to stage by send/recv; the last stage turns vocab-parallel logits
into log-probabilities (padding rows of the vocabulary masked out, so scores equal those of the
unpadded model) and broadcasts the results to the other stages.

Request handling follows lm-eval's Hugging Face backend so scores are comparable: left
truncation to the context length, the prefix token for empty contexts, rolling windows for
`loglikelihood_rolling`, greedy `generate_until` with stop sequences. No BOS goes in front of a
context (training data is `doc EOD doc EOD …`, docs/design.md §5); the HF export's tokenizer
adds none either, so lm-eval's `hf` backend on an export scores the same tokens.

The class is registered with lm-eval as `megatron-dyt` when this module is imported, and builds
itself from `--model_args` (`pretrained=RUN_OR_CHECKPOINT,batch_size=8,…`, `MODEL_ARGS`).
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import lm_eval.models  # noqa: F401  lm-eval's own names first: an empty registry would skip them
import torch
import torch.distributed as dist
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from megatron.core import parallel_state as ps
from torch import nn
from tqdm import tqdm

from megatron_dyt.errors import EvalError
from megatron_dyt.model import KVCache, forward_cached
from megatron_dyt.parallel import tp_group

MODEL_NAME = "megatron-dyt"

# What `--model_args` may hold (besides dotted config overrides such as parallel.tensor=1).
MODEL_ARGS = {
    "pretrained": "run folder, its checkpoints/ or a step_* folder (required)",
    "batch_size": "requests per forward pass, or 'auto' (default 8)",
    "max_batch_size": "the largest size 'auto' tries (default 256)",
    "dtype": "auto (the checkpoint's train.precision), float32, bfloat16 or float16",
    "device": "cuda (this rank's GPU; the CPU where there is none) or cpu",
    "max_length": "context length in tokens, at most model.seq_length (the default)",
    "max_gen_toks": "tokens generate_until produces at most (default 256)",
    "trust_remote_code": "accepted and ignored (lm-eval adds it; this model runs no remote code)",
}


@dataclass
class StageInfo:
    """Where this rank's module sits in the pipeline."""

    first: bool
    last: bool
    hidden_size: int
    vocab_size: int  # real (unpadded) vocabulary
    dtype: torch.dtype
    device: torch.device


class ParallelForward:
    """Runs a batch through the pipeline; the last stage's vocab-parallel logits stay local."""

    def __init__(self, module: nn.Module, info: StageInfo):
        self.module = module
        self.info = info
        self.pipeline = ps.get_pipeline_model_parallel_world_size() > 1

    @torch.no_grad()
    def __call__(self, tokens: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor | None:
        """tokens [b, s] on every stage → masked logits [s, b, v/tp] on the last stage, else None.
        With a KV cache (`module` a `LlamaModel` or a `stage_module`) `tokens` are the new
        positions after the ones the cache holds."""
        info = self.info
        b, s = tokens.shape

        def run(x: torch.Tensor) -> torch.Tensor:
            return self.module(x) if cache is None else forward_cached(self.module, x, cache)

        if info.first:
            x = run(tokens.to(info.device))
        else:
            x = torch.empty(s, b, info.hidden_size, dtype=info.dtype, device=info.device)
            dist.recv(x, ps.get_pipeline_model_parallel_prev_rank())
            x = run(x)
        if not info.last:
            dist.send(x.contiguous(), ps.get_pipeline_model_parallel_next_rank())
            return None
        return self._mask_padding(x.float())

    def _mask_padding(self, logits: torch.Tensor) -> torch.Tensor:
        local = logits.shape[-1]
        start = dist.get_rank(tp_group()) * local
        if start + local > self.info.vocab_size:
            logits[..., max(0, self.info.vocab_size - start) :] = float("-inf")
        return logits

    def broadcast(self, value: torch.Tensor) -> torch.Tensor:
        """Send a last-stage tensor to every stage of this pipeline (same shape and dtype)."""
        if self.pipeline:
            dist.broadcast(
                value,
                ps.get_pipeline_model_parallel_last_rank(),
                group=ps.get_pipeline_model_parallel_group(),
            )
        return value


def vocab_parallel_argmax(logits: torch.Tensor) -> torch.Tensor:
    """Global argmax over vocab-parallel logits [..., v/tp]; ties go to the lowest index."""
    group = tp_group()
    size = dist.get_world_size(group)
    values, index = logits.max(dim=-1)
    if size == 1:
        return index
    index = index + dist.get_rank(group) * logits.shape[-1]
    all_values = [torch.empty_like(values) for _ in range(size)]
    all_index = [torch.empty_like(index) for _ in range(size)]
    dist.all_gather(all_values, values.contiguous(), group=group)
    dist.all_gather(all_index, index.contiguous(), group=group)
    stacked = torch.stack(all_values)  # [tp, ...]; argmax picks the first (lowest) rank on ties
    return torch.stack(all_index).gather(0, stacked.argmax(0, keepdim=True)).squeeze(0)


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) from vocab-parallel logits [s, b, v/tp] and targets [s, b]."""
    from megatron.core import tensor_parallel

    return -tensor_parallel.vocab_parallel_cross_entropy(logits, targets)


@register_model(MODEL_NAME)
class MegatronDyTLM(TemplateLM):
    """lm-eval model over this rank's piece of a megatron-dyt model."""

    def __init__(
        self,
        module: nn.Module,
        info: StageInfo,
        tokenizer,
        max_length: int,
        batch_size: int | str = 8,
        max_gen_toks: int = 256,
        max_batch_size: int = 256,
    ):
        super().__init__()
        self.forward = ParallelForward(module, info)
        self.info = info
        self.tok = tokenizer
        self.max_length = max_length
        self.max_gen_toks = max_gen_toks
        self._dp_group = ps.get_data_parallel_group()
        self._rank = ps.get_data_parallel_rank()
        self._world_size = ps.get_data_parallel_world_size()
        self._model_info: dict[str, Any] = {}
        self.batch_size = (
            self._detect_batch_size(max_batch_size) if batch_size == "auto" else int(batch_size)
        )

    # ---- built by lm-eval from --model_args ---------------------------------------------------
    @classmethod
    def create_from_arg_string(
        cls, arg_string: str, additional_config: dict | None = None
    ) -> MegatronDyTLM:
        """`pretrained=runs/demo,batch_size=8` (lm-eval's `simple_evaluate(model_args=str)`)."""
        return cls.from_model_args(lm_utils.simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(
        cls, arg_dict: dict[str, Any], additional_config: dict | None = None
    ) -> MegatronDyTLM:
        """The same as a dict (lm-eval's CLI parses `--model_args` into one)."""
        return cls.from_model_args(dict(arg_dict), additional_config)

    @classmethod
    def from_model_args(
        cls, args: dict[str, Any], additional_config: dict | None = None
    ) -> MegatronDyTLM:
        """Load the checkpoint `pretrained` names, at its layout, and wrap this rank's piece.

        `additional_config` holds what lm-eval's own options give (`--batch_size`, `--device`,
        `--max_batch_size`; its CLI always passes a batch size and a device): a key in
        `--model_args` wins over it.
        """
        from megatron_dyt.inference.load import load_checkpoint

        extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
        args = {**extra, **args}
        overrides = {k: v for k, v in args.items() if "." in k}
        _check_model_args([k for k in args if k not in overrides])
        if not args.get("pretrained"):
            raise EvalError(
                f"model '{MODEL_NAME}' needs pretrained=RUN_DIR_OR_CHECKPOINT in --model_args"
            )
        batch_size = _batch_size(args.get("batch_size", 8))
        max_batch = _positive(args.get("max_batch_size", 256), "max_batch_size")
        max_gen = _positive(args.get("max_gen_toks", 256), "max_gen_toks")
        loaded = load_checkpoint(
            str(args["pretrained"]),
            overrides=overrides,
            dtype=None if args.get("dtype") is None else str(args["dtype"]),
            device=None if args.get("device") is None else str(args["device"]),
        )
        seq = loaded.cfg.model.seq_length
        max_length = _positive(args.get("max_length", seq), "max_length")
        if max_length > seq:
            raise EvalError(
                f"max_length={max_length} is longer than the model's context"
                f" (model.seq_length={seq}); allowed: 1 to {seq}"
            )
        lm = make_lm(
            loaded.module,
            loaded.cfg,
            loaded.tokenizer,
            loaded.device,
            loaded.dtype,
            batch_size,
            max_length=max_length,
            max_gen_toks=max_gen,
            max_batch_size=max_batch,
        )
        par = loaded.cfg.parallel
        lm._model_info = {
            "checkpoint": str(loaded.folder),
            "step": loaded.step,
            "dtype": str(loaded.dtype).removeprefix("torch."),
            "layout": {"tensor": par.tensor, "pipeline": par.pipeline, "data": lm.world_size},
        }
        return lm

    @property
    def batch_sizes(self) -> dict[int, int]:
        """The batch size in use, which lm-eval reports beside its own `--batch_size`."""
        return {0: self.batch_size}

    def get_model_info(self) -> dict[str, Any]:
        """Where the weights came from, for lm-eval's results["config"]."""
        return dict(self._model_info)

    # ---- lm-eval plumbing -----------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tok.eos  # -1 when the tokenizer has none: generation then stops on length

    @property
    def prefix_token_id(self) -> int:
        # Like the HF backend: BOS when the tokenizer has one, else end-of-text.
        return self.tok.bos if self.tok.bos is not None and self.tok.bos >= 0 else self.tok.eos

    @property
    def tokenizer_name(self) -> str:
        return str(self.tok.path)

    @property
    def device(self) -> torch.device:
        return self.info.device

    def tok_encode(
        self, string: str, add_special_tokens: bool | None = None, **kwargs
    ) -> list[int]:
        ids = self.tok.encode(string)
        return [self.prefix_token_id, *ids] if add_special_tokens else ids

    def tok_decode(self, tokens: Sequence[int]) -> str:
        return self.tok.decode(list(tokens))

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(tensor) for _ in range(self._world_size)]
        dist.all_gather(parts, tensor, group=self._dp_group)
        return torch.stack(parts)

    def gather_object(self, obj, dst: int = 0):
        dst_global = dist.get_global_rank(self._dp_group, dst)
        out = [None] * self._world_size if self._rank == dst else None
        dist.gather_object(obj, out, dst=dst_global, group=self._dp_group)
        return out

    def barrier(self) -> None:
        dist.barrier()

    # ---- scoring ------------------------------------------------------------------------------
    def _score_batch(self, batch: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """Sum of continuation log-probs and whether greedy decoding reproduces it, per pair."""
        inputs, spans = [], []
        for context, continuation in batch:
            whole = (context + continuation)[-(self.max_length + 1) :]
            inp = whole[:-1]
            n_cont = len(continuation)  # may be 0 when the tokenizer merges across the boundary
            inputs.append(inp)
            spans.append((len(inp) - n_cont, n_cont, whole[len(whole) - n_cont :]))
        width = max(len(x) for x in inputs)
        tokens = torch.zeros(len(inputs), width, dtype=torch.long)
        targets = torch.zeros(len(inputs), width, dtype=torch.long)
        for i, (inp, (start, n, cont)) in enumerate(zip(inputs, spans, strict=True)):
            tokens[i, : len(inp)] = torch.tensor(inp)  # right padding: earlier positions unaffected
            targets[i, start : start + n] = torch.tensor(cont)
        logits = self.forward(tokens)
        result = torch.zeros(len(inputs), 2, dtype=torch.float64, device=self.info.device)
        if logits is not None:
            t = targets.t().contiguous().to(logits.device)
            greedy = vocab_parallel_argmax(logits).t() == t.t()  # before the CE, which edits logits
            logp = token_logprobs(logits, t).t()  # [b, s]
            for i, (start, n, _) in enumerate(spans):
                result[i, 0] = logp[i, start : start + n].double().sum()
                result[i, 1] = float(bool(greedy[i, start : start + n].all()))
        result = self.forward.broadcast(result).cpu()
        return [(float(r[0]), bool(r[1])) for r in result]

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        # Longest first (as the HF backend), so a too-large batch fails at once.
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i][1] + requests[i][2]))
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        bar = tqdm(
            total=len(requests), disable=disable_tqdm or not _is_rank0(), desc="loglikelihood"
        )
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            scored = self._score_batch([(requests[i][1], requests[i][2]) for i in idx])
            for i, r in zip(idx, scored, strict=True):
                results[i] = r
            bar.update(len(idx))
        bar.close()
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owners = [], []
        for n, (string,) in enumerate(req.args for req in requests):
            for context, pred in map(
                lm_utils.make_disjoint_window,
                lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                ),
            ):
                windows.append((None, context, pred))
                owners.append(n)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for n, (logprob, _) in zip(owners, scores, strict=True):
            totals[n] += logprob
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out = []
        for req in tqdm(requests, disable=disable_tqdm or not _is_rank0(), desc="generate_until"):
            context, kwargs = req.args
            until = kwargs.get("until") or [self.tok.decode([self.eot_token_id])]
            if isinstance(until, str):
                until = [until]
            until = [stop for stop in until if stop]  # an empty stop string stops nothing
            max_gen = int(kwargs.get("max_gen_toks", self.max_gen_toks))
            # an empty context starts from the prefix token, as lm-eval's HF model does
            context_ids = self.tok_encode(context) or [self.prefix_token_id]
            out.append(self._greedy(context_ids, until, max_gen))
        return out

    def _greedy(self, context: list[int], until: list[str], max_gen: int) -> str:
        """Greedy decoding, one full forward per token (no KV cache), stop strings honoured."""
        tokens = (
            context[-(self.max_length - max_gen) :] if max_gen < self.max_length else context[-1:]
        )
        generated: list[int] = []
        for _ in range(max_gen):
            window = (tokens + generated)[-self.max_length :]
            logits = self.forward(torch.tensor([window]))
            nxt = torch.zeros(1, dtype=torch.long, device=self.info.device)
            if logits is not None:
                nxt = vocab_parallel_argmax(logits[-1]).reshape(1)
            nxt = int(self.forward.broadcast(nxt).item())
            if nxt == self.eot_token_id:
                break
            generated.append(nxt)
            text = self.tok.decode(generated)
            if any(stop in text for stop in until):
                break
        text = self.tok.decode(generated)
        for stop in until:
            text = text.split(stop)[0]
        return text

    def _detect_batch_size(self, largest: int = 256) -> int:
        """Largest power of two (≤ `largest`) that runs a full-length batch; CPU or pipelines:
        16 (at most `largest`).

        (Under pipeline parallelism an out-of-memory on one stage would leave its peers waiting
        in send/recv, so the search is not attempted there.)
        """
        if self.info.device.type != "cuda" or self.forward.pipeline:
            return min(16, largest)
        size = 1 << (largest.bit_length() - 1)
        while size > 1:
            try:
                self.forward(torch.zeros(size, self.max_length, dtype=torch.long))
                break
            except torch.cuda.OutOfMemoryError:
                torch.cuda.empty_cache()
                size //= 2
        found = torch.tensor([size], device=self.info.device)
        dist.all_reduce(found, op=dist.ReduceOp.MIN)
        return int(found.item())


def _is_rank0() -> bool:
    return dist.get_rank() == 0


def stage_info(cfg, device: torch.device, dtype: torch.dtype) -> StageInfo:
    """Where this rank's module sits, from megatron-core's process groups."""
    stage = ps.get_pipeline_model_parallel_rank()
    stages = ps.get_pipeline_model_parallel_world_size()
    return StageInfo(
        first=stage == 0,
        last=stage == stages - 1,
        hidden_size=cfg.model.hidden_size,
        vocab_size=cfg.model.vocab_size,
        dtype=dtype,
        device=device,
    )


def _check_model_args(keys: list[str]) -> None:
    unknown = [k for k in keys if k not in MODEL_ARGS]
    if unknown:
        parts = []
        for key in unknown:
            close = difflib.get_close_matches(key, list(MODEL_ARGS), n=1)
            parts.append(f"'{key}'" + (f" (did you mean {close[0]}?)" if close else ""))
        raise EvalError(
            f"unknown --model_args key {', '.join(parts)} for model '{MODEL_NAME}'; allowed:"
            f" {', '.join(MODEL_ARGS)}, and config overrides with dotted keys"
            " (e.g. parallel.tensor=1)"
        )


def _positive(value: Any, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise EvalError(f"{key}={value!r}: expected a positive whole number")
    return value


def _batch_size(value: Any) -> int | str:
    if value == "auto" or (isinstance(value, str) and value.startswith("auto:")):
        return "auto"  # lm-eval's auto:N re-detects N times; one detection serves here
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    try:
        return _positive(value, "batch_size")
    except EvalError:
        raise EvalError(
            f"batch_size={value!r}: expected a positive whole number or 'auto'"
        ) from None


def make_lm(
    module: nn.Module,
    cfg,
    tokenizer,
    device: torch.device,
    dtype: torch.dtype,
    batch_size: int | str,
    *,
    max_length: int | None = None,
    max_gen_toks: int = 256,
    max_batch_size: int = 256,
) -> MegatronDyTLM:
    """The adapter for this rank's module (a `LlamaModel`, a stage, or a DeepSpeed PipelineModule)."""
    info = stage_info(cfg, device, dtype)
    return MegatronDyTLM(
        module,
        info,
        tokenizer,
        max_length or cfg.model.seq_length,
        batch_size=batch_size,
        max_gen_toks=max_gen_toks,
        max_batch_size=max_batch_size,
    )
