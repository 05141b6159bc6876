"""The single-process model against an independent plain-PyTorch LLaMA, init rules, recompute."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from common import tiny

from megatron_dyt import parallel
from megatron_dyt.model import LlamaModel, full_state_dict, init_weights
from megatron_dyt.model.rope import apply_rope, rope_cos_sin


@pytest.fixture(autouse=True, scope="module")
def process_group():
    parallel.init_distributed("gloo")
    yield


def build(cfg):
    parallel.initialize_model_parallel(cfg.parallel)
    model = LlamaModel(cfg)
    init_weights(model, cfg.model, cfg.train.seed)
    return model


def reference_norm(kind, sd, prefix, x, cfg, site):
    n = cfg.model.norm
    if kind == "rmsnorm":
        return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + n.eps) * sd[prefix + "weight"]
    if kind == "dyt":
        y = torch.tanh(sd[prefix + "alpha"] * x) * sd[prefix + "weight"]
    else:
        y = torch.erf(sd[prefix + "alpha"] * x + sd[prefix + "shift"]) * sd[prefix + "weight"]
    return y + sd[prefix + "bias"] if prefix + "bias" in sd else y


def reference_rope(x, theta):
    """Rotate each pair (i, i + d/2) by position · θ^(-2i/d), one position at a time. x: [b, s, n, d]."""
    b, s, n, d = x.shape
    out = torch.empty_like(x)
    for pos in range(s):
        for i in range(d // 2):
            angle = pos * theta ** (-2 * i / d)
            c, si = math.cos(angle), math.sin(angle)
            x1, x2 = x[:, pos, :, i], x[:, pos, :, i + d // 2]
            out[:, pos, :, i] = x1 * c - x2 * si
            out[:, pos, :, i + d // 2] = x2 * c + x1 * si
    return out


def reference_forward(cfg, sd, tokens):
    """A nanoGPT-style LLaMA written from the full state dict; batch-first, explicit causal mask."""
    m = cfg.model
    kind, hd = m.norm.kind, m.head_dim
    b, s = tokens.shape
    x = sd["embedding.word.weight"][tokens]
    if m.embedding_scale:
        x = x * sd["embedding.scale"]
    mask = torch.ones(s, s, dtype=torch.bool).tril()
    q_per_kv = m.num_heads // m.kv_heads
    for i in range(m.num_layers):
        p = f"layers.{i}."
        h = reference_norm(kind, sd, p + "attention_norm.", x, cfg, "attention")
        qkv = (h @ sd[p + "attention.qkv.weight"].t()).view(b, s, m.kv_heads, q_per_kv + 2, hd)
        q = qkv[..., :q_per_kv, :].reshape(b, s, m.num_heads, hd)
        k, v = qkv[..., -2, :], qkv[..., -1, :]
        q, k = reference_rope(q, m.rope_theta), reference_rope(k, m.rope_theta)
        k = k.repeat_interleave(q_per_kv, dim=2)
        v = v.repeat_interleave(q_per_kv, dim=2)
        scores = torch.einsum("bqnd,bknd->bnqk", q, k) / math.sqrt(hd)
        scores = scores.masked_fill(~mask, float("-inf"))
        att = torch.einsum("bnqk,bknd->bqnd", scores.softmax(-1), v).reshape(b, s, -1)
        x = x + att @ sd[p + "attention.proj.weight"].t()
        h = reference_norm(kind, sd, p + "mlp_norm.", x, cfg, "mlp")
        gate, up = (h @ sd[p + "mlp.gate_up.weight"].t()).chunk(2, dim=-1)
        x = x + (F.silu(gate) * up) @ sd[p + "mlp.down.weight"].t()
    x = reference_norm(kind, sd, "output.norm.", x, cfg, "final")
    return x @ sd["output.head.weight"].t()  # [b, s, padded vocab]


def test_rope_matches_the_pairwise_rotation():
    x = torch.randn(2, 6, 3, 8, dtype=torch.float64)
    cos, sin = rope_cos_sin(6, 8, 500.0, torch.device("cpu"))
    got = apply_rope(x.transpose(0, 1).float(), cos, sin).transpose(0, 1).double()
    torch.testing.assert_close(got, reference_rope(x, 500.0), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "kind",
    [  # DyT and Derf run the Triton backend (the default); RMSNorm has no kernel
        pytest.param("dyt", marks=pytest.mark.interpreter),
        pytest.param("derf", marks=pytest.mark.interpreter),
        "rmsnorm",
    ],
)
def test_model_equals_plain_pytorch_reference(kind):
    cfg = tiny(kind, rope_theta=100.0)
    model = build(cfg)
    sd = full_state_dict(model)
    tokens = torch.randint(0, cfg.model.vocab_size, (2, cfg.model.seq_length))
    logits = model(tokens).transpose(0, 1)  # [s, b, v] -> [b, s, v]
    expected = reference_forward(cfg, sd, tokens)
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
    loss = model(tokens[:, :-1], tokens[:, 1:])
    ref_loss = F.cross_entropy(
        expected[:, :-1].reshape(-1, expected.shape[-1]), tokens[:, 1:].reshape(-1)
    )
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)


def test_initial_values():
    cfg = tiny(
        "dyt",
        num_layers=8,
        hidden_size=128,
        ffn_hidden_size=512,
        vocab_size=1000,
        make_vocab_size_divisible_by=128,
    )
    model = build(cfg)
    sd = full_state_dict(model)
    assert cfg.padded_vocab_size == 1024
    assert sd["embedding.scale"].item() == pytest.approx(math.sqrt(128))
    # Padding rows of the vocabulary are zero, real rows follow N(0, 0.02).
    assert torch.count_nonzero(sd["embedding.word.weight"][1000:]) == 0
    assert torch.count_nonzero(sd["output.head.weight"][1000:]) == 0
    assert sd["embedding.word.weight"][:1000].std().item() == pytest.approx(0.02, rel=0.05)
    assert sd["layers.3.mlp.gate_up.weight"].std().item() == pytest.approx(0.02, rel=0.05)
    scaled = 0.02 / math.sqrt(2 * 8)
    assert sd["layers.3.attention.proj.weight"].std().item() == pytest.approx(scaled, rel=0.05)
    assert sd["layers.3.mlp.down.weight"].std().item() == pytest.approx(scaled, rel=0.05)
    for i in range(8):
        assert sd[f"layers.{i}.attention_norm.alpha"].item() == pytest.approx(0.8)
        assert sd[f"layers.{i}.mlp_norm.alpha"].item() == pytest.approx(0.3)
        assert torch.equal(sd[f"layers.{i}.mlp_norm.weight"], torch.ones(128))
    assert sd["output.norm.alpha"].item() == pytest.approx(0.4)
    assert "layers.0.attention_norm.bias" not in sd  # LLaMA DyT has no β

    unscaled = tiny(
        "dyt", init={"scaled_output_init": False, "std": 0.05, "layout_invariant": True}
    )
    sd2 = full_state_dict(build(unscaled))
    assert sd2["layers.1.mlp.down.weight"].std().item() == pytest.approx(0.05, rel=0.1)


def test_meta_construction_gives_the_same_model():
    cfg = tiny("dyt")
    eager = full_state_dict(build(cfg))
    with torch.device("meta"):
        meta = LlamaModel(cfg)
    meta = meta.to_empty(device="cpu")
    init_weights(meta, cfg.model, cfg.train.seed)
    for name, tensor in full_state_dict(meta).items():
        assert torch.equal(tensor, eager[name]), name


def test_same_seed_same_model_other_seed_other_model():
    cfg = tiny("rmsnorm")
    a, b = full_state_dict(build(cfg)), full_state_dict(build(cfg))
    assert all(torch.equal(a[k], b[k]) for k in a)
    other = build(cfg)
    init_weights(other, cfg.model, seed=99)
    c = full_state_dict(other)
    assert not torch.equal(a["layers.0.attention.qkv.weight"], c["layers.0.attention.qkv.weight"])


@pytest.mark.parametrize("mode", ["selective", "full"])
@pytest.mark.interpreter  # DyT on the default triton backend
def test_activation_checkpointing_changes_nothing_numerically(mode):
    base = tiny("dyt")
    tokens = torch.randint(0, base.model.vocab_size, (2, base.model.seq_length + 1))
    results = []
    for m in ("none", mode):
        cfg = base.model_copy(
            update={"train": base.train.model_copy(update={"activation_checkpointing": m})}
        )
        model = build(cfg)
        loss = model(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        results.append((loss.detach(), full_state_dict(model, grads=True)))
    (l0, g0), (l1, g1) = results
    assert torch.equal(l0, l1)
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=0, atol=1e-7)


def test_sequence_parallel_needs_cuda():
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    cfg = tiny("dyt", tp=1)
    cfg = cfg.model_copy(
        update={"parallel": cfg.parallel.model_copy(update={"sequence_parallel": True})}
    )
    with pytest.raises(ValueError, match="sequence_parallel=true needs CUDA"):
        LlamaModel(cfg)


def test_flash_backend_without_flash_attn_is_a_clear_error():
    from megatron_dyt.model.attention import HAVE_FLASH_ATTN

    if HAVE_FLASH_ATTN:
        pytest.skip("flash-attn installed")
    with pytest.raises(
        ValueError, match="attention_backend='flash' but flash-attn is not installed"
    ):
        build(tiny("dyt", attention_backend="flash"))


def test_attention_keeps_no_view_of_the_fused_qkv_output_for_the_backward():
    # What the backward holds on to decides activation memory: a saved view of the fused qkv
    # output (e.g. v) would keep all of it, q and k included, alive until the backward.
    model = build(tiny("dyt"))
    attention = model.layers[0].attention
    qkv_storages = []
    attention.qkv.register_forward_hook(
        lambda mod, args, out: qkv_storages.append(out[0].untyped_storage().data_ptr())
    )
    saved = []

    def pack(t):
        saved.append(t.untyped_storage().data_ptr())
        return t

    x = torch.randn(16, 2, 64, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        attention(x).sum().backward()
    assert len(qkv_storages) == 1 and saved
    assert qkv_storages[0] not in saved


@pytest.mark.parametrize("learnable", [True, False])
def test_trainable_by_name_is_what_the_model_trains(learnable):
    # Resharding decides from names alone which parameters have optimizer state.
    from megatron_dyt.model import canonical_parameters
    from megatron_dyt.model.groups import is_trainable

    cfg = tiny("derf")
    cfg = cfg.model_copy(
        update={
            "model": cfg.model.model_copy(
                update={"norm": cfg.model.norm.model_copy(update={"learnable_alpha": learnable})}
            )
        }
    )
    params = dict(canonical_parameters(build(cfg)))
    assert any(name.endswith(".alpha") for name in params)
    for name, param in params.items():
        assert is_trainable(name, cfg) == param.requires_grad, name
