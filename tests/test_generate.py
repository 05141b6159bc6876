"""`megatron-dyt generate`: KV-cached decoding equals full recomputation, greedy output equals
transformers' on the HF export, TP=2 and PP=2 equal one process, bad input is one error line."""

from __future__ import annotations

import distributed
import pytest
import torch
from common import tiny_dict

from megatron_dyt import cli, parallel
from megatron_dyt.checkpoint import write_checkpoint
from megatron_dyt.config import config_from_dict
from megatron_dyt.data import load_tokenizer
from megatron_dyt.errors import UsageError
from megatron_dyt.inference.generate import Decoder, Sampling, generate_text
from megatron_dyt.model import KVCache, LlamaModel, forward_cached, load_full_state_dict

PROMPT = "def parse(self, text):\n    return"


def _cfg(kind: str = "dyt", tp: int = 1, pp: int = 1, **model):
    tree = tiny_dict(kind, tp=tp, pp=pp, seq_length=64, vocab_size=512, **model)
    tree["model"]["norm"]["backend"] = "torch"
    tree["train"]["precision"] = "fp32"
    return config_from_dict(tree)


def _random_full(cfg) -> dict[str, torch.Tensor]:
    """Random weights for every tensor (norm parameters too), large enough that greedy choices
    are far from ties."""
    from megatron_dyt.info import build_meta_model
    from megatron_dyt.model import canonical_parameters
    from megatron_dyt.model.sharding import full_shape

    gen = torch.Generator().manual_seed(3)
    out = {}
    for name, param in canonical_parameters(build_meta_model(cfg)):
        shape = full_shape(name, param.shape, 1)
        out[name] = torch.randn(shape, generator=gen) * (0.3 if len(shape) == 1 else 0.08)
        if name.endswith(("alpha", "scale", "norm.weight")):
            out[name] = out[name].abs() + 0.5
    return out


def _model(cfg, full) -> LlamaModel:
    parallel.init_distributed("gloo")
    parallel.initialize_model_parallel(cfg.parallel)
    model = LlamaModel(cfg).eval()
    load_full_state_dict(model, full)
    return model


@pytest.mark.parametrize("kind", ["dyt", "rmsnorm"])
def test_cached_decoding_equals_full_recompute(kind):
    """Logits of every position, computed chunk by chunk through the cache (a prefill, single
    tokens, then a chunk after the prefill), equal one full forward of the whole sequence."""
    cfg = _cfg(kind)
    model = _model(cfg, _random_full(cfg))
    tokens = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(tokens)
        cache = KVCache(24)
        chunks = [(0, 9), (9, 10), (10, 11), (11, 24)]
        parts = [forward_cached(model, tokens[:, a:b], cache) for a, b in chunks]
    assert all(layer.length == 24 for layer in cache.layers.values())
    assert len(cache.layers) == cfg.model.num_layers
    torch.testing.assert_close(torch.cat(parts), full, rtol=0, atol=1e-5)
    with pytest.raises(UsageError, match="KV cache holds 24 positions"):
        forward_cached(model, tokens[:, :1], cache)


def test_greedy_decoder_equals_recompute_each_step():
    """The decoder's tokens are the argmax of a full forward of everything so far, step by step."""
    cfg = _cfg()
    model = _model(cfg, _random_full(cfg))
    decoder = Decoder(model, cfg, torch.device("cpu"), torch.float32)
    prompt = [5, 77, 300, 12, 9]
    got = decoder.generate(prompt, 12).tokens
    want = list(prompt)
    with torch.no_grad():
        for _ in range(12):
            logits = model(torch.tensor([want]))[-1, 0, : cfg.model.vocab_size]
            want.append(int(logits.argmax()))
    assert got == want[len(prompt) :]
    # stops at EOS, which is not returned
    eos = got[3]
    stopped = decoder.generate(prompt, 12, eos=eos)
    assert stopped.tokens == got[: got.index(eos)] and stopped.stopped_at_eos


def test_sampling_is_seeded_and_top_p_narrows():
    cfg = _cfg()
    decoder = Decoder(_model(cfg, _random_full(cfg)), cfg, torch.device("cpu"), torch.float32)
    prompt = [5, 77, 300]
    a = decoder.generate(prompt, 10, Sampling(temperature=1.0, seed=1)).tokens
    b = decoder.generate(prompt, 10, Sampling(temperature=1.0, seed=1)).tokens
    c = decoder.generate(prompt, 10, Sampling(temperature=1.0, seed=2)).tokens
    assert a == b and a != c
    # a nucleus this small holds only the most likely token: greedy
    tiny = decoder.generate(prompt, 10, Sampling(temperature=1.0, top_p=1e-6, seed=2)).tokens
    assert tiny == decoder.generate(prompt, 10).tokens


