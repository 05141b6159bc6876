"""The trainer on CPU (gloo): ZeRO 1/2/3, TP and PP against one process; exact resume; signals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import distributed
import pytest
import torch
import yaml
from common import STEPS, tiny_dict, train_dict
from common import train_worker as _train

from megatron_dyt.config import config_from_dict

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("reference")
    return distributed.run(_train, 1, train_dict(corpus), str(tmp / "run"), tmp_path=tmp)[0]


def _assert_losses_close(got: dict, expected: dict, rtol: float) -> None:
    assert sorted(got) == sorted(expected) == list(range(1, STEPS + 1))
    for step in expected:
        assert got[step] == pytest.approx(expected[step], rel=rtol), f"step {step}"


@pytest.mark.slow
def test_loss_falls(reference):
    losses = reference["losses"]
    assert losses[STEPS] < losses[1] - 0.3


# DP/TP/PP change only the order of floating-point sums: 1e-5 relative over 8 steps. The
# defaults overlap the reduction with two buckets; small buckets make many of them per step.
@pytest.mark.parametrize(
    "zero,comm",
    [
        (1, {}),
        (2, {}),
        (3, {}),
        (2, {"reduce_bucket_size": 5000, "allgather_bucket_size": 5000}),
        (1, {"overlap_comm": False, "contiguous_gradients": False}),
    ],
    ids=["zero1", "zero2", "zero3", "zero2-small-buckets", "zero1-no-overlap"],
)
@pytest.mark.distributed
def test_data_parallel_zero_matches_single_process(zero, comm, corpus, reference, tmp_path):
    tree = train_dict(corpus, zero=zero)
    tree["parallel"].update(comm)
    ranks = distributed.run(_train, 2, tree, str(tmp_path / "run"), tmp_path=tmp_path)
    for r in ranks:
        _assert_losses_close(r["losses"], reference["losses"], 1e-5)


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)])
@pytest.mark.distributed
def test_tensor_and_pipeline_parallel_match_single_process(tp, pp, corpus, reference, tmp_path):
    ranks = distributed.run(
        _train,
        tp * pp,
        train_dict(corpus, tp=tp, pp=pp, zero=1 if pp == 1 else 0),
        str(tmp_path / "run"),
        tmp_path=tmp_path,
    )
    for r in ranks:
        _assert_losses_close(r["losses"], reference["losses"], 1e-5)


@pytest.mark.distributed
def test_tp2_pp2_trains(corpus, reference, tmp_path):
    ranks = distributed.run(
        _train, 4, train_dict(corpus, tp=2, pp=2, zero=1), str(tmp_path / "run"), tmp_path=tmp_path
    )
    for r in ranks:
        _assert_losses_close(r["losses"], reference["losses"], 1e-5)
    assert (tmp_path / "run/checkpoints/latest").read_text() == f"step_{STEPS:07d}"


@pytest.mark.slow
def test_resume_is_bit_identical(corpus, reference, tmp_path):
    cfg = train_dict(corpus)
    run = str(tmp_path / "run")
    first = distributed.run(_train, 1, cfg, run, 3, tmp_path=tmp_path)[0]
    assert sorted(first["losses"]) == [1, 2, 3]
    # A save that died half-way (no complete.json), even one `latest` points at, is never picked.
    partial = tmp_path / "run/checkpoints/step_0000099"
    partial.mkdir()
    (partial / "mp_rank_00_model_states.pt").write_bytes(b"truncated")
    (tmp_path / "run/checkpoints/latest").write_text("step_0000099")
    second = distributed.run(_train, 1, cfg, run, tmp_path=tmp_path)[0]
    assert sorted(second["losses"]) == list(range(4, STEPS + 1))
    merged = {**first["losses"], **second["losses"]}
    assert merged == reference["losses"]  # exact equality, step by step (fp32 on CPU)
    records = [json.loads(x) for x in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    lines = [x for x in records if "event" not in x]  # the steps, not the checkpoint events
    assert [x["step"] for x in lines] == list(range(1, STEPS + 1))
    assert lines[-1]["consumed_samples"] == STEPS * 8
    # Norm statistics every train.stats_interval (100) steps and at the run's last step, not at
    # the last step of an invocation.
    with_stats = [x["step"] for x in lines if "norm/layers.0.attention_norm/alpha" in x]
    assert with_stats == [STEPS]


@pytest.mark.distributed
def test_bf16_run_resumes_bit_identically(corpus, tmp_path):
    # bf16 at ZeRO-1 with fp32 gradient sums is DeepSpeed's bf16 optimizer (its own checkpoint
    # files, `RunLayout.optimizer` 'bf16'); two data-parallel ranks reduce in fp32.
    cfg = train_dict(corpus, precision="bf16", train_steps=4)
    cfg["model"]["norm"]["backend"] = "torch"
    whole = distributed.run(_train, 2, cfg, str(tmp_path / "whole"), tmp_path=tmp_path)[0]
    run = str(tmp_path / "run")
    first = distributed.run(_train, 2, cfg, run, 2, tmp_path=tmp_path)[0]
    saved = sorted(p.name for p in (tmp_path / "run/checkpoints/step_0000002").iterdir())
    assert "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt" in saved, saved
    second = distributed.run(_train, 2, cfg, run, tmp_path=tmp_path)[0]
    assert {**first["losses"], **second["losses"]} == whole["losses"]
    assert whole["losses"][4] < whole["losses"][1]


@pytest.mark.distributed
def test_resume_across_data_parallel_sizes_sees_the_same_data(corpus, reference, tmp_path):
    # ZeRO-0: the optimizer state is not partitioned, so DeepSpeed reloads it at another DP size
    # (repartitioning ZeRO-1/2/3 state is the resharding converter's job).
    cfg = train_dict(corpus, zero=0)
    run = str(tmp_path / "run")
    distributed.run(_train, 1, cfg, run, 4, tmp_path=tmp_path)
    ranks = distributed.run(_train, 2, cfg, run, tmp_path=tmp_path)
    for step in range(5, STEPS + 1):
        assert ranks[0]["losses"][step] == pytest.approx(reference["losses"][step], rel=1e-5)


@pytest.mark.distributed
def test_zero_to_fp32_consolidation_loads_into_the_model(corpus, tmp_path):
    from megatron_dyt import parallel
    from megatron_dyt.model import LlamaModel, load_full_state_dict

    cfg_dict = train_dict(corpus, zero=2, eval_interval=STEPS, eval_samples=8)
    run = tmp_path / "run"
    ranks = distributed.run(_train, 2, cfg_dict, str(run), tmp_path=tmp_path)
    # DeepSpeed's own script, as DeepSpeed placed it in the checkpoint folder.
    script = run / "checkpoints/zero_to_fp32.py"
    subprocess.run(
        [
            sys.executable,
            str(script),
            str(run / "checkpoints"),
            str(tmp_path / "fp32"),
            "-t",
            f"step_{STEPS:07d}",
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    state = torch.load(tmp_path / "fp32/pytorch_model.bin", weights_only=True)

    cfg = config_from_dict(cfg_dict)
    parallel.init_distributed("gloo")
    parallel.initialize_model_parallel(cfg.parallel)
    model = LlamaModel(cfg)
    load_full_state_dict(model, state)
    from megatron_dyt.data import build_datasets, resolve_data

    tokenizer, _, _ = resolve_data(cfg)
    _, valid = build_datasets(cfg, tokenizer, STEPS * 8, 8)
    with torch.no_grad():
        losses = []
        for first in range(0, 8, 2):
            samples = [valid[i] for i in range(first, first + 2)]
            tokens = torch.stack([torch.as_tensor(s["tokens"]) for s in samples]).long()
            labels = torch.stack([torch.as_tensor(s["labels"]) for s in samples]).long()
            losses.append(model(tokens, labels))
    assert torch.stack(losses).mean().item() == pytest.approx(ranks[0]["valid"][STEPS], rel=1e-5)


@pytest.mark.slow
def test_sigterm_saves_and_exits_zero_then_resumes(corpus, tmp_path):
    cfg = train_dict(corpus)
    cfg["train"]["train_steps"] = 10_000
    config = tmp_path / "cfg.yaml"
    config.write_text(config_from_dict(cfg).to_yaml())
    run = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "megatron_dyt",
        "train",
        str(config),
        "--run-dir",
        str(run),
        "--no-progress",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 180
    while time.time() < deadline and (
        not metrics.exists() or len(metrics.read_text().splitlines()) < 3
    ):
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    tag = (run / "checkpoints/latest").read_text()
    assert (run / "checkpoints" / tag / "complete.json").is_file()
    saved_step = json.loads((run / "checkpoints" / tag / "complete.json").read_text())["step"]
    assert saved_step >= 3

    cfg["train"]["train_steps"] = saved_step + 2
    config.write_text(config_from_dict(cfg).to_yaml())
    again = subprocess.run(
        [*cmd, "--allow-config-change"], capture_output=True, text=True, env=env, timeout=180
    )
    assert again.returncode == 0, again.stderr
    assert f"resuming from {run / 'checkpoints' / tag} (step {saved_step})" in again.stdout
    records = [json.loads(x) for x in metrics.read_text().splitlines()]
    steps = [r["step"] for r in records if "event" not in r]  # not the checkpoint events
    assert steps[-2:] == [saved_step + 1, saved_step + 2]


@pytest.mark.slow
def test_corrupt_checkpoint_is_a_clear_error(corpus, tmp_path):
    cfg = train_dict(corpus)
    cfg["train"]["train_steps"] = 2
    config = tmp_path / "cfg.yaml"
    config.write_text(config_from_dict(cfg).to_yaml())
    run = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "megatron_dyt",
        "train",
        str(config),
        "--run-dir",
        str(run),
        "--no-progress",
    ]
    assert subprocess.run(cmd, capture_output=True, timeout=180).returncode == 0
    states = run / "checkpoints/step_0000002/mp_rank_00_model_states.pt"
    states.write_bytes(states.read_bytes()[:100])

    def snapshot() -> dict[str, bytes]:
        return {str(f): f.read_bytes() for f in sorted(run.rglob("*")) if f.is_file()}

    before = snapshot()
    cfg["train"]["train_steps"] = 4
    config.write_text(config_from_dict(cfg).to_yaml())
    bad = subprocess.run(
        [*cmd, "--allow-config-change"], capture_output=True, text=True, timeout=180
    )
    assert bad.returncode == 2
    assert f"cannot load checkpoint '{run / 'checkpoints/step_0000002'}'" in bad.stderr
    assert "Traceback" not in bad.stderr
    # a failed --allow-config-change resume leaves the run folder as it was: its config.yaml
    # still describes its checkpoints
    assert snapshot() == before

    # `latest` holding binary garbage: one line says so, and the run resumes from the newest
    # complete checkpoint (here none is: a fresh start, said as such)
    (run / "checkpoints/latest").write_bytes(b"\x80\x81\xfe garbage")
    (run / "checkpoints/step_0000002/complete.json").unlink()
    fresh = subprocess.run([*cmd, "--allow-config-change"], capture_output=True, text=True)
    assert fresh.returncode == 0, fresh.stderr[-2000:]
    note = (
        f"note: '{run / 'checkpoints/latest'}' is not text (damaged); no checkpoint here is"
        " complete: starting from step 0"
    )
    assert note in fresh.stderr


def test_run_dir_that_is_a_file_is_refused(tmp_path):
    from megatron_dyt.training.trainer import TrainingError, prepare_run_dir

    (tmp_path / "run").write_text("not a folder")
    with pytest.raises(
        TrainingError, match="run folder '.*run' is a file; give --run-dir a folder"
    ):
        prepare_run_dir(config_from_dict({}), tmp_path / "run", allow_config_change=False)


@pytest.mark.slow
def test_changed_config_is_refused(corpus, tmp_path):
    cfg = train_dict(corpus)
    cfg["train"]["train_steps"] = 1
    config = tmp_path / "cfg.yaml"
    config.write_text(config_from_dict(cfg).to_yaml())
    run = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "megatron_dyt",
        "train",
        str(config),
        "--run-dir",
        str(run),
        "--no-progress",
    ]
    assert subprocess.run(cmd, capture_output=True, timeout=180).returncode == 0
    bad = subprocess.run([*cmd, "train.lr=0.5"], capture_output=True, text=True, timeout=180)
    assert bad.returncode == 1
    assert "holds a run with a different config (train.lr: 0.02 -> 0.5)" in bad.stderr
    assert "Traceback" not in bad.stderr


def _train_with_nan(cfg_dict: dict, run_dir: str, bad_batch: int) -> dict:
    """Train with the loss of data batch `bad_batch` reported as NaN the first time it is used."""
    from megatron_dyt.training import trainer

    real_step, real_for_step = trainer._train_step, trainer.StepBatches.for_step
    seen = {"batch": None, "fired": False}

    def for_step(self, batch):
        seen["batch"] = batch
        return real_for_step(self, batch)

    def train_step(engine, batches, pipeline):
        loss = real_step(engine, batches, pipeline)
        if seen["batch"] == bad_batch and not seen["fired"]:
            seen["fired"] = True
            return torch.full_like(loss, float("nan"))
        return loss

    trainer.StepBatches.for_step, trainer._train_step = for_step, train_step
    try:
        return _train(cfg_dict, run_dir)
    except trainer.TrainingError as exc:
        return {"error": str(exc)}


@pytest.mark.slow
def test_nonfinite_loss_stops_with_the_step_and_last_good_checkpoint(corpus, reference, tmp_path):
    cfg = train_dict(corpus, save_interval=2)
    out = distributed.run(_train_with_nan, 1, cfg, str(tmp_path / "run"), 4, tmp_path=tmp_path)[0]
    good = tmp_path / "run/checkpoints/step_0000004"
    assert out["error"].startswith(
        f"loss is nan at step 5: training diverged and stopped; the last good checkpoint is '{good}'"
    )
    assert (tmp_path / "run/checkpoints/latest").read_text() == "step_0000004"


@pytest.mark.slow
def test_nonfinite_loss_rewinds_and_skips_the_batch(corpus, reference, tmp_path):
    cfg = train_dict(corpus, save_interval=2, skip_nonfinite_steps=1)
    out = distributed.run(_train_with_nan, 1, cfg, str(tmp_path / "run"), 4, tmp_path=tmp_path)[0]
    assert out["step"] == STEPS
    for step in range(1, 5):
        assert out["losses"][step] == reference["losses"][step]
    assert out["losses"][5] != reference["losses"][5]  # step 5 trained on batch 5, not batch 4
    done = json.loads((tmp_path / f"run/checkpoints/step_{STEPS:07d}/complete.json").read_text())
    assert done["skipped_batches"] == [4] and done["data_cursor"] == STEPS + 1


@pytest.mark.slow
def test_blend_outlasts_skipped_batches_and_the_logged_lr_is_the_schedule(corpus, tmp_path):
    """A skipped batch moves the data cursor past `train_steps` batches: a blended dataset, built
    to its exact sample count, must hold the extra ones. With `dyt_lr_multiplier` the DyT
    scalars' group sorts first, and the logged lr must still be the schedule's."""
    from megatron_dyt.training.schedule import lr_factor

    cfg = train_dict(corpus, save_interval=2, skip_nonfinite_steps=1, dyt_lr_multiplier=0.5)
    cfg["data"].update(paths=[corpus["prefix"]] * 2, weights=[1.0, 3.0])
    out = distributed.run(_train_with_nan, 1, cfg, str(tmp_path / "run"), 4, tmp_path=tmp_path)[0]
    assert out.get("error") is None and out["step"] == STEPS
    records = [json.loads(x) for x in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    lrs = {r["step"]: r["lr"] for r in records if "lr" in r}
    assert sorted(lrs) == list(range(1, STEPS + 1))
    for step, lr in lrs.items():
        assert lr == pytest.approx(2e-2 * lr_factor(step - 1, 2, STEPS, 0.1), rel=1e-12), step


@pytest.mark.slow
def test_log_lines_where_no_terminal_reads(corpus, tmp_path):
    # stdout is a pipe, as in a SLURM log: a plain line per train.log_interval steps, no bar
    cfg = train_dict(corpus, log_interval=2, train_steps=4)
    config = tmp_path / "cfg.yaml"
    config.write_text(config_from_dict(cfg).to_yaml())
    cmd = [sys.executable, "-m", "megatron_dyt", "train", str(config), "--run-dir"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [*cmd, str(tmp_path / "run")], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [x for x in proc.stdout.splitlines() if x.startswith("step ")]
    assert [x.split(" | ")[0] for x in lines] == ["step 2/4", "step 4/4"]
    fields = [f.split(" ")[0] for f in lines[0].split(" | ")]
    assert fields == [
        "step",
        "loss",
        "lr",
        "grad_norm",
        "tokens/s",
        "TFLOP/s/GPU",
        "MFU",
        "peak_rss",
        "left",
    ]
    assert lines[-1].endswith("left 0:00:00")
    assert "it/s" not in proc.stderr and "step/s" not in proc.stderr  # no progress bar
    # the last step's checkpoint: its size, how long the ranks waited and the write rate, in
    # the log and in metrics.jsonl (the size is that of the folder written)
    folder = tmp_path / "run/checkpoints/step_0000004"
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    saved = [x for x in proc.stdout.splitlines() if x.startswith("checkpoint step 4: ")]
    assert len(saved) == 1 and saved[0].endswith(f"GB/s) {folder}"), proc.stdout[-2000:]
    events = [json.loads(x) for x in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    (event,) = [e for e in events if e.get("event") == "checkpoint"]
    assert event["step"] == 4 and event["gigabytes"] == size / 1e9 and event["seconds"] > 0
    assert event["gigabytes_per_s"] == pytest.approx(size / 1e9 / event["seconds"], rel=1e-9)


SYNCS = ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__")


def _count_host_syncs(cfg_dict: dict, run_dir: str) -> dict:
    """Train with every tensor→host conversion called from megatron_dyt counted, per step."""
    import sys as _sys

    from megatron_dyt.training import trainer as T

    calls: list[str] = []
    for name in SYNCS:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, _name=name, **kwargs):
            frame = _sys._getframe(1)
            module = frame.f_globals.get("__name__", "")
            if module.startswith("megatron_dyt"):
                calls.append(f"{module}:{frame.f_lineno} {_name}")
            return _original(self, *args, **kwargs)

        setattr(torch.Tensor, name, counted)
    per_step: dict[int, list[str]] = {}
    log = T.Trainer.log

    def log_and_count(self, result, *args, **kwargs):
        log(self, result, *args, **kwargs)
        per_step[self.position.step] = list(calls)
        calls.clear()

    resume = T.Trainer.resume

    def resume_then_count(self):  # the loop starts here: set-up's syncs are not a step's
        resume(self)
        calls.clear()

    T.Trainer.log, T.Trainer.resume = log_and_count, resume_then_count
    T.train(config_from_dict(cfg_dict), Path(run_dir), progress=False)
    return per_step


@pytest.mark.slow
def test_at_most_one_host_sync_per_step_outside_log_steps(corpus, tmp_path):
    cfg = train_dict(corpus, log_interval=3, stats_interval=5, train_steps=7)
    per_step = distributed.run(_count_host_syncs, 1, cfg, str(tmp_path / "run"), tmp_path=tmp_path)[
        0
    ]
    quiet = {s: calls for s, calls in per_step.items() if s % 3 and s % 5 and s != 7}
    assert quiet and all(len(c) == 1 for c in quiet.values()), quiet  # the loss and stop flag
    assert all(len(per_step[s]) > 1 for s in (3, 5, 6, 7)), per_step  # grad norm, statistics


def test_a_resumed_run_logs_each_step_once(tmp_path):
    """After a crash a run resumes from its last checkpoint (step 3 here) and takes steps 4-5
    again: their old records, and a line the crash cut short, are dropped when it reopens the
    log; earlier records and events stay."""
    from megatron_dyt.training.metrics import MetricsWriter

    cfg = config_from_dict(train_dict({"tokenizer": "t", "prefix": "p", "cache": "c"}))
    path = tmp_path / "metrics.jsonl"
    old = [{"step": s, "loss": 5.0 - s} for s in range(1, 6)]
    old.insert(3, {"step": 3, "event": "checkpoint", "seconds": 1.0})
    path.write_text("".join(json.dumps(r) + "\n" for r in old) + '{"step": 6, "lo')
    writer = MetricsWriter(tmp_path, cfg, enabled=True, start_step=3)
    writer.write(4, {"loss": 0.25})
    writer.close()
    records = [json.loads(x) for x in path.read_text().splitlines()]
    assert records == [*old[:4], {"step": 4, "loss": 0.25}]


@pytest.mark.distributed
def test_checkpoints_on_a_clock(corpus, tmp_path):
    """train.save_interval_minutes: a save whenever that much time has passed on rank 0's
    clock, decided in the step's one all-reduce so both ranks save together (a few
    milliseconds here: every step)."""
    cfg = train_dict(corpus, save_interval=0, train_steps=4, save_interval_minutes=1e-5)
    distributed.run(_train, 2, cfg, str(tmp_path / "run"), tmp_path=tmp_path)
    records = [json.loads(x) for x in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r.get("event") == "checkpoint"] == [1, 2, 3, 4]
    assert sorted(p.name for p in (tmp_path / "run/checkpoints").glob("step_*")) == [
        "step_0000002",
        "step_0000003",
        "step_0000004",
    ]  # keep_checkpoints: 3


def test_weights_and_biases_gets_the_configured_run_and_resumes_it(tmp_path, monkeypatch):
    """Entity, name, group and tags from the config; the id is the run folder's, so a
    requeued job (a new writer on the same folder) continues the same W&B run. A stand-in
    module records what `wandb.init` is given."""
    import types

    from megatron_dyt.training.metrics import MetricsWriter

    calls = []
    fake = types.SimpleNamespace(
        init=lambda **kw: calls.append(kw) or types.SimpleNamespace(log=None, finish=lambda: 0)
    )
    monkeypatch.setitem(sys.modules, "wandb", fake)
    tree = train_dict({"tokenizer": "t", "prefix": "p", "cache": "c"})
    tree["train"].update(
        wandb_project="dyt",
        wandb_entity="lab",
        wandb_name="7b-alpha0.5",
        wandb_group="alpha-sweep",
        wandb_tags=["dyt", "7b"],
    )
    cfg = config_from_dict(tree)
    for _ in range(2):  # the first job, then its requeue
        MetricsWriter(tmp_path, cfg, enabled=True).close()
    first, again = calls
    assert first["project"] == "dyt" and first["entity"] == "lab"
    assert first["name"] == "7b-alpha0.5" and first["group"] == "alpha-sweep"
    assert first["tags"] == ["dyt", "7b"] and first["resume"] == "allow"
    assert again["id"] == first["id"] and len(first["id"]) == 16


def test_a_sweep_groups_its_runs_in_weights_and_biases(tmp_path):
    from megatron_dyt.sweep.spec import load_spec, validate

    (tmp_path / "base.yaml").write_text(
        yaml.safe_dump(tiny_dict("dyt") | {"train": {"wandb_project": "dyt"}})
    )
    spec = tmp_path / "alpha.yaml"
    spec.write_text(
        yaml.safe_dump({"base": "base.yaml", "grid": {"model.norm.alpha_attn": [0.5, 1.0]}})
    )
    groups = {cfg.train.wandb_group for _, cfg in validate(load_spec(spec))}
    assert groups == {"alpha"}  # the spec's name (here its file's)


@pytest.mark.parametrize(
    "pointer,problem",
    [
        (b"step_0000099", "names 'step_0000099', which is not a complete checkpoint here"),
        (b"", "is empty"),
        (b"\xff\xfe\x00", "is not text (damaged)"),
        (b"../../etc", "names '../../etc', which is not a complete checkpoint here"),
    ],
)
def test_an_unusable_latest_falls_back_to_the_newest_checkpoint_and_says_so(
    tmp_path, pointer, problem
):
    from megatron_dyt.checkpoint import CheckpointNotice, find_latest

    for step in (2, 4):
        (tmp_path / f"step_000000{step}").mkdir()
        (tmp_path / f"step_000000{step}/complete.json").write_text(json.dumps({"step": step}))
    (tmp_path / "latest").write_bytes(pointer)
    notes: list[str] = []
    assert find_latest(tmp_path, notes) == "step_0000004"
    assert notes == [
        f"'{tmp_path / 'latest'}' {problem}; resuming from the newest complete checkpoint,"
        " step_0000004"
    ]
    with pytest.warns(CheckpointNotice, match="resuming from the newest"):
        assert find_latest(tmp_path) == "step_0000004"
    (tmp_path / "latest").write_text("step_0000002")  # a good pointer wins, silently
    assert find_latest(tmp_path, notes) == "step_0000002" and len(notes) == 1
