"""Hugging Face export/import: exact round trips, logits equal in transformers, clear errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import distributed
import pytest
import torch
from common import tiny_dict, train_dict, train_worker

from megatron_dyt import checkpoint as ckpt
from megatron_dyt.checkpoint import write_checkpoint
from megatron_dyt.checkpoint.reader import read_meta
from megatron_dyt.config import RopeScalingConfig, config_from_dict
from megatron_dyt.convert.from_hf import import_from_hf
from megatron_dyt.convert.reshard import reshard_checkpoint
from megatron_dyt.convert.to_hf import export_to_hf

# Logits of the same fp32 weights through our model and through transformers differ only by the
# order of floating-point sums (fused QKV / gate-up GEMMs vs separate ones, SDPA with a causal
# flag vs a mask): ~1e-6 on logits of magnitude ~1. 1e-4 leaves room for other BLAS builds while
# still catching any layout mistake (a swapped head or a RoPE convention error moves them by ~0.1).
ATOL = 1e-4


def _full(path) -> dict[str, torch.Tensor]:
    folder = ckpt.resolve(path)
    full = ckpt.read_full_state_dict(folder, ckpt.read_config(folder))
    return {k: v for k, v in full.items() if torch.is_tensor(v)}


def _assert_identical(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype == torch.float32, name
        assert torch.equal(a[name], b[name]), name


def _random_full(cfg) -> dict[str, torch.Tensor]:
    """Every weight of `cfg`'s model, random (norm parameters too, so none is left at init)."""
    from megatron_dyt.info import build_meta_model
    from megatron_dyt.model import canonical_parameters
    from megatron_dyt.model.sharding import full_shape

    gen = torch.Generator().manual_seed(0)
    out = {}
    for name, param in canonical_parameters(build_meta_model(cfg)):
        shape = full_shape(name, param.shape, 1)
        out[name] = torch.randn(shape, generator=gen) * (0.3 if len(shape) == 1 else 0.05)
        if name.endswith(("alpha", "scale", "norm.weight")):
            out[name] = out[name].abs() + 0.5
    return out


def _our_logits(full: dict, cfg, tokens: torch.Tensor) -> torch.Tensor:
    """[b, s, v] logits of our model (TP=PP=1, fp32, CPU) with these weights."""
    from megatron_dyt import parallel
    from megatron_dyt.model import LlamaModel, load_full_state_dict

    one = cfg.model_copy(
        update={"parallel": cfg.parallel.model_copy(update={"tensor": 1, "pipeline": 1})}
    )
    parallel.init_distributed("gloo")
    parallel.initialize_model_parallel(one.parallel)
    model = LlamaModel(one).eval()
    load_full_state_dict(model, full)
    with torch.no_grad():
        return model(tokens).transpose(0, 1)


def _cfg(kind: str, tp: int = 2, pp: int = 2, **model):
    tree = tiny_dict(kind, tp=tp, pp=pp, **model)
    tree["model"]["norm"]["backend"] = "torch"
    return config_from_dict(tree)


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory) -> Path:
    """A DyT model trained 2 steps at TP=2, PP=2 by the real trainer (4 gloo processes)."""
    tmp = tmp_path_factory.mktemp("trained")
    cfg = train_dict(corpus, tp=2, pp=2, zero=1, train_steps=2)
    cfg["model"]["norm"]["backend"] = "torch"
    distributed.run(train_worker, 4, cfg, str(tmp / "run"), tmp_path=tmp)
    return tmp / "run"


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export") / "hf"
    export_to_hf(trained, out, max_shard_size="60KB", progress=False)
    return out


# ---- round trips ------------------------------------------------------------------------------


