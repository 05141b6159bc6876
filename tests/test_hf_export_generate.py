"""The HF export's modeling code (DyT, trust_remote_code) decodes with transformers' KV cache
and SDPA: cached generation equals uncached, and after the prefill every attention call sees
one new position."""

from __future__ import annotations

import inspect

import pytest
import torch
from common import tiny_dict

from megatron_dyt.checkpoint import write_checkpoint
from megatron_dyt.config import config_from_dict
from megatron_dyt.convert.to_hf import export_to_hf


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    from megatron_dyt.info import build_meta_model
    from megatron_dyt.model import canonical_parameters
    from megatron_dyt.model.sharding import full_shape

    tree = tiny_dict("dyt", seq_length=64)
    tree["model"]["norm"]["backend"] = "torch"
    cfg = config_from_dict(tree)
    gen = torch.Generator().manual_seed(0)
    full = {}
    for name, param in canonical_parameters(build_meta_model(cfg)):
        shape = full_shape(name, param.shape, 1)
        full[name] = torch.randn(shape, generator=gen) * (0.3 if len(shape) == 1 else 0.08)
        if name.endswith(("alpha", "scale", "norm.weight")):
            full[name] = full[name].abs() + 0.5
    tmp = tmp_path_factory.mktemp("hf")
    write_checkpoint(full, cfg, tmp / "run", progress=False)
    with pytest.warns(UserWarning, match="no tokenizer"):
        export_to_hf(tmp / "run", tmp / "hf", progress=False)
    return AutoModelForCausalLM.from_pretrained(tmp / "hf", trust_remote_code=True).eval()


def _record_attention_lengths(model) -> list[int]:
    """Hook layer 0's attention: the sequence length of every call's hidden states."""
    lengths: list[int] = []
    attn = model.model.layers[0].self_attn
    attn.register_forward_pre_hook(
        lambda module, args, kwargs: lengths.append(
            (kwargs.get("hidden_states", args[0] if args else None)).shape[1]
        ),
        with_kwargs=True,
    )
    return lengths


def test_export_uses_sdpa_and_the_kv_cache(hf_model):
    assert type(hf_model).__name__ == "MegatronDytLlamaForCausalLM"
    assert hf_model.config._attn_implementation == "sdpa"
    assert hf_model.config.use_cache
    prompt = torch.tensor([[5, 77, 100, 12, 9, 31]])
    lengths = _record_attention_lengths(hf_model)
    cached = hf_model.generate(
        prompt, max_new_tokens=10, min_new_tokens=10, do_sample=False, pad_token_id=0
    )
    assert lengths == [6] + [1] * 9  # prefill, then one position per new token
    lengths.clear()
    full = hf_model.generate(
        prompt,
        max_new_tokens=10,
        min_new_tokens=10,
        do_sample=False,
        pad_token_id=0,
        use_cache=False,
    )
    assert lengths == list(range(6, 16))  # without the cache every step recomputes it all
    assert torch.equal(cached, full)


def test_cached_logits_equal_full_logits(hf_model):
    """Logits of a decode step through `past_key_values` equal a full forward's last row."""
    tokens = torch.tensor([[5, 77, 100, 12, 9, 31, 40]])
    with torch.no_grad():
        prefill = hf_model(tokens[:, :-1], use_cache=True)
        # transformers 5.x renamed the argument `cache` (`past_key_values` in 4.x)
        name = "cache" if "cache" in inspect.signature(hf_model.forward).parameters else None
        step = hf_model(
            tokens[:, -1:], **{name or "past_key_values": prefill.past_key_values}, use_cache=True
        )
        full = hf_model(tokens, use_cache=False)
    assert step.past_key_values.get_seq_length() == 7
    torch.testing.assert_close(step.logits[0, -1], full.logits[0, -1], rtol=0, atol=1e-5)
