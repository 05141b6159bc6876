"""Resharding: a TP=2 run resumed at TP=1/PP=2 and at DP=2 with its Adam state; bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import distributed
import pytest
import torch
import yaml
from common import train_dict
from common import train_worker as _train

from megatron_dyt.checkpoint import CheckpointError, read_full_state_dict
from megatron_dyt.checkpoint.format import UNIVERSAL_PARAMS as PARAMS
from megatron_dyt.checkpoint.reader import read_meta
from megatron_dyt.checkpoint.universal import convert_to_universal
from megatron_dyt.cli import main
from megatron_dyt.config import config_from_dict, load_config
from megatron_dyt.convert.reshard import reshard_checkpoint
from megatron_dyt.training.trainer import TrainingError, _check_resume_layout, prepare_run_dir

N = 10  # steps before the reshard and after it (the 10 + 10)
# A layout change only reorders floating-point sums (TP splits the matmuls, DP the batch): the
# continuations drift from the unresharded run by rounding only (seen: 1e-7 to 4e-7 relative
# over the 10 steps), the bound the other layout tests use; the reset-moments control below
# misses by ~1e-2.
RTOL = 1e-5


def _cfg(corpus: dict, **kw) -> dict:
    kw.setdefault("zero", 1)
    return train_dict(corpus, train_steps=2 * N, save_interval=N, **kw)


@pytest.fixture(scope="module")
def source(corpus, tmp_path_factory) -> dict:
    """TP=2, DP=1, ZeRO-1 on 2 processes for 2N steps, saved at N: the run every test resumes."""
    tmp = tmp_path_factory.mktemp("source")
    run = tmp / "run"
    out = distributed.run(_train, 2, _cfg(corpus, tp=2), str(run), tmp_path=tmp)[0]
    return {"run": run, "losses": out["losses"], "step_n": run / f"checkpoints/step_{N:07d}"}


def _copy_at_step_n(source: dict, dest: Path) -> Path:
    """The source run folder as it was after N steps (the later checkpoint removed)."""
    shutil.copytree(source["run"], dest)
    for folder in (dest / "checkpoints").iterdir():
        if folder.is_dir() and folder.name != f"step_{N:07d}":
            shutil.rmtree(folder)
    (dest / "checkpoints/latest").write_text(f"step_{N:07d}")
    return dest


def _assert_continues(got: dict, source: dict, rtol: float = RTOL) -> None:
    assert sorted(got) == list(range(N + 1, 2 * N + 1))
    for step in got:
        assert got[step] == pytest.approx(source["losses"][step], rel=rtol), f"step {step}"


def _universal(folder: Path) -> dict[str, dict]:
    meta = read_meta(folder)
    return {n: torch.load(folder / PARAMS / f"{n}.pt") for n in meta["params"]}


@pytest.mark.distributed
def test_convert_reshard_to_tp1_pp2_continues_like_the_unresharded_run(source, tmp_path, capsys):
    out = tmp_path / "pp2"
    code = main(
        [
            "convert",
            "reshard",
            str(source["run"] / "checkpoints" / f"step_{N:07d}"),
            str(out),
            "--tp",
            "1",
            "--pp",
            "2",
            "--zero-stage",
            "0",
            "--no-progress",
        ]
    )
    assert code == 0
    assert f"wrote {out / 'checkpoints' / f'step_{N:07d}'} (step {N}" in capsys.readouterr().out
    cfg = load_config(out / "config.yaml")
    assert (cfg.parallel.tensor, cfg.parallel.pipeline, cfg.parallel.zero_stage) == (1, 2, 0)
    meta = read_meta(out / f"checkpoints/step_{N:07d}")
    assert meta["optimizer_step"] == N and meta["consumed_samples"] == N * 8
    # Its weights are the TP=2 checkpoint's, merged by the reader evaluation and export use.
    saved_cfg = load_config(source["step_n"] / "config.yaml")
    merged = read_full_state_dict(source["step_n"], saved_cfg)
    merged = {k: v for k, v in merged.items() if torch.is_tensor(v)}  # no _extra_state
    universal = read_full_state_dict(out / f"checkpoints/step_{N:07d}", cfg)
    assert set(merged) == set(universal)
    for name, tensor in merged.items():
        assert torch.equal(universal[name], tensor), name
    ranks = distributed.run(_train, 2, cfg.to_dict(), str(out), tmp_path=tmp_path)
    for r in ranks:
        _assert_continues(r["losses"], source)


@pytest.mark.distributed
def test_resume_reshard_true_at_dp2_continues_like_the_unresharded_run(corpus, source, tmp_path):
    run = _copy_at_step_n(source, tmp_path / "dp2")
    cfg = _cfg(corpus, tp=1)
    cfg["resume"] = {"reshard": True}
    ranks = distributed.run(_train, 2, cfg, str(run), tmp_path=tmp_path)
    for r in ranks:
        _assert_continues(r["losses"], source)
    # The DP=2 ZeRO-2 checkpoint it saved (state split over two ranks) reads back as the same
    # model and Adam state as the TP=2 run's own checkpoint at step 2N, and Adam's step count
    # went on from N (a reset would leave it at N).
    end = f"checkpoints/step_{2 * N:07d}"
    mine = convert_to_universal(run / end, tmp_path / "u_dp2", progress=False)
    ref = convert_to_universal(source["run"] / end, tmp_path / "u_tp2", progress=False)
    assert mine["source"]["layout"]["data"] == 2 and mine["optimizer_step"] == 2 * N
    assert ref["source"]["layout"]["tensor"] == 2 and ref["optimizer_step"] == 2 * N
    a, b = _universal(tmp_path / "u_dp2"), _universal(tmp_path / "u_tp2")
    assert set(a) == set(b)
    for name in a:
        for key in ("weight", "exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(a[name][key], b[name][key], rtol=1e-3, atol=1e-5)
    # The conversion it made on the way in stays next to the checkpoint it came from.
    assert read_meta(run / f"checkpoints/step_{N:07d}/universal")["optimizer_step"] == N


def _zero_moments(folder: Path) -> None:
    meta = read_meta(folder)
    for name in meta["params"]:
        path = folder / PARAMS / f"{name}.pt"
        record = torch.load(path)
        record["exp_avg"].zero_()
        record["exp_avg_sq"].zero_()
        torch.save(record, path)


@pytest.mark.distributed  # the `source` fixture: 2 ranks
def test_reset_moments_are_detected(corpus, source, tmp_path):
    # The control that makes the two tests above meaningful: the same continuation with Adam's
    # moments zeroed (what a weights-only reshard gives) misses the reference by far more than
    # RTOL, at TP=1 on one process.
    out = tmp_path / "reset"
    reshard_checkpoint(source["step_n"], out, tensor=1, progress=False)
    _zero_moments(out / f"checkpoints/step_{N:07d}")
    cfg = load_config(out / "config.yaml").to_dict()
    got = distributed.run(_train, 1, cfg, str(out), tmp_path=tmp_path)[0]["losses"]
    worst = max(abs(got[s] / source["losses"][s] - 1) for s in got)
    assert worst > 50 * RTOL


@pytest.mark.distributed  # the `source` fixture: 2 ranks
def test_other_layout_without_reshard_is_a_clear_error(corpus, source, tmp_path):
    run = _copy_at_step_n(source, tmp_path / "run")
    cfg = config_from_dict(_cfg(corpus, tp=1))
    with pytest.raises(TrainingError) as err:
        prepare_run_dir(cfg, run, allow_config_change=False)
    assert "(parallel.tensor: 2 -> 1)" in str(err.value)
    assert "set resume.reshard=true to resume it at the new parallel layout" in str(err.value)
    # Same config, other data-parallel size: ZeRO-1 state is split per DP rank.
    same = config_from_dict(_cfg(corpus, tp=2))
    with pytest.raises(TrainingError) as err:
        _check_resume_layout(same, source["step_n"], world_size=4)
    assert str(err.value).startswith(
        f"checkpoint '{source['step_n']}' was saved at TP=2/PP=1/DP=1, ZeRO-1; this run is"
        " TP=2/PP=1/DP=2, ZeRO-1. Set resume.reshard=true"
    )
    assert _check_resume_layout(same, source["step_n"], world_size=2) is False
    resharding = config_from_dict({**_cfg(corpus, tp=1), "resume": {"reshard": True}})
    prepare_run_dir(resharding, run, allow_config_change=False)  # layout keys may change
    assert _check_resume_layout(resharding, source["step_n"], world_size=2) is True
    zero3 = config_from_dict({**_cfg(corpus, tp=1, zero=3), "resume": {"reshard": True}})
    with pytest.raises(TrainingError, match="this run is TP=1/PP=1/DP=2, ZeRO-3; resharding"):
        _check_resume_layout(zero3, source["step_n"], world_size=2)


def _train_error(cfg_dict: dict, run_dir: str) -> str:
    try:
        _train(cfg_dict, run_dir)
    except CheckpointError as exc:
        return str(exc)
    return "no error"


@pytest.mark.distributed  # the `source` fixture: 2 ranks
def test_universal_checkpoint_that_does_not_fit_the_model(source, tmp_path):
    out = tmp_path / "out"
    reshard_checkpoint(source["step_n"], out, tensor=1, progress=False)
    cfg = load_config(out / "config.yaml", ["model.ffn_hidden_size=128"]).to_dict()
    (out / "config.yaml").unlink()  # a changed model, resumed on purpose
    error = distributed.run(_train_error, 1, cfg, str(out), tmp_path=tmp_path)[0]
    assert error == (
        f"tensor 'layers.0.mlp.gate_up.weight' has shape [192, 64] in"
        f" '{out / f'checkpoints/step_{N:07d}'}'; the target config expects [256, 64]"
    )


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--tp", "4"], "model.num_kv_heads=2 is not divisible by parallel.tensor=4"),
        (["--pp", "3"], "model.num_layers=2 is not divisible by parallel.pipeline=3"),
    ],
)
@pytest.mark.distributed  # the `source` fixture: 2 ranks
def test_layout_the_model_cannot_be_split_into(flags, message, source, tmp_path, capsys):
    code = main(["convert", "reshard", str(source["run"]), str(tmp_path / "out"), *flags])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.distributed  # the `source` fixture: 2 ranks
def test_shapes_that_do_not_match_the_config(source, tmp_path, capsys):
    bad = tmp_path / "step"
    shutil.copytree(source["step_n"], bad)
    tree = yaml.safe_load((bad / "config.yaml").read_text())
    tree["model"]["ffn_hidden_size"] = 128
    (bad / "config.yaml").write_text(yaml.safe_dump(tree))
    code = main(["convert", "reshard", str(bad), str(tmp_path / "out"), "--tp", "1"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert (
        f"tensor 'layers.0.mlp.gate_up.weight' has shape [192, 64] in '{bad}'; the target config"
        " expects [256, 64]" in err
    )
    assert not (tmp_path / "out").exists()
    # An output folder in use is refused before anything is read.
    (tmp_path / "used").mkdir()
    (tmp_path / "used/file").write_text("x")
    for used in (tmp_path / "used", tmp_path / "used/file"):  # a folder in use, or a file
        with pytest.raises(ValueError, match="output .* exists and is not an empty folder"):
            reshard_checkpoint(source["step_n"], used, tensor=1, progress=False)
    # A truncated file names itself.
    (bad / "config.yaml").write_text((source["step_n"] / "config.yaml").read_text())
    states = bad / "zero_pp_rank_0_mp_rank_01_optim_states.pt"
    states.write_bytes(states.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=f"cannot read checkpoint file '{states}'"):
        reshard_checkpoint(bad, tmp_path / "out2", tensor=1, progress=False)
    done = json.loads((source["step_n"] / "complete.json").read_text())
    assert done["layout"] == {
        "tensor": 2,
        "pipeline": 1,
        "data": 1,
        "zero_stage": 1,
        "optimizer": "zero",
    }


def test_data_position_is_kept_in_global_samples(tmp_path):
    from megatron_dyt.checkpoint.universal import _client_state

    meta = {
        "step": 10,
        "data_cursor": 11,  # one batch was left out after a NaN loss
        "global_batch": 8,
        "consumed_samples": 88,
        "skipped_batches": [4],
    }
    assert _client_state(meta, 8, tmp_path)["data_cursor"] == 11
    assert _client_state(meta, 8, tmp_path)["skipped_batches"] == [4]
    # A global batch of 4 or 44 sequences starts right after sample 88; 16 would split a batch.
    assert _client_state(meta, 4, tmp_path)["data_cursor"] == 22
    assert _client_state(meta, 44, tmp_path)["data_cursor"] == 2
    with pytest.raises(CheckpointError, match="stopped after 88 samples, not a whole number"):
        _client_state(meta, 16, tmp_path)


@pytest.mark.distributed
def test_fixed_alpha_run_reshards_and_continues(corpus, tmp_path):
    """With `learnable_alpha: false` the α are not in the optimizer: they are resharded as
    weights alone, and a ZeRO-1 run resumed at TP=2 continues like the unresharded one."""
    steps = 4
    cfg = train_dict(corpus, train_steps=steps, save_interval=2, zero=1)
    cfg["model"]["norm"]["learnable_alpha"] = False
    ref = distributed.run(_train, 1, cfg, str(tmp_path / "ref"), tmp_path=tmp_path)[0]
    src = tmp_path / "ref/checkpoints/step_0000002"
    out = tmp_path / "tp2"
    assert main(["convert", "reshard", str(src), str(out), "--tp", "2", "--no-progress"]) == 0
    meta = read_meta(out / "checkpoints/step_0000002")
    assert meta["optimizer_step"] == 2
    alphas = [n for n in meta["params"] if n.endswith(".alpha")]
    assert alphas and all(meta["params"][n]["group"] is None for n in alphas)
    resumed = load_config(out / "config.yaml").to_dict()
    ranks = distributed.run(_train, 2, resumed, str(out), tmp_path=tmp_path)
    for r in ranks:
        assert sorted(r["losses"]) == [3, 4]
        for step in (3, 4):
            assert r["losses"][step] == pytest.approx(ref["losses"][step], rel=RTOL), step
    end = read_full_state_dict(
        out / f"checkpoints/step_{steps:07d}", load_config(out / "config.yaml")
    )
    assert end["layers.0.attention_norm.alpha"].item() == pytest.approx(0.8)  # never trained


@pytest.mark.distributed  # the `source` fixture: 2 ranks
def test_checkpoint_of_the_older_optimizer_grouping_resumes_through_reshard(
    corpus, source, tmp_path
):
    """A checkpoint written before one-element tensors had groups of their own (no
    `param_grouping` in complete.json) does not load natively: a clear error, and with
    resume.reshard=true it continues like the run it came from (the flat ZeRO partitions are
    read by tensor name, whatever the grouping)."""
    run = _copy_at_step_n(source, tmp_path / "old")
    done_path = run / f"checkpoints/step_{N:07d}/complete.json"
    done = json.loads(done_path.read_text())
    assert done.pop("param_grouping") == 2
    done_path.write_text(json.dumps(done))
    same = config_from_dict(_cfg(corpus, tp=2))
    with pytest.raises(TrainingError, match="saved before the optimizer kept one-element tensors"):
        _check_resume_layout(same, run / f"checkpoints/step_{N:07d}", world_size=2, regroup=True)
    cfg = _cfg(corpus, tp=2)
    cfg["resume"] = {"reshard": True}
    ranks = distributed.run(_train, 2, cfg, str(run), tmp_path=tmp_path)
    for r in ranks:
        _assert_continues(r["losses"], source)
