"""GPU check of the Hugging Face export: a 1.1B DyT model → `convert to-hf --dtype bf16` →
`transformers` (custom code, trust_remote_code) generating on the GPU in bf16, compared with
our own model's greedy decoding of the same prompt.

    python benchmarks/gpu_hf_check.py OUT_JSON

The weights are a seeded random init (no trained 1B checkpoint exists here): what is checked is
that the export loads and generates in bf16 and agrees with our model, not the text.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import torch


def main(out_json: str) -> int:
    from transformers import AutoModelForCausalLM

    from megatron_dyt import parallel
    from megatron_dyt.checkpoint import write_checkpoint
    from megatron_dyt.convert.to_hf import export_to_hf
    from megatron_dyt.kernels.bench_step import variant_config
    from megatron_dyt.model import LlamaModel, full_state_dict, init_weights

    report: dict = {"device": torch.cuda.get_device_name()}
    cfg = variant_config("1b", "dyt-triton")
    parallel.init_distributed("nccl")
    parallel.initialize_model_parallel(cfg.parallel)
    with torch.device("cuda"):
        ours = LlamaModel(cfg)
    init_weights(ours, cfg.model, cfg.train.seed)
    tmp = Path(tempfile.mkdtemp())
    t0 = time.perf_counter()
    full = {k: v.detach().cpu() for k, v in full_state_dict(ours).items()}
    write_checkpoint(full, cfg, tmp / "run", progress=False)
    del full
    export_to_hf(tmp / "run", tmp / "hf", dtype="bf16", progress=False)
    report["export_s"] = time.perf_counter() - t0
    report["export_files"] = sorted(p.name for p in (tmp / "hf").iterdir())

    hf = AutoModelForCausalLM.from_pretrained(
        tmp / "hf", trust_remote_code=True, torch_dtype=torch.bfloat16
    ).cuda()
    report["hf_class"] = type(hf).__name__
    report["hf_parameters"] = sum(p.numel() for p in hf.parameters())
    ours.to(torch.bfloat16).eval()

    torch.manual_seed(0)
    prompt = torch.randint(3, cfg.model.vocab_size, (2, 16), device="cuda")
    new = 32
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    generated = hf.generate(prompt, max_new_tokens=new, do_sample=False, min_new_tokens=new)
    torch.cuda.synchronize()
    report["hf_generate_tokens_per_s"] = 2 * new / (time.perf_counter() - t0)

    with torch.no_grad():
        tokens = prompt
        for _ in range(new):  # our greedy decoding: full recompute each step
            logits = ours(tokens)[-1, :, : cfg.model.vocab_size]  # [s, b, v] → last position
            tokens = torch.cat([tokens, logits.argmax(-1, keepdim=True)], dim=1)
        ours_logits = ours(prompt).float().transpose(0, 1)[..., : cfg.model.vocab_size]
        hf_logits = hf(prompt).logits.float()[..., : cfg.model.vocab_size]
    diff = (ours_logits - hf_logits).abs()
    report["prompt_logits_max_abs_diff"] = diff.max().item()
    report["prompt_logits_mean_abs_diff"] = diff.mean().item()
    report["prompt_logits_scale"] = ours_logits.abs().mean().item()
    report["next_token_argmax_agree"] = (
        (ours_logits.argmax(-1) == hf_logits.argmax(-1)).float().mean().item()
    )
    continuation_hf, continuation_ours = generated[:, 16:], tokens[:, 16:]
    same = (continuation_hf == continuation_ours).all(0).long()
    report["generated_tokens_identical_prefix"] = int(same.cumprod(0).sum().item())
    report["generated_tokens"] = new
    print(json.dumps(report, indent=1))
    Path(out_json).write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
