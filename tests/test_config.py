"""Config loading, overrides, round trips and the validation errors users see."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from megatron_dyt.cli import main
from megatron_dyt.config import (
    Config,
    ConfigError,
    ScheduleWarning,
    VocabPaddedWarning,
    config_from_dict,
    load_config,
    load_tree,
)

ROOT = Path(__file__).resolve().parents[1]
PRESETS = sorted((ROOT / "configs").glob("*.yaml"))


def test_presets_exist():
    names = {p.stem for p in PRESETS}
    for size in ("7b", "13b", "34b", "70b"):
        assert {f"llama-{size}-dyt", f"llama-{size}-rmsnorm"} <= names
    assert {"tiny-dyt", "tiny-rmsnorm"} <= names


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.stem)
def test_round_trip(path, tmp_path):
    cfg = load_config(path)
    text = cfg.to_yaml()
    dumped = tmp_path / "dump.yaml"
    dumped.write_text(text)
    again = load_config(dumped)
    assert again == cfg
    assert again.to_yaml() == text  # the dump is a fixed point, key order included

    # Every key the preset wrote survives with its value.
    def leaves(tree, prefix=""):
        for k, v in tree.items():
            if isinstance(v, dict):
                yield from leaves(v, f"{prefix}{k}.")
            else:
                yield f"{prefix}{k}", v

    full = dict(leaves(yaml.safe_load(text)))
    for key, value in leaves(load_tree(path)):  # the file and its bases
        assert full[key] == value, key


def test_llama_presets_are_short():
    """The shared recipe lives in configs/base/llama.yaml; a preset says only what is its own."""
    llama = [p for p in PRESETS if p.stem.startswith("llama-")]
    assert len(llama) == 8
    for path in llama:
        assert len(path.read_text().splitlines()) <= 15, path.name
        assert "base" in yaml.safe_load(path.read_text()), path.name


def test_paper_recipe_in_dyt_presets():
    expected = {
        "7b": (0.8, 0.2, 3e-4),
        "13b": (0.6, 0.15, 3e-4),
        "34b": (0.2, 0.05, 1.5e-4),
        "70b": (0.2, 0.05, 1.5e-4),
    }
    for size, (a_attn, a_other, lr) in expected.items():
        cfg = load_config(ROOT / f"configs/llama-{size}-dyt.yaml")
        n = cfg.model.norm
        assert (n.kind, n.alpha_attn, n.alpha_mlp, n.alpha_final, n.beta) == (
            "dyt",
            a_attn,
            a_other,
            a_other,
            False,
        )
        assert cfg.model.embedding_scale and cfg.train.lr == lr
        assert cfg.train.weight_decay_policy == "all"
        twin = load_config(ROOT / f"configs/llama-{size}-rmsnorm.yaml")
        assert twin.model.norm.kind == "rmsnorm" and not twin.model.embedding_scale
        assert twin.model.model_dump(
            exclude={"norm", "embedding_scale", "name"}
        ) == cfg.model.model_dump(exclude={"norm", "embedding_scale", "name"})
        assert twin.parallel == cfg.parallel
        assert 8 % (cfg.parallel.tensor) == 0  # TP stays inside an 8-GPU node


def test_overrides():
    cfg = load_config(
        ROOT / "configs/llama-7b-dyt.yaml",
        [
            "model.norm.alpha_attn=0.5",
            "train.lr=1e-4",
            "parallel.tensor=4",
            "model.norm.squash=hardtanh",
            "data.paths=[a, b]",
        ],
    )
    assert cfg.model.norm.alpha_attn == 0.5
    assert cfg.train.lr == 1e-4
    assert cfg.parallel.tensor == 4
    assert cfg.model.norm.squash == "hardtanh"
    assert cfg.data.paths == ["a", "b"]


def test_warmup_default_follows_the_paper():
    assert load_config(None, ["train.train_steps=100000"]).warmup_steps == 2000
    assert load_config(None, ["train.train_steps=1000"]).warmup_steps == 50
    assert load_config(None, ["train.warmup_steps=7"]).warmup_steps == 7


def test_a_saved_run_config_breaking_a_newer_rule_still_loads(tmp_path):
    """Rules added after a run was written (demo with paths, squash on RMSNorm) refuse new
    configs, but the run's own config.yaml still loads, so its checkpoints stay usable."""
    from megatron_dyt.checkpoint import read_config
    from megatron_dyt.config import ConfigNotice

    tree = load_config(ROOT / "configs/tiny-rmsnorm.yaml").to_dict()
    tree["data"]["paths"] = ["some/prefix"]
    tree["model"]["norm"]["squash"] = "sigmoid"
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(tree))
    with pytest.raises(ConfigError, match="demo=true trains on the embedded demo corpus"):
        load_config(tmp_path / "config.yaml")
    with pytest.warns(ConfigNotice) as notes:
        cfg = read_config(tmp_path)
    assert cfg.data.paths == ["some/prefix"] and len(notes) == 2
    assert "accepted in a saved run's config" in str(notes[0].message)


