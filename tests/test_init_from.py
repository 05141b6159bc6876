"""`train.init_from`: a fresh run from another model's weights, at any layout.

The first loss of such a run equals the source model's loss on the same batch, computed here
independently; the optimizer, the lr schedule and the data position start at 0; resuming
ignores init_from; an RMSNorm source converts to DyT; bad sources are one clear error.
"""

from __future__ import annotations

import json
from pathlib import Path

import distributed
import pytest
import torch
from common import tiny_dict, train_dict, train_worker

from megatron_dyt import checkpoint as ckpt
from megatron_dyt import parallel
from megatron_dyt.checkpoint import write_checkpoint
from megatron_dyt.config import config_from_dict
from megatron_dyt.training.init_from import InitFromError, load_init_weights
from megatron_dyt.training.schedule import lr_factor


def _source_loss(cfg_dict: dict, source: str) -> float:
    """The loss of `source`'s weights on data batch 0 of `cfg_dict`'s run, by hand: the
    checkpoint read merged, a plain `LlamaModel`, the step's micro-batches averaged."""
    from megatron_dyt.config import config_from_dict
    from megatron_dyt.data import build_datasets, resolve_data
    from megatron_dyt.layout import batch_layout
    from megatron_dyt.model import LlamaModel, load_full_state_dict
    from megatron_dyt.training.batches import StepBatches

    cfg = config_from_dict(cfg_dict)
    parallel.setup(cfg.parallel)
    layout = batch_layout(cfg, 1)
    tokenizer, _, _ = resolve_data(cfg)
    train_ds, _ = build_datasets(cfg, tokenizer, cfg.train.train_steps * layout.global_batch, 1)
    folder = ckpt.resolve(source)
    model = LlamaModel(cfg).eval()
    load_full_state_dict(model, ckpt.read_full_state_dict(folder, ckpt.read_config(folder)))
    with torch.no_grad():
        batches = StepBatches(train_ds, layout, 0, torch.device("cpu")).for_step(0)
        return torch.stack([model(t, lab) for t, lab in batches]).mean().item()


def _adam_step(run: Path) -> int:
    """The AdamW step counter of the run's latest checkpoint (one tensor's state)."""
    from megatron_dyt.checkpoint.reader import read_stage

    folder = ckpt.resolve(run)
    cfg = ckpt.read_config(folder)
    states = read_stage(folder, cfg, ckpt.saved_layout(folder, cfg), 0)
    return states["layers.0.mlp.down.weight"].step


@pytest.fixture(scope="module")
def source(corpus, tmp_path_factory) -> Path:
    """A DyT run trained 3 steps (one process), so its weights and optimizer are not fresh."""
    tmp = tmp_path_factory.mktemp("source")
    cfg = train_dict(corpus, train_steps=3)
    distributed.run(train_worker, 1, cfg, str(tmp / "run"), tmp_path=tmp)
    return tmp / "run"


@pytest.fixture(scope="module")
def expected_first_loss(corpus, source, tmp_path_factory) -> float:
    cfg = train_dict(corpus, train_steps=4)
    tmp = tmp_path_factory.mktemp("loss")
    return distributed.run(_source_loss, 1, cfg, str(source), tmp_path=tmp)[0]


@pytest.mark.distributed
def test_init_from_starts_fresh_from_the_weights(corpus, source, expected_first_loss, tmp_path):
    cfg = train_dict(corpus, train_steps=4, init_from=str(source))
    run = tmp_path / "run"
    first = distributed.run(train_worker, 1, cfg, str(run), 2, tmp_path=tmp_path)[0]
    assert sorted(first["losses"]) == [1, 2]  # step 0 onwards, not the source's step 3
    assert first["losses"][1] == pytest.approx(expected_first_loss, rel=1e-5)
    # a fresh lr schedule: step 1 ran at the warm-up's first lr, which the source had passed
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    lr1 = next(r["lr"] for r in records if r.get("step") == 1 and "lr" in r)
    assert lr1 == pytest.approx(2e-2 * lr_factor(0, 2, 4, 0.1))
    assert _adam_step(run) == 2  # a fresh optimizer: 2 steps, not the source's 3 + 2
    assert ckpt.read_complete(ckpt.resolve(run))["data_cursor"] == 2

    # Run again: the run folder has a checkpoint now, so it resumes and ignores init_from.
    second = distributed.run(train_worker, 1, cfg, str(run), tmp_path=tmp_path / "again")[0]
    assert sorted(second["losses"]) == [3, 4]
    assert _adam_step(run) == 4


@pytest.mark.distributed
@pytest.mark.parametrize(
    "tp, pp, zero", [(2, 1, 1), (1, 2, 1), (1, 1, 3)], ids=["tp2", "pp2", "dp2-zero3"]
)
def test_init_from_at_another_layout(corpus, source, expected_first_loss, tmp_path, tp, pp, zero):
    """Source saved at DP1 ZeRO-1 (one process); the new run at TP=2, PP=2 or DP=2 with ZeRO-3
    (its parameters partitioned as they are built, before the weights are loaded) on 2
    processes."""
    cfg = train_dict(corpus, tp=tp, pp=pp, zero=zero, train_steps=2, init_from=str(source))
    ranks = distributed.run(train_worker, 2, cfg, str(tmp_path / "run"), 1, tmp_path=tmp_path)
    for r in ranks:
        assert r["losses"][1] == pytest.approx(expected_first_loss, rel=1e-5)