@pytest.mark.distributed  # the `trained` fixture: 4 ranks
def test_trained_dyt_round_trip_is_bit_identical(trained, exported, tmp_path):
    files = sorted(p.name for p in exported.iterdir())
    assert "model.safetensors.index.json" in files and "model-00001-of-" in " ".join(files)
    index = json.loads((exported / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {f for f in files if f.endswith(".safetensors")}
    source = _full(trained)
    for tp, pp in [(2, 2), (1, 1), (2, 1)]:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # our own export: no padding or untying notices
            folder = import_from_hf(
                exported, tmp_path / f"tp{tp}pp{pp}", tp=tp, pp=pp, progress=False
            )
        _assert_identical(source, _full(folder))
        got, want = ckpt.read_config(folder).to_dict(), ckpt.read_config(ckpt.resolve(trained))
        want = want.to_dict()
        assert got.pop("parallel")["tensor"] == tp
        want.pop("parallel")
        assert got == want  # the whole config comes back (norm, α₀, data, training)
    # An import holds weights only: resharding it gives the same weights and no optimizer state.
    resharded = reshard_checkpoint(tmp_path / "tp2pp2", tmp_path / "rs", tensor=1, progress=False)
    _assert_identical(source, _full(resharded))
    assert read_meta(resharded)["optimizer_step"] == 0


@pytest.mark.parametrize("kind", ["derf", "rmsnorm", "layernorm"])
def test_round_trip_of_other_norms_at_tp2_pp2(kind, tmp_path):
    cfg = _cfg(kind)
    source = _random_full(cfg)
    write_checkpoint(source, cfg, tmp_path / "src", progress=False)
    export_to_hf(tmp_path / "src", tmp_path / "hf", progress=False)
    stock = not (tmp_path / "hf" / "modeling_megatron_dyt.py").exists()
    assert stock == (kind == "rmsnorm")
    folder = import_from_hf(tmp_path / "hf", tmp_path / "back", tp=2, pp=2, progress=False)
    _assert_identical(_full(tmp_path / "src"), _full(folder))
    _assert_identical(source, _full(folder))


def test_vocab_padding_of_another_tp_size_is_refitted(tmp_path):
    """Vocab 257 is padded to 258 rows at TP=2 and 257 at TP=1 (make_vocab_size_divisible_by=1):
    the rows past the vocabulary are padding, refitted by export, import and the reader."""
    cfg = _cfg("dyt", tp=2, pp=1, vocab_size=257, make_vocab_size_divisible_by=1)
    assert cfg.padded_vocab_size == 258
    source = _random_full(cfg)
    write_checkpoint(source, cfg, tmp_path / "src", progress=False)
    resharded = reshard_checkpoint(tmp_path / "src", tmp_path / "tp1", tensor=1, progress=False)
    export_to_hf(resharded, tmp_path / "hf", progress=False)
    from safetensors.torch import load_file

    hf_config = json.loads((tmp_path / "hf/config.json").read_text())
    embed = load_file(tmp_path / "hf/model.safetensors")["model.embed_tokens.weight"]
    assert hf_config["vocab_size"] == embed.shape[0] == 257  # what transformers checks on load
    back = _full(import_from_hf(tmp_path / "hf", tmp_path / "back", tp=2, progress=False))
    for name, tensor in source.items():
        if name in ("embedding.word.weight", "output.head.weight"):
            assert back[name].shape[0] == 258 and not back[name][257:].any()
            tensor, back[name] = tensor[:257], back[name][:257]
        assert torch.equal(back[name], tensor), name


# ---- logits in transformers ---------------------------------------------------------------------

_LOAD_WITHOUT_US = r"""
import sys, torch
sys.modules["megatron_dyt"] = None  # any import of this project from the export fails
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
tokens = torch.load(sys.argv[2])
with torch.no_grad():
    torch.save({"logits": model(tokens).logits, "cls": type(model).__name__}, sys.argv[3])
"""


@pytest.mark.distributed  # the `trained` fixture: 4 ranks
def test_dyt_logits_match_transformers_with_custom_code(trained, exported, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(exported, copy)
    code = (copy / "modeling_megatron_dyt.py").read_text()
    assert "megatron_dyt" not in code.replace("modeling_megatron_dyt", "").replace(
        "configuration_megatron_dyt", ""
    )
    config = json.loads((copy / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"].startswith("modeling_megatron_dyt.")
    tokens = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(1))
    torch.save(tokens, tmp_path / "tokens.pt")
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            _LOAD_WITHOUT_US,
            str(copy),
            str(tmp_path / "tokens.pt"),
            str(tmp_path / "out.pt"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = torch.load(tmp_path / "out.pt")
    assert out["cls"] == "MegatronDytLlamaForCausalLM"
    folder = ckpt.resolve(trained)
    ours = _our_logits(_full(folder), ckpt.read_config(folder), tokens)
    assert out["logits"].shape == ours.shape
    torch.testing.assert_close(out["logits"], ours, atol=ATOL, rtol=0)


@pytest.mark.parametrize("kind", ["rmsnorm", "derf"])
def test_logits_match_transformers(kind, tmp_path):
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    cfg = _cfg(kind, tp=1, pp=1)
    full = _random_full(cfg)
    write_checkpoint(full, cfg, tmp_path / "src", progress=False)
    export_to_hf(tmp_path / "src", tmp_path / "hf", progress=False)
    if kind == "rmsnorm":  # stock class, no remote code
        assert "auto_map" not in json.loads((tmp_path / "hf/config.json").read_text())
        model = LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    else:
        model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", trust_remote_code=True)
    tokens = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        theirs = model.eval()(tokens).logits
    torch.testing.assert_close(theirs, _our_logits(full, cfg, tokens), atol=ATOL, rtol=0)


def test_published_llama_imports_with_the_same_logits(corpus, tmp_path):
    """A stock transformers LLaMA (GQA, rope_theta ≠ 10⁴) → ours: the same function."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(3)
    hf_cfg = LlamaConfig(
        vocab_size=250,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rope_theta=500000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(hf_cfg).eval()
    model.save_pretrained(tmp_path / "llama")
    with pytest.warns(UserWarning, match="padded with zero rows to 256"):
        folder = import_from_hf(
            tmp_path / "llama",
            tmp_path / "ours",
            tp=2,
            pp=2,
            tokenizer=corpus["tokenizer"],  # the folder has none of its own
            progress=False,
        )
    assert (folder / "tokenizer.model").read_bytes() == Path(corpus["tokenizer"]).read_bytes()
    cfg = ckpt.read_config(folder)
    assert (cfg.model.norm.kind, cfg.model.vocab_size, cfg.padded_vocab_size) == (
        "rmsnorm",
        250,
        256,
    )
    assert cfg.model.rope_theta == 500000.0 and cfg.model.norm.eps == 1e-6
    tokens = torch.randint(0, 250, (2, 16), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        theirs = model(tokens).logits
    ours = _our_logits(_full(folder), cfg, tokens)[..., :250]
    torch.testing.assert_close(theirs, ours, atol=ATOL, rtol=0)


def test_rmsnorm_model_converts_to_dyt(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_cfg = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(hf_cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(tmp_path / "llama")
    with pytest.warns(UserWarning, match="ties its output head"):
        folder = import_from_hf(
            tmp_path / "llama",
            tmp_path / "dyt",
            norm="dyt",
            overrides=[
                "model.norm.alpha_attn=0.8",
                "model.norm.alpha_mlp=0.3",
                "model.norm.beta=true",
            ],
            progress=False,
        )
    cfg = ckpt.read_config(folder)
    assert cfg.model.norm.kind == "dyt" and cfg.model.embedding_scale
    full = _full(folder)
    hf = model.state_dict()
    for i in range(2):
        assert torch.equal(
            full[f"layers.{i}.attention_norm.weight"],
            hf[f"model.layers.{i}.input_layernorm.weight"],
        )
        assert full[f"layers.{i}.attention_norm.alpha"].item() == pytest.approx(0.8)
        assert full[f"layers.{i}.mlp_norm.alpha"].item() == pytest.approx(0.3)
        assert not full[f"layers.{i}.mlp_norm.bias"].any()
    assert full["output.norm.alpha"].item() == pytest.approx(cfg.model.norm.alpha_final)
    assert full["embedding.scale"].item() == 1.0
    assert torch.equal(full["output.head.weight"], hf["model.embed_tokens.weight"])


@pytest.mark.distributed  # the `trained` fixture: 4 ranks
def test_export_in_bf16_and_the_tokenizer(trained, corpus, tmp_path):
    import sentencepiece as spm
    from safetensors import safe_open
    from transformers import AutoTokenizer

    out = export_to_hf(trained, tmp_path / "bf16", dtype="bf16", progress=False)
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    with safe_open(out / "model.safetensors", "pt") as fh:
        assert {fh.get_tensor(k).dtype for k in fh.keys()}  # noqa: SIM118 == {torch.bfloat16}
    tok = AutoTokenizer.from_pretrained(out, trust_remote_code=True)
    sp = spm.SentencePieceProcessor(model_file=corpus["tokenizer"])
    text = "def f(x):\n    return  x + 12345  # héllo 世界\n"
    assert tok(text).input_ids == sp.encode(text)  # no BOS, as in training (docs/design.md §5)
    assert tok.decode(sp.encode(text)) == text
    # the special ids are the tokenizer's own, everywhere
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (
        sp.bos_id(),
        sp.eos_id(),
        None,
    )
    config = json.loads((out / "config.json").read_text())
    generation = json.loads((out / "generation_config.json").read_text())
    ids = {"bos_token_id": sp.bos_id(), "eos_token_id": sp.eos_id()}
    assert generation == ids and {k: config[k] for k in ids} == ids
    assert config["pad_token_id"] is None


# ---- our trainer and evaluator on an import ---------------------------------------------------


def _eval(path: str, out: str) -> float:
    from megatron_dyt.eval.run import evaluate_checkpoint

    return evaluate_checkpoint(path, ["pycloze"], batch_size=4, limit=4, out_dir=out).summary


@pytest.mark.distributed
def test_training_continues_and_eval_reads_an_import(corpus, exported, tmp_path):
    """Import at TP2/PP2 → `train` at TP2/PP2 loads the weights (a step at lr 1e-30 keeps them
    bit for bit, so the step-1 checkpoint equals the import) → `eval` reads it."""
    run = tmp_path / "run"
    folder = import_from_hf(exported, run, tp=2, pp=2, progress=False)
    cfg = train_dict(corpus, tp=2, pp=2, zero=1, train_steps=1, lr=1e-30, warmup_steps=0)
    cfg["model"]["norm"]["backend"] = "torch"
    ranks = distributed.run(train_worker, 4, cfg, str(run), tmp_path=tmp_path)
    assert ranks[0]["step"] == 1 and sorted(ranks[0]["losses"]) == [1]
    _assert_identical(_full(folder), _full(run / "checkpoints/step_0000001"))
    summary = distributed.run(_eval, 1, str(folder), str(tmp_path / "eval"), tmp_path=tmp_path)[0]
    assert summary["rows"][0]["task"] == "pycloze"


# ---- bad input ------------------------------------------------------------------------------------


def _run_cli(args: list[str], capsys) -> tuple[int, str]:
    from megatron_dyt.cli import main

    code = main(["convert", *args, "--no-progress"])
    err = capsys.readouterr().err
    return code, err


def _small_llama(path: Path, **overrides) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    kw = dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    LlamaForCausalLM(LlamaConfig(**(kw | overrides))).save_pretrained(path)
    return path


def test_bad_input_is_one_clear_error(tmp_path, capsys):
    llama = _small_llama(tmp_path / "llama")
    qwen = tmp_path / "qwen"
    shutil.copytree(llama, qwen)
    config = json.loads((qwen / "config.json").read_text())
    (qwen / "config.json").write_text(json.dumps(config | {"model_type": "qwen2"}))
    code, err = _run_cli(["from-hf", str(qwen), str(tmp_path / "o1")], capsys)
    assert code == 2 and "model_type='qwen2' is not supported" in err and "Traceback" not in err
    assert "allowed: 'llama' (LlamaForCausalLM), 'mistral' (MistralForCausalLM)" in err

    arch = tmp_path / "arch"
    shutil.copytree(llama, arch)
    (arch / "config.json").write_text(json.dumps(config | {"architectures": ["GPT2LMHeadModel"]}))
    code, err = _run_cli(["from-hf", str(arch), str(tmp_path / "o2")], capsys)
    assert code == 2 and "architectures=['GPT2LMHeadModel']" in err

    # Shapes that do not match the target config: the tensor is named.
    target = tmp_path / "target.yaml"
    tree = tiny_dict("rmsnorm", num_layers=2, ffn_hidden_size=128)
    import yaml

    target.write_text(yaml.safe_dump(tree))
    code, err = _run_cli(
        ["from-hf", str(llama), str(tmp_path / "o3"), "--config", str(target)], capsys
    )
    assert code == 2 and "tensor 'model.layers.0.mlp.down_proj.weight' has shape [64, 96]" in err
    assert "the target config expects [64, 128] (model.ffn_hidden_size=128" in err

    # A layout the model cannot be split into: the config key is named.
    code, err = _run_cli(["from-hf", str(llama), str(tmp_path / "o4"), "--tp", "4"], capsys)
    assert code == 2 and "model.num_kv_heads=2 is not divisible by parallel.tensor=4" in err
    code, err = _run_cli(["from-hf", str(llama), str(tmp_path / "o5"), "--pp", "3"], capsys)
    assert code == 2 and "model.num_layers=2 is not divisible by parallel.pipeline=3" in err
    assert not (tmp_path / "o4").exists() and not (tmp_path / "o5").exists()

    # An output folder that holds something is only replaced with --force.
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy/run.txt").write_text("x")
    code, err = _run_cli(["from-hf", str(llama), str(tmp_path / "busy")], capsys)
    assert code == 2 and "is not empty; pass --force" in err
    code, _ = _run_cli(["from-hf", str(llama), str(tmp_path / "busy"), "--force"], capsys)
    assert code == 0 and not (tmp_path / "busy/run.txt").exists()
    assert ckpt.resolve(tmp_path / "busy").name == "step_0000000"

    # An unsupported LLaMA variant: the key is named.
    scaled = tmp_path / "scaled"
    shutil.copytree(llama, scaled)
    (scaled / "config.json").write_text(json.dumps(config | {"attention_bias": True}))
    code, err = _run_cli(["from-hf", str(scaled), str(tmp_path / "o6")], capsys)
    assert code == 2 and "attention_bias=True is not supported" in err

    # A missing tensor is named.
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    shutil.copytree(llama, broken)
    tensors = load_file(broken / "model.safetensors")
    del tensors["model.layers.1.self_attn.k_proj.weight"]
    save_file(tensors, broken / "model.safetensors")
    code, err = _run_cli(["from-hf", str(broken), str(tmp_path / "o7")], capsys)
    assert code == 2 and "tensor 'model.layers.1.self_attn.k_proj.weight' is missing" in err


def test_export_refuses_a_non_empty_output_and_bad_options(tmp_path, capsys):
    cfg = _cfg("rmsnorm", tp=1, pp=1)
    write_checkpoint(_random_full(cfg), cfg, tmp_path / "src", progress=False)
    out = tmp_path / "hf"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    code, err = _run_cli(["to-hf", str(tmp_path / "src"), str(out)], capsys)
    assert code == 2 and "is not empty; pass --force" in err
    assert (out / "keep.txt").exists()
    code, err = _run_cli(
        ["to-hf", str(tmp_path / "src"), str(out), "--max-shard-size", "lots"], capsys
    )
    assert code == 2 and "--max-shard-size 'lots'" in err
    code, err = _run_cli(["to-hf", str(tmp_path / "nowhere"), str(out)], capsys)
    assert code == 2 and "does not exist" in err
    code, _ = _run_cli(["to-hf", str(tmp_path / "src"), str(out), "--force"], capsys)
    assert code == 0 and not (out / "keep.txt").exists() and (out / "model.safetensors").exists()
    assert not out.with_name("hf.tmp").exists()


# ---- LLaMA-family imports: LLaMA-3.x (llama3 RoPE, tied embeddings), TinyLlama, Mistral ----------


def test_llama3_rope_equals_transformers_beyond_the_original_context():
    """Our llama3-scaled inverse frequencies and cos/sin tables equal transformers' bit for bit,
    at positions up to 4× original_max_position_embeddings, with all three bands present."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from megatron_dyt.model.rope import rope_cos_sin, rope_inv_freq

    params = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0)
    params["original_max_position_embeddings"] = 64
    hf_cfg = LlamaConfig(
        hidden_size=256,
        num_attention_heads=4,  # head_dim 64: 32 frequencies
        max_position_embeddings=256,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, **params},
    )
    theirs = LlamaRotaryEmbedding(hf_cfg)
    scaling = RopeScalingConfig(type="llama3", **params)
    cpu = torch.device("cpu")
    inv_freq = rope_inv_freq(64, 500000.0, cpu, scaling)
    assert torch.equal(inv_freq, theirs.inv_freq)
    ratio = inv_freq / rope_inv_freq(64, 500000.0, cpu)
    kept, divided = ratio == 1, ratio == 1 / 8
    assert kept.any() and divided.any() and (~kept & ~divided).any()  # every band is tested
    positions = torch.arange(256)[None]
    cos, sin = theirs(torch.zeros(1, 1, 64), positions)
    our_cos, our_sin = rope_cos_sin(256, 64, 500000.0, cpu, scaling)
    assert torch.equal(our_cos[:, 0, 0], cos[0]) and torch.equal(our_sin[:, 0, 0], sin[0])


def test_rope_scaling_config_is_validated():
    from megatron_dyt.config import ConfigError, load_config

    tree = tiny_dict("rmsnorm", rope_scaling={"type": "yarn", "factor": 4.0})
    with pytest.raises(ConfigError, match=r"model\.rope_scaling\.type='yarn'.*'none' or 'llama3'"):
        config_from_dict(tree)
    tree = tiny_dict("rmsnorm", rope_scaling={"type": "llama3", "high_freq_factor": 1.0})
    with pytest.raises(ConfigError, match="high_freq_factor=1.0 must be > low_freq_factor=1.0"):
        config_from_dict(tree)
    tree = tiny_dict("rmsnorm", rope_scaling={"type": "llama3", "factor": 0.5})
    with pytest.raises(ConfigError, match=r"model\.rope_scaling\.factor=0\.5"):
        config_from_dict(tree)
    assert config_from_dict(tiny_dict("rmsnorm")).model.rope_scaling.type == "none"
    cfg = load_config(None, ["model.rope_scaling.type=llama3", "model.rope_scaling.factor=32"])
    assert (cfg.model.rope_scaling.type, cfg.model.rope_scaling.factor) == ("llama3", 32.0)


_LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 32.0,  # Llama 3.2's values, with the original context shrunk to the test's
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}


def _save(model, path: Path, *, transformers4_rope: bool = False) -> Path:
    """save_pretrained; `transformers4_rope`: config.json's RoPE rewritten as 4.x writes it
    (and Llama 3.x folders on the Hub hold it): rope_theta and rope_scaling, no rope_parameters."""
    model.save_pretrained(path)
    if transformers4_rope:
        config = json.loads((path / "config.json").read_text())
        rope = config.pop("rope_parameters")
        config["rope_theta"] = rope.pop("rope_theta")
        config["rope_scaling"] = rope
        (path / "config.json").write_text(json.dumps(config))
    return path


def _logits_of(model, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(tokens).logits


@pytest.mark.slow  # a 128,256-row vocabulary through import, our model, export and transformers
@pytest.mark.parametrize("form", ["transformers5", "transformers4"])
def test_llama3_with_tied_embeddings_imports_and_exports_with_the_same_logits(form, tmp_path):
    """LLaMA-3.2-shaped: vocab 128,256, GQA, rope_theta 5·10⁵, llama3 RoPE scaling, tied
    embeddings. Import (untied, with a notice) → our logits = transformers'; export → a stock
    LlamaForCausalLM with the same logits; positions run past the original context."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from megatron_dyt.convert.from_hf import ConvertNotice

    torch.manual_seed(5)
    hf_cfg = LlamaConfig(
        vocab_size=128256,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
        rope_parameters={**_LLAMA3_ROPE, "rope_theta": 500000.0},
        tie_word_embeddings=True,
        initializer_range=0.1,  # attention that depends on the positions (0.02: nearly uniform)
    )
    model = LlamaForCausalLM(hf_cfg).eval()
    hf_dir = _save(model, tmp_path / "llama3", transformers4_rope=form == "transformers4")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        folder = import_from_hf(hf_dir, tmp_path / "ours", tp=2, progress=False)
    notices = [str(w.message) for w in caught if issubclass(w.category, ConvertNotice)]
    assert any("tie_word_embeddings=true" in n for n in notices)
    assert not any("padded" in n for n in notices)  # 128,256 = 1002 × 128: no padding at TP=2
    cfg = ckpt.read_config(folder)
    scaling = cfg.model.rope_scaling
    assert (scaling.type, scaling.factor, scaling.original_max_position_embeddings) == (
        "llama3",
        32.0,
        16,
    )
    assert cfg.padded_vocab_size == 128256 and cfg.model.rope_theta == 500000.0
    tokens = torch.randint(0, 128256, (2, 48), generator=torch.Generator().manual_seed(6))
    theirs = _logits_of(model, tokens)
    full = _full(folder)
    ours = _our_logits(full, cfg, tokens)
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)
    # The scaling matters here: plain RoPE gives other logits.
    plain = cfg.model_copy(
        update={"model": cfg.model.model_copy(update={"rope_scaling": RopeScalingConfig()})}
    )
    assert (_our_logits(full, plain, tokens) - theirs).abs().max() > 100 * ATOL

    export_to_hf(folder, tmp_path / "export", progress=False)
    config = json.loads((tmp_path / "export/config.json").read_text())
    assert config["tie_word_embeddings"] is False and "auto_map" not in config
    assert config["rope_scaling"] == dict(_LLAMA3_ROPE)
    assert config["rope_parameters"] == {**_LLAMA3_ROPE, "rope_theta": 500000.0}
    back = LlamaForCausalLM.from_pretrained(tmp_path / "export")
    torch.testing.assert_close(_logits_of(back, tokens), theirs, atol=ATOL, rtol=0)


def test_llama3_rope_in_the_dyt_modeling_code(tmp_path):
    """A DyT model with llama3 RoPE scaling, exported with our modeling code: transformers
    computes our logits (its RoPE reads the same rope_scaling), and plain RoPE would not."""
    from transformers import AutoModelForCausalLM

    scaling = {k: v for k, v in _LLAMA3_ROPE.items() if k != "rope_type"}
    cfg = _cfg("dyt", tp=1, pp=1, seq_length=64, rope_scaling={"type": "llama3", **scaling})
    full = _random_full(cfg)
    # Activations of order 1 and sharp attention, so that the positions matter.
    full["embedding.word.weight"] *= 20
    for i in range(cfg.model.num_layers):
        full[f"layers.{i}.attention.qkv.weight"] *= 8
    write_checkpoint(full, cfg, tmp_path / "src", progress=False)
    export_to_hf(tmp_path / "src", tmp_path / "export", progress=False)
    assert (tmp_path / "export/modeling_megatron_dyt.py").is_file()
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "export", trust_remote_code=True)
    tokens = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(8))
    ours = _our_logits(full, cfg, tokens)
    theirs = _logits_of(model, tokens)
    torch.testing.assert_close(theirs, ours, atol=ATOL, rtol=0)
    plain = cfg.model_copy(
        update={"model": cfg.model.model_copy(update={"rope_scaling": RopeScalingConfig()})}
    )
    assert (_our_logits(full, plain, tokens) - theirs).abs().max() > 100 * ATOL


def test_tinyllama_shaped_gqa_imports_and_exports_with_the_same_logits(tmp_path):
    """TinyLlama's attention (32 query heads sharing 4 key/value heads) at TP=2, PP=2."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(9)
    hf_cfg = LlamaConfig(
        vocab_size=512,
        hidden_size=128,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=32,
        num_key_value_heads=4,
        max_position_embeddings=64,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
    )
    model = LlamaForCausalLM(hf_cfg).eval()
    hf_dir = _save(model, tmp_path / "tinyllama")
    folder = import_from_hf(hf_dir, tmp_path / "ours", tp=2, pp=2, progress=False)
    cfg = ckpt.read_config(folder)
    assert (cfg.model.num_heads, cfg.model.kv_heads, cfg.model.rope_scaling.type) == (32, 4, "none")
    tokens = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(10))
    theirs = _logits_of(model, tokens)
    torch.testing.assert_close(_our_logits(_full(folder), cfg, tokens), theirs, atol=ATOL, rtol=0)
    export_to_hf(folder, tmp_path / "export", progress=False)
    back = LlamaForCausalLM.from_pretrained(tmp_path / "export")
    torch.testing.assert_close(_logits_of(back, tokens), theirs, atol=ATOL, rtol=0)


@pytest.mark.parametrize("window", [None, 4096, 32])
def test_mistral_without_a_short_sliding_window_is_llama(window, tmp_path):
    """MistralForCausalLM with no window, or one no shorter than the sequence (32: exactly the
    32 tokens imported with model.seq_length=32): the same function as LLaMA; imported, and
    exported as a stock LlamaForCausalLM with equal logits."""
    from transformers import LlamaForCausalLM, MistralConfig, MistralForCausalLM

    torch.manual_seed(11)
    hf_cfg = MistralConfig(
        vocab_size=384,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=64,
        rope_theta=1000000.0,
        sliding_window=window,
    )
    model = MistralForCausalLM(hf_cfg).eval()
    hf_dir = _save(model, tmp_path / "mistral")
    assert json.loads((hf_dir / "config.json").read_text())["model_type"] == "mistral"
    overrides = ["model.seq_length=32"] if window == 32 else []
    folder = import_from_hf(hf_dir, tmp_path / "ours", overrides=overrides, tp=2, progress=False)
    cfg = ckpt.read_config(folder)
    assert cfg.model.rope_theta == 1e6 and cfg.model.seq_length == (32 if window == 32 else 64)
    tokens = torch.randint(0, 384, (2, 32), generator=torch.Generator().manual_seed(12))
    theirs = _logits_of(model, tokens)
    torch.testing.assert_close(_our_logits(_full(folder), cfg, tokens), theirs, atol=ATOL, rtol=0)
    export_to_hf(folder, tmp_path / "export", progress=False)
    back = LlamaForCausalLM.from_pretrained(tmp_path / "export")
    torch.testing.assert_close(_logits_of(back, tokens), theirs, atol=ATOL, rtol=0)


def _edited(src: Path, dst: Path, **changes) -> Path:
    """A copy of HF folder `src` whose config.json has `changes` (None deletes a key)."""
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text()) | changes
    config = {k: v for k, v in config.items() if v is not None or k not in changes}
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def test_unsupported_llama_family_configs_are_one_clear_error(tmp_path, capsys):
    from transformers import MistralConfig, MistralForCausalLM

    llama = _small_llama(tmp_path / "llama", max_position_embeddings=64)
    rope3 = {**_LLAMA3_ROPE, "rope_theta": 500000.0}
    cases = [
        ({"rope_scaling": {"type": "yarn", "factor": 4.0}}, "rope_scaling rope_type='yarn'"),
        (
            {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}},
            "rope_parameters rope_type='linear' is not supported; allowed: 'default' (plain"
            " RoPE), 'llama3'",
        ),
        (
            {"rope_scaling": {k: v for k, v in rope3.items() if k != "factor"}},
            "rope_scaling.factor=None: rope_type 'llama3' needs a number",
        ),
        (
            {"rope_parameters": {**rope3, "high_freq_factor": 0.5}},
            "model.rope_scaling: high_freq_factor=0.5 must be > low_freq_factor=1.0",
        ),
        ({"partial_rotary_factor": 0.5}, "partial_rotary_factor=0.5 is not supported"),
        ({"mlp_bias": True}, "mlp_bias=True is not supported"),
        ({"head_dim": 32}, "head_dim=32 × num_attention_heads=4 != hidden_size=64"),
        (
            {"architectures": ["Qwen2ForCausalLM"]},
            "architectures=['Qwen2ForCausalLM'] is not supported; allowed: LlamaForCausalLM,"
            " MistralForCausalLM",
        ),
        ({"model_type": "gemma"}, "model_type='gemma' is not supported"),
    ]
    for i, (changes, message) in enumerate(cases):
        bad = _edited(llama, tmp_path / f"bad{i}", **changes)
        code, err = _run_cli(["from-hf", str(bad), str(tmp_path / f"o{i}")], capsys)
        assert code == 2 and message in err and "Traceback" not in err, (changes, err)
        assert err.count("error:") == 1 and not (tmp_path / f"o{i}").exists()

    # A real sliding window: refused at the model's own length, imported at one it masks nothing.
    mistral = tmp_path / "mistral"
    small = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, vocab_size=256)
    hf_cfg = MistralConfig(
        **small,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        sliding_window=16,
    )
    MistralForCausalLM(hf_cfg).save_pretrained(mistral)
    code, err = _run_cli(["from-hf", str(mistral), str(tmp_path / "m1")], capsys)
    assert code == 2 and "Traceback" not in err
    assert "sliding_window=16 is shorter than model.seq_length=64" in err
    assert "model.seq_length=16" in err
    code, err = _run_cli(
        ["from-hf", str(mistral), str(tmp_path / "m2"), "model.seq_length=16"], capsys
    )
    assert code == 0, err
    assert ckpt.read_config(ckpt.resolve(tmp_path / "m2")).model.seq_length == 16