@pytest.fixture(scope="module")
def checkpoint(corpus, tmp_path_factory):
    cfg = _cfg()
    run = tmp_path_factory.mktemp("gen") / "run"
    write_checkpoint(
        _random_full(cfg), cfg, run, tokenizer=load_tokenizer(corpus["tokenizer"]), progress=False
    )
    return run


def test_generate_equals_transformers_greedy(checkpoint, tmp_path):
    """`generate` on our checkpoint and transformers' `generate(do_sample=False)` on its
    `convert to-hf` export (custom DyT code) give the same tokens for the same prompt."""
    from transformers import AutoModelForCausalLM

    from megatron_dyt.convert.to_hf import export_to_hf

    text, ours = generate_text(checkpoint, PROMPT, max_new_tokens=24)
    assert len(ours.tokens) == 24 and not ours.stopped_at_eos
    export_to_hf(checkpoint, tmp_path / "hf", progress=False)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", trust_remote_code=True).eval()
    prompt = load_tokenizer(checkpoint / "checkpoints/step_0000000/tokenizer.model").encode(PROMPT)
    assert ours.prompt == prompt  # no BOS in front
    out = hf.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False, pad_token_id=0)
    assert out[0, len(prompt) :].tolist() == ours.tokens
    assert text == load_tokenizer(checkpoint / "checkpoints/step_0000000/tokenizer.model").decode(
        [t for t in ours.tokens if t < 512]
    )


def _generate_worker(run: str) -> list[int]:
    return generate_text(run, PROMPT, max_new_tokens=16)[1].tokens


@pytest.mark.distributed
@pytest.mark.parametrize("tp, pp", [(2, 1), (1, 2)])
def test_parallel_generate_equals_one_process(corpus, tmp_path, tp, pp):
    """A checkpoint saved at TP=2 (PP=2), generated from at its layout by 2 gloo processes,
    gives the tokens one process gives from the merged weights."""
    cfg = _cfg(tp=tp, pp=pp)
    write_checkpoint(
        _random_full(cfg),
        cfg,
        tmp_path / "run",
        tokenizer=load_tokenizer(corpus["tokenizer"]),
        progress=False,
    )
    results = distributed.run(_generate_worker, 2, str(tmp_path / "run"), tmp_path=tmp_path)
    one = _generate_worker(str(tmp_path / "run"))
    assert len(one) == 16
    assert results == [one, one]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--prompt", ""], "the prompt is empty"),
        (
            ["--prompt", " ".join(map(str, range(80))), "--max-new-tokens", "8"],
            "exceed the model's context",
        ),
        (["--prompt", "a", "--top-p", "1.5"], "--top-p 1.5: must be in (0, 1]"),
    ],
)
def test_bad_input_is_one_error_line(checkpoint, capsys, argv, message):
    assert cli.main(["generate", str(checkpoint), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("megatron-dyt: error: ") and message in err
    assert err.count("\n") == 1


def test_bad_numbers_are_usage_errors(checkpoint, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["generate", str(checkpoint), "--prompt", "a", "--temperature", "-1"])
    assert exc.value.code == 2
    assert "expected a finite number >= 0" in capsys.readouterr().err


@pytest.mark.slow  # a subprocess that imports megatron-core and transformers (~15 s)
def test_gpu_generate_benchmark_runs_tiny_on_cpu(tmp_path):
    """`benchmarks/gpu_generate.py --tiny`: the export, a stock LlamaForCausalLM and our decoder
    all generate and reach the JSON, so the lent GPU's minutes go to measuring."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "gen.json"
    proc = subprocess.run(
        [sys.executable, str(root / "benchmarks/gpu_generate.py"), str(out), "--tiny"]
        + ["--new", "8", "--prompt-len", "6", "--repeats", "1"],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)},
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["export_class"] == "MegatronDytLlamaForCausalLM"
    assert report["export_attn_implementation"] == "sdpa"
    for key in ("export_tokens_per_s", "llama_tokens_per_s", "ours_tokens_per_s"):
        assert report[key] > 0
    assert report["export_ours_identical_prefix"] == 8  # fp32: the same greedy tokens


def test_generate_command_prints_the_new_text(checkpoint, capsys):
    text, _ = generate_text(checkpoint, PROMPT, max_new_tokens=5)
    assert cli.main(["generate", str(checkpoint), "--prompt", PROMPT, "--max-new-tokens", "5"]) == 0
    out, err = capsys.readouterr()
    assert out == text + "\n"
    assert "prompt tokens, 5 new (stopped by --max-new-tokens)" in err and "tokens/s" in err
