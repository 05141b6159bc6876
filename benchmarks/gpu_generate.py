"""Generation speed in one run: the Hugging Face export of a DyT model (custom code,
trust_remote_code), a stock `LlamaForCausalLM` of the same shape (the reference), and our own
KV-cached decoder (`megatron-dyt generate`'s), all random-initialised, greedy, batch 1, the same
prompt and number of new tokens.

    python benchmarks/gpu_generate.py OUT_JSON [--tiny] [--new 64] [--prompt-len 32]

Each is warmed up with one short generation first (CUDA context, cuBLAS handles, kernels), then
timed over `--repeats` generations (median); tokens/s = new tokens / wall time, prefill
included. The JSON is rewritten after every measurement, so a run stopped at its time limit
still returns what it measured. `--tiny` swaps in a small fp32 shape so the path runs on a CPU
(tests/test_generate.py); its figures mean nothing.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

TINY = {
    "hidden_size": 64,
    "num_layers": 2,
    "num_heads": 4,
    "num_kv_heads": 2,
    "ffn_hidden_size": 96,
    "vocab_size": 512,
    "seq_length": 128,
}


def _config(tiny: bool):
    from megatron_dyt.config import config_from_dict
    from megatron_dyt.kernels.bench_step import variant_config

    if not tiny:
        return variant_config("1b", "dyt-triton")  # TinyLlama-1.1B shape, DyT, bf16
    norm = {"kind": "dyt", "backend": "torch", "alpha_attn": 0.8, "alpha_mlp": 0.2}
    return config_from_dict(
        {
            "model": {"name": "tiny-gen", "embedding_scale": True, "norm": norm, **TINY},
            "parallel": {"tensor": 1, "pipeline": 1, "zero_stage": 0},
            "train": {"precision": "fp32"},
        }
    )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device, repeats: int) -> tuple[float, Any]:
    """Median seconds of `fn()` over `repeats` calls after one warm-up call; its last result."""
    fn(warmup=True)
    times, out = [], None
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        out = fn(warmup=False)
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def _hf_generate(model, prompt: torch.Tensor, new: int):
    def run(warmup: bool) -> list[int]:
        n = 4 if warmup else new
        out = model.generate(
            prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0
        )
        return out[0, prompt.shape[1] :].tolist()

    return run


def _stock_llama(hf_config: dict[str, Any], dtype: torch.dtype, device: torch.device):
    """`LlamaForCausalLM` of the export's shape, random weights (speed only)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    keys = [
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "vocab_size",
        "max_position_embeddings",
        "rms_norm_eps",
        "rope_theta",
        "rope_parameters",
        "rope_scaling",
        "bos_token_id",
        "eos_token_id",
    ]  # the export's config.json holds the rope keys of transformers 4.x and 5.x
    config = LlamaConfig(**{k: hf_config[k] for k in keys if k in hf_config})
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    return model.eval()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out_json")
    parser.add_argument("--tiny", action="store_true", help="a small fp32 shape, for a CPU")
    parser.add_argument("--new", type=int, default=64, help="new tokens per generation")
    parser.add_argument("--prompt-len", type=int, default=32, help="prompt tokens")
    parser.add_argument("--repeats", type=int, default=3, help="timed generations (median)")
    args = parser.parse_args(argv)

    from transformers import AutoModelForCausalLM

    from megatron_dyt import parallel
    from megatron_dyt.checkpoint import write_checkpoint
    from megatron_dyt.convert.to_hf import export_to_hf
    from megatron_dyt.inference.generate import Decoder
    from megatron_dyt.layout import precision
    from megatron_dyt.model import LlamaModel, full_state_dict, init_weights

    cuda = torch.cuda.is_available()
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    cfg = _config(args.tiny)
    dtype = precision(cfg)
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "shape": "tiny" if args.tiny else "1b",
        "dtype": str(dtype).removeprefix("torch."),
        "prompt_tokens": args.prompt_len,
        "new_tokens": args.new,
        "batch": 1,
        "repeats": args.repeats,
    }
    out = Path(args.out_json)

    def save() -> None:
        out.write_text(json.dumps(report, indent=1) + "\n")

    parallel.init_distributed("nccl" if cuda else "gloo")
    parallel.initialize_model_parallel(cfg.parallel)
    with torch.device(device):
        ours = LlamaModel(cfg)
    init_weights(ours, cfg.model, cfg.train.seed)
    tmp = Path(tempfile.mkdtemp())
    t0 = time.perf_counter()
    full = {k: v.detach().cpu() for k, v in full_state_dict(ours).items()}
    write_checkpoint(full, cfg, tmp / "run", progress=False)
    del full
    hf_dtype = "bf16" if dtype == torch.bfloat16 else "fp32"
    export_to_hf(tmp / "run", tmp / "hf", dtype=hf_dtype, progress=False)
    report["export_s"] = time.perf_counter() - t0
    ours = ours.to(dtype).eval()

    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, cfg.model.vocab_size, (1, args.prompt_len), generator=gen)

    export = AutoModelForCausalLM.from_pretrained(tmp / "hf", trust_remote_code=True, dtype=dtype)
    export = export.to(device).eval()
    report["export_class"] = type(export).__name__
    report["export_attn_implementation"] = export.config._attn_implementation
    seconds, export_tokens = _timed(
        _hf_generate(export, prompt.to(device), args.new), device, args.repeats
    )
    report["export_tokens_per_s"] = args.new / seconds
    save()
    hf_config = json.loads((tmp / "hf" / "config.json").read_text())
    del export

    llama = _stock_llama(hf_config, dtype, device)
    seconds, _ = _timed(_hf_generate(llama, prompt.to(device), args.new), device, args.repeats)
    report["llama_tokens_per_s"] = args.new / seconds
    report["export_vs_llama"] = report["export_tokens_per_s"] / report["llama_tokens_per_s"]
    save()
    del llama

    decoder = Decoder(ours, cfg, device, dtype)
    ids = prompt[0].tolist()

    def ours_run(warmup: bool):
        return decoder.generate(ids, 4 if warmup else args.new)

    seconds, result = _timed(ours_run, device, args.repeats)
    report["ours_tokens_per_s"] = args.new / seconds
    report["ours_decode_tokens_per_s"] = result.tokens_per_s
    report["ours_vs_llama"] = report["ours_tokens_per_s"] / report["llama_tokens_per_s"]
    same = 0
    for a, b in zip(export_tokens, result.tokens, strict=True):
        if a != b:
            break
        same += 1
    report["export_ours_identical_prefix"] = same  # bf16 rounding may part them late
    save()
    shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