def test_sequence_parallel_with_pipeline_is_refused_but_a_saved_run_still_reads(tmp_path, capsys):
    """SP + PP would corrupt activations silently (DeepSpeed's pipeline engine splits stage
    outputs over TP assuming identical activations): refused for `info` of the 70B preset as for
    training, one line and exit 2; a saved run's config with it still loads for export/eval."""
    from megatron_dyt.checkpoint import read_config
    from megatron_dyt.cli import main
    from megatron_dyt.config import ConfigNotice

    code = main(
        ["info", str(ROOT / "configs/llama-70b-dyt.yaml"), "parallel.sequence_parallel=true"]
    )
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "parallel.sequence_parallel=true cannot be combined with parallel.pipeline=4" in err
    tree = load_config(ROOT / "configs/llama-70b-dyt.yaml").to_dict()
    tree["parallel"]["sequence_parallel"] = True
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(tree))
    with pytest.warns(ConfigNotice, match="cannot be combined with parallel.pipeline=4"):
        assert read_config(tmp_path).parallel.sequence_parallel


@pytest.mark.parametrize("kind", ["dyt", "derf"])
def test_fp16_with_dyt_or_derf_is_refused_in_one_line_but_a_saved_run_still_reads(
    kind, tmp_path, capsys
):
    """dα sums over a whole activation and overflows fp16, and DeepSpeed's loss scaler would skip
    steps the trainer counts (docs/design.md §7): refused at validation, exit 2 with the values
    and what is allowed; fp16 stays allowed with RMSNorm/LayerNorm, and a saved run still reads."""
    from megatron_dyt.checkpoint import read_config
    from megatron_dyt.cli import main
    from megatron_dyt.config import ConfigNotice

    config = str(ROOT / "configs/tiny-dyt.yaml")
    code = main(["info", config, f"model.norm.kind={kind}", "train.precision=fp16"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    header, problem = err.splitlines()  # the config error's header and one line for the problem
    assert header == f"megatron-dyt: error: invalid config {config}:"
    assert problem.startswith(
        f"  train.precision='fp16' cannot be combined with model.norm.kind='{kind}': "
    )
    assert problem.endswith(
        "use train.precision bf16 or fp32 (auto: bf16 on a GPU) with dyt/derf, or fp16 with"
        " rmsnorm/layernorm"
    )
    for precision in ("bf16", "fp32", "auto"):
        load_config(config, [f"model.norm.kind={kind}", f"train.precision={precision}"])
    for other in ("rmsnorm", "layernorm"):
        load_config(config, [f"model.norm.kind={other}", "train.precision=fp16"])

    tree = load_config(config, [f"model.norm.kind={kind}"]).to_dict()
    tree["train"]["precision"] = "fp16"
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(tree))
    with pytest.warns(ConfigNotice, match="train.precision='fp16' cannot be combined"):
        assert read_config(tmp_path).train.precision == "fp16"


def test_warmup_longer_than_the_run_is_a_notice_not_an_error():
    with pytest.warns(
        ScheduleWarning, match="train.warmup_steps=30 is more than train.train_steps"
    ):
        cfg = load_config(ROOT / "configs/tiny-dyt.yaml", ["train.train_steps=2"])
    assert cfg.warmup_steps == 30


def test_vocab_is_padded_with_a_notice():
    with pytest.warns(VocabPaddedWarning, match="model.vocab_size=32001 padded to 32128"):
        cfg = load_config(None, ["model.vocab_size=32001"])
    assert cfg.padded_vocab_size == 32128
    # 32000 already divides by lcm(128, 8): no padding, published parameter counts hold.
    assert load_config(None, ["parallel.tensor=8"]).padded_vocab_size == 32000
    with pytest.warns(VocabPaddedWarning):
        cfg = load_config(
            None,
            [
                "model.vocab_size=1000",
                "model.make_vocab_size_divisible_by=1",
                "parallel.tensor=3",
                "model.num_heads=33",
                "model.hidden_size=4224",
                "model.ffn_hidden_size=3000",
            ],
        )
    assert cfg.padded_vocab_size == 1002


BAD = [
    (["model.hiden_size=10"], "unknown key 'model.hiden_size' (did you mean 'model.hidden_size'?)"),
    (["model.norm.alpha_atn=0.3"], "did you mean 'model.norm.alpha_attn'?"),
    (["parallel.tensor=3"], "model.num_heads=32 is not divisible by parallel.tensor=3"),
    (
        ["model.num_kv_heads=4", "parallel.tensor=8"],
        "model.num_kv_heads=4 is not divisible by parallel.tensor=8",
    ),
    (["parallel.pipeline=5"], "model.num_layers=32 is not divisible by parallel.pipeline=5"),
    (
        ["parallel.pipeline=2", "parallel.zero_stage=2"],
        "parallel.zero_stage=2 cannot be combined with parallel.pipeline=2",
    ),
    (["parallel.pipeline=2", "parallel.zero_stage=3"], "supports ZeRO stage 0 or 1 only"),
    (["model.norm.alpha_attn=0"], "alpha_attn=0.0: α₀ must be a finite number > 0"),
    (["model.norm.alpha_mlp=-0.5"], "alpha_mlp=-0.5: α₀ must be a finite number > 0"),
    (["model.norm.squash=relu"], "model.norm.squash='relu': Input should be 'tanh'"),
    (["model.norm.kind=batchnorm"], "model.norm.kind='batchnorm'"),
    (["parallel.zero_stage=4"], "parallel.zero_stage=4"),
    (["parallel.sequence_parallel=true"], "sequence_parallel=true needs parallel.tensor > 1"),
    (
        [
            "parallel.sequence_parallel=true",
            "parallel.tensor=8",
            "parallel.pipeline=4",
            "parallel.zero_stage=1",
        ],
        "parallel.sequence_parallel=true cannot be combined with parallel.pipeline=4",
    ),
    (
        ["parallel.sequence_parallel=true", "parallel.tensor=8", "model.seq_length=4100"],
        "model.seq_length=4100 is not divisible by parallel.tensor=8",
    ),
    (
        ["train.precision=bf16", "parallel.zero_stage=0"],
        "train.grad_accum_dtype='fp32' with train.precision='bf16' needs parallel.zero_stage >= 1",
    ),
    (
        ["train.precision=bf16", "train.grad_accum_dtype=fp16"],
        "gradients are summed in fp32 or in the training dtype ('fp32' or 'bf16')",
    ),
    (
        ["train.precision=fp16"],
        "train.precision='fp16' cannot be combined with model.norm.kind='dyt'",
    ),
    (["model.norm.eps=.nan"], "model.norm.eps=nan: Input should be a finite number"),
    (["model.norm.derf_shift=.inf"], "model.norm.derf_shift=inf: Input should be a finite"),
    (["train.lr=inf"], "train.lr='inf': Input should be a finite number"),
    (
        ["model.norm.kind=rmsnorm", "model.norm.squash=sigmoid"],
        "squash='sigmoid' applies to kind 'dyt' only, not 'rmsnorm'",
    ),
    (
        ["data.demo=true", "data.paths=[a,b]", "data.tokenizer=t.model"],
        "demo=true trains on the embedded demo corpus, but paths and tokenizer given too;"
        " set data.demo=false",
    ),
    (["data.split=0,100,0"], "split='0,100,0': the train share (the first) must be > 0"),
    (
        ["data.paths=[a,b]", "data.weights=[.inf,1]"],
        "data.weights.0=inf: Input should be a finite number",
    ),
    (["train.seed=-1"], "train.seed=-1: Input should be greater than or equal to 0"),
    (["train.seed=4294967296"], "train.seed=4294967296: Input should be less than 4294967296"),
    (["model.hidden_size=100"], "hidden_size=100 is not divisible by num_heads=32"),
    (["model.norm=3"], "'model.norm' is a section"),
    (["train.lr"], "is not KEY=VALUE"),
]


@pytest.mark.parametrize("overrides,message", BAD, ids=[b[1][:40] for b in BAD])
def test_invalid_configs_name_the_key_and_value(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(ROOT / "configs/llama-7b-dyt.yaml", overrides)
    assert message in str(err.value)


def test_unknown_key_in_a_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  num_layer: 4\ntrian:\n  lr: 1\n")
    with pytest.raises(ConfigError) as err:
        load_config(bad)
    text = str(err.value)
    assert "unknown key 'model.num_layer' (did you mean 'model.num_layers'?)" in text
    assert "unknown key 'trian' (did you mean 'train'?)" in text


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(tmp_path / "list.yaml")
    (tmp_path / "broken.yaml").write_text("model: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "broken.yaml")


@pytest.mark.parametrize("overrides,message", BAD[:9], ids=[b[1][:40] for b in BAD[:9]])
def test_cli_reports_config_errors_without_traceback(overrides, message, capsys):
    code = main(["info", str(ROOT / "configs/llama-7b-dyt.yaml"), *overrides])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err
    assert "Traceback" not in err


def test_cli_process_exit_code_and_clean_stderr(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "megatron_dyt",
            "info",
            str(ROOT / "configs/llama-7b-dyt.yaml"),
            "parallel.pipeline=2",
            "parallel.zero_stage=3",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "parallel.zero_stage=3 cannot be combined with parallel.pipeline=2" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stdout == ""


def test_defaults_are_valid():
    assert Config() == load_config(None)


# ---- base: inheritance ------------------------------------------------------------------------


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_base_chain_is_deep_merged_relative_to_each_file(tmp_path, monkeypatch):
    _write(
        tmp_path / "common/root.yaml",
        "model: {hidden_size: 256, num_heads: 4, norm: {kind: dyt, alpha_attn: 0.9, beta: false}}\n"
        "train: {lr: 1.0e-3, train_steps: 100}\n"
        "data: {paths: [a], split: '90,10,0'}\n",
    )
    _write(
        tmp_path / "common/mid.yaml",
        "base: root.yaml\nmodel: {num_layers: 4, norm: {alpha_mlp: 0.3}}\n",
    )
    top = _write(
        tmp_path / "presets/top.yaml",
        "base: ../common/mid.yaml\nmodel: {norm: {alpha_attn: 0.7}}\ndata: {paths: [b, c]}\n",
    )
    monkeypatch.chdir(_write(tmp_path / "elsewhere/x", "").parent)  # bases are not cwd-relative
    assert load_tree(top) == {
        "model": {
            "hidden_size": 256,
            "num_heads": 4,
            "num_layers": 4,
            "norm": {"kind": "dyt", "alpha_attn": 0.7, "alpha_mlp": 0.3, "beta": False},
        },
        "train": {"lr": 1e-3, "train_steps": 100},
        "data": {"paths": ["b", "c"], "split": "90,10,0"},  # a list is replaced, not merged
    }
    cfg = load_config(top, ["model.norm.alpha_mlp=0.4"])  # overrides go on top of the chain
    n = cfg.model.norm
    assert (n.kind, n.alpha_attn, n.alpha_mlp, n.beta) == ("dyt", 0.7, 0.4, False)
    assert (cfg.model.hidden_size, cfg.model.num_layers, cfg.train.lr) == (256, 4, 1e-3)
    assert "base" not in cfg.to_dict() and "base" not in yaml.safe_load(cfg.to_yaml())


def test_base_cycle_is_an_error_naming_the_files(tmp_path):
    _write(tmp_path / "a.yaml", "base: sub/b.yaml\n")
    _write(tmp_path / "sub/b.yaml", "base: ../a.yaml\ntrain: {lr: 1.0e-3}\n")
    with pytest.raises(ConfigError, match="config bases form a cycle") as err:
        load_config(tmp_path / "a.yaml")
    assert str(err.value).count("a.yaml") == 2 and "b.yaml" in str(err.value)
    _write(tmp_path / "self.yaml", "base: self.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_tree(tmp_path / "self.yaml")


def test_missing_or_bad_base_is_an_error_naming_the_files(tmp_path):
    _write(tmp_path / "top.yaml", "base: nowhere.yaml\n")
    with pytest.raises(ConfigError) as err:
        load_config(tmp_path / "top.yaml")
    text = str(err.value)
    assert "base config" in text and "nowhere.yaml" in text and "top.yaml" in text
    assert "does not exist" in text
    _write(tmp_path / "list.yaml", "base: [a.yaml]\n")
    with pytest.raises(ConfigError, match="'base' must be the path of a config file"):
        load_config(tmp_path / "list.yaml")


def test_an_unresolved_base_says_so():
    """A tree validated without a file (a sweep's base read as plain YAML) cannot follow `base`."""
    with pytest.raises(ConfigError, match="key 'base' was not resolved"):
        config_from_dict({"base": "llama.yaml"})