# ---- from the local Hugging Face cache ----------------------------------------------------------


def _fake_hub_cache(hf_dir: Path, cache: Path, repo: str, commit: str) -> Path:
    """`repo` at `commit` laid out as huggingface_hub caches it: blobs, a snapshot of links to
    them, refs/main. Returns the snapshot folder."""
    import hashlib

    root = cache / ("models--" + repo.replace("/", "--"))
    snapshot = root / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (root / "blobs").mkdir()
    for path in hf_dir.iterdir():
        blob = root / "blobs" / hashlib.sha256(path.read_bytes()).hexdigest()
        shutil.copy2(path, blob)
        (snapshot / path.name).symlink_to(Path("../..") / "blobs" / blob.name)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(commit)
    return snapshot


def test_import_of_a_repo_id_from_the_local_cache(tmp_path, capsys, monkeypatch):
    """`from-hf ORG/NAME` reads the snapshot refs/main names in HF_HUB_CACHE (no network: a
    missing repo is an error naming the folder looked in); the weights equal a folder import."""
    llama = _small_llama(tmp_path / "llama", tie_word_embeddings=True)
    cache, commit = tmp_path / "hub", "0123456789abcdef0123456789abcdef01234567"
    _fake_hub_cache(llama, cache, "some-org/tiny-llama", commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.chdir(tmp_path)  # no local folder some-org/tiny-llama
    code, err = _run_cli(["from-hf", "some-org/tiny-llama", str(tmp_path / "cached")], capsys)
    assert code == 0, err
    folder = ckpt.resolve(tmp_path / "cached")
    assert ckpt.read_config(folder).model.name == "tiny-llama"
    with pytest.warns(UserWarning, match="ties its output head"):
        direct = import_from_hf(llama, tmp_path / "direct", progress=False)
    _assert_identical(_full(folder), _full(direct))
    code, err = _run_cli(
        ["from-hf", "some-org/tiny-llama", str(tmp_path / "pinned"), "--revision", commit],
        capsys,
    )
    assert code == 0, err

    code, err = _run_cli(["from-hf", "some-org/missing", str(tmp_path / "o1")], capsys)
    assert code == 2 and "Traceback" not in err
    assert "the Hugging Face cache has no snapshot of some-org/missing at revision 'main'" in err
    assert f"looked in '{cache / 'models--some-org--missing'}'" in err
    code, err = _run_cli(
        ["from-hf", "some-org/tiny-llama", str(tmp_path / "o2"), "--revision", "v2"], capsys
    )
    assert code == 2 and "no snapshot of some-org/tiny-llama at revision 'v2'" in err
    code, err = _run_cli(["from-hf", "not/a/repo", str(tmp_path / "o3")], capsys)
    assert code == 2 and "'not/a/repo' is not a folder" in err
    assert not any((tmp_path / f"o{i}").exists() for i in (1, 2, 3))


def test_import_and_export_stream_tensor_by_tensor(tmp_path, monkeypatch):
    """A 70B import must not hold the model: at PP>1 `convert from-hf` reads every HF tensor
    exactly once, layer after layer, and the export reads each checkpoint tensor (merging its TP
    shards) once, in HF order; the round trip stays exact."""
    import re

    from megatron_dyt.checkpoint.reader import FullWeights
    from megatron_dyt.convert.from_hf import HFWeights

    cfg = _cfg("dyt", tp=2, pp=2)
    source = _random_full(cfg)
    write_checkpoint(source, cfg, tmp_path / "src", progress=False)
    exported: list[str] = []
    monkeypatch.setattr(
        FullWeights,
        "__getitem__",
        lambda self, name, real=FullWeights.__getitem__: exported.append(name) or real(self, name),
    )
    export_to_hf(tmp_path / "src", tmp_path / "hf", progress=False, max_shard_size="20KB")
    assert len(list((tmp_path / "hf").glob("model-*-of-*.safetensors"))) > 2
    assert sorted(exported) == sorted(source)  # each once (q, k, v share one qkv read)
    imported: list[str] = []
    monkeypatch.setattr(
        HFWeights,
        "__getitem__",
        lambda self, name, real=HFWeights.__getitem__: imported.append(name) or real(self, name),
    )
    folder = import_from_hf(tmp_path / "hf", tmp_path / "back", tp=2, pp=2, progress=False)
    hf_names = json.loads((tmp_path / "hf/model.safetensors.index.json").read_text())
    assert sorted(imported) == sorted(hf_names["weight_map"])  # every tensor once
    layers = [int(m.group(1)) for n in imported if (m := re.match(r"model\.layers\.(\d+)\.", n))]
    assert layers == sorted(layers)  # layer by layer: one layer's tensors held at a time
    _assert_identical(source, _full(folder))