@pytest.mark.distributed
def test_init_from_a_zero3_checkpoint(corpus, expected_first_loss, tmp_path):
    """Source saved by a DP=2 ZeRO-3 run (flat partitions, read whole); the new run at DP1
    ZeRO-1 in one process."""
    src = train_dict(corpus, zero=3, train_steps=3)  # the `source` run, at DP=2 with ZeRO-3
    distributed.run(train_worker, 2, src, str(tmp_path / "src"), tmp_path=tmp_path / "s")
    assert ckpt.saved_layout(ckpt.resolve(tmp_path / "src")).zero_stage == 3
    cfg = train_dict(corpus, train_steps=2, init_from=str(tmp_path / "src"))
    expected = distributed.run(_source_loss, 1, cfg, str(tmp_path / "src"), tmp_path=tmp_path)[0]
    first = distributed.run(train_worker, 1, cfg, str(tmp_path / "run"), 1, tmp_path=tmp_path)
    assert first[0]["losses"][1] == pytest.approx(expected, rel=1e-5)
    # ZeRO-3 at DP=2 trains as ZeRO-1 at DP=1 does (test_training): the same weights as the
    # `source` run's, which a reader of ZeRO-3 checkpoints that mixed tensors up would not give
    assert expected == pytest.approx(expected_first_loss, rel=1e-5)


# ---- loading, without the trainer --------------------------------------------------------------


def _cfg(kind: str = "dyt", **train):
    tree = tiny_dict(kind)
    tree["model"]["norm"]["backend"] = "torch"
    tree["train"].update(precision="fp32", **train)
    return config_from_dict(tree)


def _random_checkpoint(cfg, run: Path) -> dict[str, torch.Tensor]:
    from megatron_dyt.info import build_meta_model
    from megatron_dyt.model import canonical_parameters
    from megatron_dyt.model.sharding import full_shape

    gen = torch.Generator().manual_seed(0)
    full = {}
    for name, param in canonical_parameters(build_meta_model(cfg)):
        full[name] = torch.randn(full_shape(name, param.shape, 1), generator=gen).abs() + 0.1
    write_checkpoint(full, cfg, run, progress=False)
    return full


def _loaded(cfg) -> dict[str, torch.Tensor]:
    from megatron_dyt.model import LlamaModel, full_state_dict

    parallel.init_distributed("gloo")
    parallel.initialize_model_parallel(cfg.parallel)
    model = LlamaModel(cfg)
    load_init_weights(model, cfg)
    return full_state_dict(model)


def test_rmsnorm_source_converts_to_dyt(tmp_path):
    source = _random_checkpoint(_cfg("rmsnorm"), tmp_path / "rms")
    cfg = _cfg("dyt", init_from=str(tmp_path / "rms"), init_from_convert_norms=True)
    got = _loaded(cfg)
    for name, tensor in source.items():
        assert torch.equal(got[name], tensor), name
    assert got["layers.1.attention_norm.alpha"].item() == pytest.approx(0.8)
    assert got["layers.1.mlp_norm.alpha"].item() == pytest.approx(0.3)
    assert got["output.norm.alpha"].item() == pytest.approx(0.4)
    assert got["embedding.scale"].item() == 1.0  # not √d: the blocks know the embeddings' scale


def test_hf_folder_source(tmp_path):
    """A Hugging Face folder (our export) gives back the weights it was exported from."""
    from megatron_dyt.convert.to_hf import export_to_hf

    cfg = _cfg("dyt")
    source = _random_checkpoint(cfg, tmp_path / "run")
    export_to_hf(tmp_path / "run", tmp_path / "hf", progress=False)
    got = _loaded(_cfg("dyt", init_from=str(tmp_path / "hf")))
    assert sorted(got) == sorted(source)
    for name, tensor in source.items():
        assert torch.equal(got[name], tensor), name


@pytest.mark.parametrize(
    "kind, train, model, message",
    [
        (
            "dyt",
            {},
            {"ffn_hidden_size": 128},
            "tensor 'layers.0.mlp.gate_up.weight' has shape [192, 64], the model expects [256, 64]",
        ),
        ("dyt", {}, {"num_layers": 2}, "has tensor 'layers.2.attention.proj.weight', which"),
        ("dyt", {}, {"vocab_size": 300}, "has a vocabulary of 256 tokens; this run's"),
        ("rmsnorm", {}, {}, "has model.norm.kind='dyt', this run 'rmsnorm'"),
        ("dyt", {"init_from_convert_norms": True}, {}, "converts RMSNorm models, but"),
    ],
)
def test_bad_source_is_one_clear_error(tmp_path, kind, train, model, message):
    _random_checkpoint(_cfg("dyt"), tmp_path / "src")
    tree = tiny_dict(kind, **model)
    tree["model"]["norm"]["backend"] = "torch"
    tree["train"].update(precision="fp32", init_from=str(tmp_path / "src"), **train)
    with pytest.raises(InitFromError) as exc:
        _loaded(config_from_dict(tree))
    assert message in str(exc.value)


def test_rmsnorm_source_without_conversion_says_how(tmp_path):
    _random_checkpoint(_cfg("rmsnorm"), tmp_path / "rms")
    with pytest.raises(InitFromError, match="set train.init_from_convert_norms=true"):
        _loaded(_cfg("dyt", init_from=str(tmp_path / "rms")))


def test_config_checks():
    with pytest.raises(ValueError, match="init_from_convert_norms=true needs init_from"):
        _cfg("dyt", init_from_convert_norms=True)
    with pytest.raises(ValueError, match="model.norm.kind='rmsnorm'; allowed: 'dyt', 'derf'"):
        _cfg("rmsnorm", init_from="x", init_from_convert_norms=True)
    with pytest.raises(InitFromError, match="train.init_from='/no/such' does not exist"):
        _loaded(_cfg("dyt", init_from="/no/such"))
