"""`megatron-dyt generate`: text from a checkpoint with a KV cache, at its layout or merged.

The prompt runs through the model once (prefill), filling every block's key/value cache; then
each new token runs alone, attending over the cache (`model/kv_cache.py`). Under TP/PP every
rank of the job decodes the same prompt: the stages pass activations on by send/recv, the last
stage picks the next token and broadcasts it to the other stages, and its TP peers pick the same
token (greedy: the vocab-parallel argmax, which all-gathers; sampling: the same gathered logits
and the same seeded CPU generator). Data-parallel replicas repeat the work.

No BOS is put in front of the prompt: training documents are `doc EOS doc EOS …` without one
(docs/design.md §5). Decoding stops at EOS (not returned) or after `max_new_tokens`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_dyt.config import Config
from megatron_dyt.errors import UsageError
from megatron_dyt.eval.adapter import ParallelForward, stage_info, vocab_parallel_argmax
from megatron_dyt.model import KVCache
from megatron_dyt.parallel import tp_group


@dataclass(frozen=True)
class Sampling:
    """How the next token is picked: greedy at temperature 0, else sampled from the
    temperature-scaled distribution cut to its top-p nucleus, with a seeded generator."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise UsageError(f"--temperature {self.temperature}: must be >= 0 (0: greedy decoding)")
        if not (0 < self.top_p <= 1):
            raise UsageError(f"--top-p {self.top_p}: must be in (0, 1] (1: no nucleus cut)")
        if not (0 <= self.seed < 2**63):
            raise UsageError(f"--seed {self.seed}: must be in [0, 2**63)")


@dataclass
class Generation:
    """What one call decoded: the new token ids (EOS not included) and how long it took."""

    prompt: list[int]
    tokens: list[int] = field(default_factory=list)
    stopped_at_eos: bool = False
    prefill_s: float = 0.0
    decode_s: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        """New tokens per second of decoding after the prefill (the first token comes from the
        prefill, so it is not counted)."""
        steps = max(len(self.tokens) - 1 + self.stopped_at_eos, 0)
        return steps / self.decode_s if self.decode_s > 0 else float("nan")


def _gather_vocab(logits: torch.Tensor) -> torch.Tensor:
    """Vocab-parallel [b, v/tp] → the full [b, v] on every TP rank."""
    group = tp_group()
    size = dist.get_world_size(group)
    if size == 1:
        return logits
    parts = [torch.empty_like(logits) for _ in range(size)]
    dist.all_gather(parts, logits.contiguous(), group=group)
    return torch.cat(parts, dim=-1)


def pick_next(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator) -> torch.Tensor:
    """The next token [b] from the last position's masked vocab-parallel logits [b, v/tp]; the
    same on every TP rank."""
    if sampling.temperature == 0:
        return vocab_parallel_argmax(logits)
    full = _gather_vocab(logits).float().cpu() / sampling.temperature
    probs = torch.softmax(full, dim=-1)
    if sampling.top_p < 1:
        ordered, index = probs.sort(dim=-1, descending=True)
        # drop a token when the more likely ones already reach top_p (the first always stays)
        ordered[(ordered.cumsum(-1) - ordered) >= sampling.top_p] = 0
        probs = torch.zeros_like(probs).scatter(-1, index, ordered)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1).to(logits.device)


class Decoder:
    """KV-cached decoding with this rank's piece of the model (a `LlamaModel` or a pipeline
    stage built by `inference.load`)."""

    def __init__(self, module: torch.nn.Module, cfg: Config, device: torch.device, dtype):
        self.forward = ParallelForward(module, stage_info(cfg, device, dtype))
        self.device = device
        self.max_length = cfg.model.seq_length

    def check_length(self, prompt: list[int], max_new_tokens: int) -> None:
        if not prompt:
            raise UsageError(
                "the prompt is empty (no BOS is added: give the text the model should continue)"
            )
        if max_new_tokens < 1:
            raise UsageError(f"--max-new-tokens {max_new_tokens}: must be >= 1")
        if len(prompt) + max_new_tokens > self.max_length:
            raise UsageError(
                f"the prompt's {len(prompt)} tokens + --max-new-tokens {max_new_tokens} ="
                f" {len(prompt) + max_new_tokens} exceed the model's context,"
                f" model.seq_length={self.max_length}; shorten the prompt or lower"
                " --max-new-tokens"
            )

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _step(self, tokens: list[int], cache: KVCache, sampling, generator) -> int:
        """Run the new positions `tokens`; the next token, the same on every rank."""
        logits = self.forward(torch.tensor([tokens], dtype=torch.long), cache)
        nxt = torch.zeros(1, dtype=torch.long, device=self.device)
        if logits is not None:  # the last stage
            nxt = pick_next(logits[-1], sampling, generator)
        return int(self.forward.broadcast(nxt).item())

    @torch.no_grad()
    def generate(
        self,
        prompt: list[int],
        max_new_tokens: int,
        sampling: Sampling = Sampling(),
        eos: int | None = None,
    ) -> Generation:
        """Decode up to `max_new_tokens` after `prompt` (ids); stops at `eos`."""
        self.check_length(prompt, max_new_tokens)
        cache = KVCache(len(prompt) + max_new_tokens)
        generator = torch.Generator().manual_seed(sampling.seed)
        out = Generation(list(prompt))
        self._sync()
        t0 = time.perf_counter()
        nxt = self._step(list(prompt), cache, sampling, generator)
        out.prefill_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        while True:
            if eos is not None and nxt == eos:
                out.stopped_at_eos = True
                break
            out.tokens.append(nxt)
            if len(out.tokens) == max_new_tokens:
                break
            nxt = self._step([nxt], cache, sampling, generator)
        self._sync()
        out.decode_s = time.perf_counter() - t0
        return out


def generate_text(
    checkpoint: str | Path,
    prompt: str,
    *,
    max_new_tokens: int = 64,
    sampling: Sampling = Sampling(),
    overrides: list[str] | tuple[str, ...] = (),
) -> tuple[str, Generation]:
    """Load a checkpoint (`inference.load`) and continue `prompt`; (new text, the generation).
    Every rank of the job calls it and gets the same result."""
    from megatron_dyt.checkpoint import read_tokenizer
    from megatron_dyt.inference.load import inference_config, load_module

    folder, saved, cfg = inference_config(checkpoint, overrides)
    tokenizer = read_tokenizer(folder)  # a clear error when the checkpoint holds none
    ids = tokenizer.encode(prompt)
    loaded = load_module(folder, saved, cfg)
    decoder = Decoder(loaded.module, cfg, loaded.device, loaded.dtype)
    decoder.check_length(ids, max_new_tokens)
    eos = tokenizer.eos if tokenizer.eos is not None and tokenizer.eos >= 0 else None
    result = decoder.generate(ids, max_new_tokens, sampling, eos)
    # ids past the tokenizer's vocabulary (a model vocabulary larger than the tokenizer's) have
    # no text; they are left out of the decoded string, not of `result.tokens`
    known = [t for t in result.tokens if t < tokenizer.vocab_size]
    return tokenizer.decode(known), result
