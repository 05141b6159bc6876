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
from megatron_dyt.config import config_from_dict
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
    mistral = tmp_path / "mistral"
    shutil.copytree(llama, mistral)
    config = json.loads((mistral / "config.json").read_text())
    (mistral / "config.json").write_text(json.dumps(config | {"model_type": "mistral"}))
    code, err = _run_cli(["from-hf", str(mistral), str(tmp_path / "o1")], capsys)
    assert code == 2 and "model_type='mistral' is not supported" in err and "Traceback" not in err

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
