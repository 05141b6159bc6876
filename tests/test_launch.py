"""`megatron-dyt launch`: sbatch scripts, layout checks, and real jobs on a two-node SLURM
cluster on localhost (tests/slurm_cluster.py): DP=2 across the nodes equals a local DP=2 run,
and a pre-empted job checkpoints, requeues itself and resumes without losing a step."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from common import train_dict
from slurm_cluster import Cluster, unavailable_reason

from megatron_dyt.config import config_from_dict
from megatron_dyt.launch.layout import job_layout
from megatron_dyt.launch.slurm import SlurmOptions, render

ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "megatron_dyt.cli"]


def cli(*args: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*CLI, *args], capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT
    )


def losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def job_config(corpus: dict, **train) -> dict:
    """The trainer tests' tiny DP-ready config, with the torch norms: the Triton interpreter
    (on in CPU tests) would make each step of these multi-process jobs ~10× slower."""
    cfg = train_dict(corpus, zero=1, **train)
    cfg["model"]["norm"]["backend"] = "torch"
    return cfg


def write_config(tmp_path: Path, corpus: dict, **train) -> Path:
    cfg = job_config(corpus, **train)
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


# ---- scripts and layout checks (no cluster needed) ------------------------------------------


def test_70b_script_on_16_nodes_of_8_gpus():
    from megatron_dyt.config import load_config

    cfg = load_config(ROOT / "configs/llama-70b-dyt.yaml")
    opts = SlurmOptions(nodes=16, gpus_per_node=8, partition="gpu", time="2-00:00:00")
    script, layout = render(cfg, Path("/scratch/runs/70b"), opts, stamp="S", python="/py")
    assert (layout.tensor, layout.pipeline, layout.data) == (8, 4, 4)
    for line in [
        "#SBATCH --nodes=16",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --partition=gpu",
        "#SBATCH --time=2-00:00:00",
        "#SBATCH --signal=USR1@300",
        "#SBATCH --requeue",
        "#SBATCH --output=/scratch/runs/70b/logs/slurm-%j.out",
        '--rdzv-backend=c10d --rdzv-endpoint="$HEAD_NODE:$PORT"',
        "--nproc-per-node=8",
        'scontrol show hostnames "$SLURM_JOB_NODELIST"',
        'scontrol requeue "$SLURM_JOB_ID"',
    ]:
        assert line in script, line
    # The frozen config in the script is the config.
    frozen = script.split("<<'MEGATRON_DYT_CONFIG'\n")[1].split("MEGATRON_DYT_CONFIG")[0]
    assert config_from_dict(yaml.safe_load(frozen)) == cfg
    bash = shutil.which("bash")
    assert subprocess.run([bash, "-n"], input=script, text=True).returncode == 0  # valid bash


def test_cluster_ready_resources_environment_and_setup(tmp_path):
    """Whole GPU nodes by default, threads from the task's CPUs, the site's environment and
    setup lines before the launch, node-local compile caches, a free rendezvous port, and the
    failure requeue limit."""
    from megatron_dyt.config import load_config

    cfg = load_config(ROOT / "configs/llama-7b-dyt.yaml")
    setup = tmp_path / "site.sh"
    setup.write_text("module load cuda/12.8\nsource /opt/conda/bin/activate train\n")
    opts = SlurmOptions(nodes=2, env=["NCCL_IB_HCA=mlx5", "NOTE=a b"], setup=setup, max_requeues=5)
    script, _ = render(cfg, Path("/r"), opts, stamp="S", python="/py")
    for line in [
        "#SBATCH --exclusive",
        "#SBATCH --mem=0",
        "CPUS=${SLURM_CPUS_PER_TASK:-${SLURM_CPUS_ON_NODE:-8}}",
        "THREADS=$((CPUS / 8))",
        "export NCCL_IB_HCA=mlx5",
        "export NOTE='a b'",
        "module load cuda/12.8\nsource /opt/conda/bin/activate train",
        "export TRITON_CACHE_DIR=$LOCAL_CACHE/triton TORCHINDUCTOR_CACHE_DIR=$LOCAL_CACHE/inductor",
        's.bind(("", 0))',
        'if [ "$FAILS" -lt 5 ]; then',
    ]:
        assert line in script, line
    assert script.index("module load") < script.index("srun --ntasks-per-node")
    assert "20000 + SLURM_JOB_ID" not in script
    plain, _ = render(
        cfg,
        Path("/r"),
        SlurmOptions(nodes=1, exclusive=False, cpus_per_task=32, mem="500G"),
        python="/py",
    )
    assert "#SBATCH --exclusive" not in plain and "#SBATCH --cpus-per-task=32" in plain
    assert "#SBATCH --mem=500G" in plain
    cpu, _ = render(
        cfg.model_copy(update={"parallel": cfg.parallel}),
        Path("/r"),
        SlurmOptions(nodes=8, gpus_per_node=0, procs_per_node=1),
        python="/py",
    )
    assert "#SBATCH --exclusive" not in cpu and "#SBATCH --mem" not in cpu  # CPU: shared
    for bash_script in (script, plain, cpu):
        assert subprocess.run(["bash", "-n"], input=bash_script, text=True).returncode == 0


def test_the_signal_lead_is_the_measured_save_plus_a_step(tmp_path):
    """USR1 comes early enough for the step in flight and the save to finish: by default the
    longest save the run folder measured + its longest recent step + 60 s (300 s before any)."""
    from megatron_dyt.config import load_config

    cfg = load_config(ROOT / "configs/llama-70b-dyt.yaml")  # 4,194,304 tokens per step
    run = tmp_path / "run"
    run.mkdir()
    records = [
        {"step": 1, "loss": 9.0, "tokens_per_s": 262144.0},  # a 16 s step
        {"step": 2, "loss": 8.0, "tokens_per_s": 419430.4},  # 10 s
        {"step": 2, "event": "checkpoint", "seconds": 140.5, "gigabytes": 980.0},
        {"step": 3, "event": "checkpoint", "seconds": 95.0, "gigabytes": 980.0},
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + "{bad")
    script, _ = render(cfg, run, SlurmOptions(nodes=16), python="/py")
    assert "#SBATCH --signal=USR1@217" in script  # ceil(140.5 + 16) + 60
    assert "(140.5 s) + its longest recent step (16.0 s) + 60 s" in script
    fresh, _ = render(cfg, tmp_path / "new", SlurmOptions(nodes=16), python="/py")
    assert "#SBATCH --signal=USR1@300" in fresh and "no save measured" in fresh
    given, _ = render(cfg, run, SlurmOptions(nodes=16, signal_seconds=900), python="/py")
    assert "#SBATCH --signal=USR1@900" in given


@pytest.mark.parametrize(
    "opts,message",
    [
        (SlurmOptions(env=["1X=2"]), "--env '1X=2': expected KEY=VALUE"),
        (SlurmOptions(env=["NOVALUE"]), "--env 'NOVALUE': expected KEY=VALUE"),
        (SlurmOptions(setup=Path("/nonexistent/site.sh")), "--setup /nonexistent/site.sh"),
        (SlurmOptions(max_requeues=-1), "--max-requeues=-1"),
    ],
)
def test_bad_cluster_options_name_the_option(opts, message):
    from megatron_dyt.config import load_config
    from megatron_dyt.launch.slurm import SlurmError

    cfg = load_config(ROOT / "configs/llama-7b-dyt.yaml")
    with pytest.raises(SlurmError) as exc:
        render(cfg, Path("/r"), opts, python="/py")
    assert message in str(exc.value)


@pytest.mark.parametrize("code,expected", [(2, 2), (1, 1), (0, 0)])
def test_the_node_launcher_exits_2_only_for_bad_input(tmp_path, code, expected):
    """torchrun exits 1 for any failed worker; the node launcher keeps a worker's 2 (bad input,
    which the sbatch script does not requeue) apart from crashes."""
    script = tmp_path / "worker.py"
    script.write_text(f"import sys\nsys.exit({code})\n")
    proc = subprocess.run(
        [sys.executable, "-m", "megatron_dyt.launch.node", "--standalone", "--nproc-per-node=1",
         str(script)],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == expected, proc.stderr[-2000:]


def test_srun_launcher_starts_one_task_per_gpu():
    from megatron_dyt.config import load_config

    cfg = load_config(ROOT / "configs/llama-7b-dyt.yaml", ["parallel.tensor=2"])
    script, layout = render(cfg, Path("/r"), SlurmOptions(nodes=2, launcher="srun"), python="p")
    assert layout.data == 8 and "#SBATCH --ntasks-per-node=8" in script
    assert "RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID" in script


def test_layout_errors_name_the_numbers():
    cfg = config_from_dict(train_dict({"tokenizer": "t", "prefix": "p", "cache": "c"}, tp=2))
    with pytest.raises(ValueError, match=r"3 processes, which is not a multiple of .* = 2"):
        job_layout(cfg, 3, 1)
    with pytest.raises(ValueError, match="not divisible by train.micro_batch_size"):
        job_layout(cfg, 2, 3)  # DP 3 does not split 8 sequences
    with pytest.raises(ValueError, match="--nproc-per-node"):
        _ = SlurmOptions(gpus_per_node=0).procs


@pytest.mark.slow  # four CLI processes: ~20 s
def test_bad_command_lines_are_one_clear_error(tmp_path, corpus):
    config = write_config(tmp_path, corpus)
    bad = cli(
        "launch", "slurm", str(config), "parallel.tensor=2", "--nodes", "3",
        "--gpus-per-node", "1", "--dry-run",
    )  # fmt: skip
    assert bad.returncode == 2 and "not a multiple of" in bad.stderr
    assert "Traceback" not in bad.stderr
    missing = cli("launch", "slurm", "nope.yaml", "--nodes", "1", "--dry-run")
    assert missing.returncode == 2 and "config file 'nope.yaml' does not exist" in missing.stderr
    # sbatch not on PATH: only this interpreter's folder (no SLURM binaries) is left.
    env = {**os.environ, "PATH": str(Path(sys.executable).parent)}
    no_sbatch = cli(
        "launch", "slurm", str(config), "--nodes", "1", "--gpus-per-node", "0",
        "--nproc-per-node", "1", "--run-dir", str(tmp_path / "r"), env=env,
    )  # fmt: skip
    assert no_sbatch.returncode == 2 and "sbatch is not on PATH" in no_sbatch.stderr
    assert not (tmp_path / "r").exists()  # nothing written for a job that was not submitted
    local = cli("launch", "local", str(config), "--nproc", "3", "--dry-run")
    assert local.returncode == 2 and "not divisible" in local.stderr
    nodata = cli("launch", "local", str(config), "data.paths=[/no/such]", "--nproc", "1")
    assert nodata.returncode == 2 and "/no/such.bin and /no/such.idx not found" in nodata.stderr
    assert "nothing was started" in nodata.stderr and "Traceback" not in nodata.stderr


def _processes_mentioning(text: str) -> list[int]:
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if text in cmdline.read_bytes().decode(errors="replace"):
                found.append(int(cmdline.parent.name))
        except OSError:  # it ended while we looked
            continue
    return found


@pytest.mark.distributed  # `launch local --nproc 2`
def test_sigterm_to_a_local_launch_stops_the_training_with_a_checkpoint(tmp_path, corpus):
    """The launcher passes SIGTERM on (once): the workers save and exit, nothing outlives it."""
    config = write_config(tmp_path, corpus, train_steps=10_000)
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(
        [*CLI, "launch", "local", str(config), "--nproc", "2", "--run-dir", str(run_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 300
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, "training never started"
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "Traceback" not in err and "stopped by SIGTERM" in err
    assert json.loads((run_dir / "status.json").read_text())["state"] == "stopped"
    assert (run_dir / "checkpoints/latest").is_file()
    deadline = time.time() + 30
    while _processes_mentioning(str(run_dir)) and time.time() < deadline:
        time.sleep(0.5)
    assert _processes_mentioning(str(run_dir)) == []


# ---- real jobs --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    reason = unavailable_reason()
    if reason:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the SLURM tests, but: {reason}")
        pytest.skip(reason)
    c = Cluster(tmp_path_factory.mktemp("slurm"))
    try:
        c.start()
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def reference(tmp_path_factory, corpus):
    """A local DP=2 run (`launch local --nproc 2`) of the tiny config: what the jobs must equal."""
    tmp = tmp_path_factory.mktemp("local")
    config = write_config(tmp, corpus)
    run = cli("launch", "local", str(config), "--nproc", "2", "--run-dir", str(tmp / "run"))
    assert run.returncode == 0, run.stderr[-3000:]
    return config, losses(tmp / "run")


def release_after_requeue(
    cluster: Cluster, job: str, timeout: float = 300, restarts: int = 1
) -> None:
    """Start a requeued job as soon as SLURM allows it, not at the next scheduler pass.

    SLURM holds a requeued batch job until its EligibleTime (requeue + cred_expire + 1 s, 11 s on
    the test cluster): until then the nodes still hold the old run's revoked credential and refuse
    to launch it ("Job credential revoked"), so it must not be started any earlier."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        state = cluster.job_state(job)
        if int(state.get("Restarts", 0)) >= restarts and state.get("JobState") == "PENDING":
            try:
                begin = time.mktime(time.strptime(state["EligibleTime"], "%Y-%m-%dT%H:%M:%S"))
            except (KeyError, ValueError):  # no begin time shown: wait out the credential
                begin = time.time() + 11
            time.sleep(max(0.0, begin - time.time()) + 2)
            cluster.run("scontrol", "update", f"JobId={job}", "StartTime=now", check=False)
            return
        if state.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED"):
            return
        time.sleep(0.5)


def submit(cluster: Cluster, *args: str) -> str:
    out = subprocess.run(
        [*CLI, "launch", "slurm", *args], env=cluster.env, capture_output=True, text=True, cwd=ROOT
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.split("submitted job ")[1].split(":")[0]


@pytest.mark.parametrize("launcher", ["torchrun", "srun"])
@pytest.mark.slurm
def test_two_node_job_equals_a_local_run(cluster, reference, tmp_path, launcher):
    config, expected = reference
    run_dir = tmp_path / "run"
    job = submit(
        cluster, str(config), "--nodes", "2", "--gpus-per-node", "0", "--nproc-per-node", "1",
        "--launcher", launcher, "--run-dir", str(run_dir),
    )  # fmt: skip
    state = cluster.wait(job)
    log = (run_dir / "logs" / f"slurm-{job}.out").read_text()
    assert state["JobState"] == "COMPLETED", log[-3000:] + cluster.diagnostics(job)
    assert "2 node(s) n[1-2]" in log  # both nodes took part
    got = losses(run_dir)
    assert sorted(got) == sorted(expected)
    for step, loss in expected.items():  # same processes, same data order, same reductions
        assert got[step] == pytest.approx(loss, rel=1e-6, abs=0), step
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_0000008"
    assert json.loads((run_dir / "status.json").read_text())["state"] == "finished"


@pytest.mark.slurm
def test_preempted_job_checkpoints_requeues_and_resumes(cluster, corpus, tmp_path):
    steps = 40
    config = write_config(tmp_path, corpus, train_steps=steps)
    run_dir = tmp_path / "run"
    job = submit(
        cluster, str(config), "--nodes", "2", "--gpus-per-node", "0", "--nproc-per-node", "1",
        "--run-dir", str(run_dir),
    )  # fmt: skip
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 300
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        assert time.time() < deadline, "the job never started training"
        time.sleep(0.2)
    cluster.run("scancel", "--signal=USR1", job)  # what SLURM sends before the time limit
    release_after_requeue(cluster, job)
    state = cluster.wait(job)
    log = (run_dir / "logs" / f"slurm-{job}.out").read_text()
    assert state["JobState"] == "COMPLETED", log[-3000:] + cluster.diagnostics(job)
    assert int(state["Restarts"]) == 1, log[-3000:] + cluster.diagnostics(job)
    assert "requeueing job" in log and "resuming from" in log
    stopped_at = int(log.split("saved ")[1].split("step_")[1].split(",")[0])
    assert 3 <= stopped_at < steps  # it stopped early, with a checkpoint ...
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    got = [r["step"] for r in records if "event" not in r]  # not the checkpoint events
    assert got == list(range(1, steps + 1))  # ... and no step was lost or repeated
    assert json.loads((run_dir / "status.json").read_text())["state"] == "finished"


@pytest.mark.slurm
def test_a_job_that_would_fail_is_not_queued(cluster, corpus, tmp_path):
    """Pre-flight, before sbatch: a missing dataset, a tokenizer larger than the model's
    vocabulary and a time limit shorter than USR1's lead are one line each, exit 2, and the
    cluster's queue stays empty; --no-check submits anyway."""
    cfg = job_config(corpus)
    cfg["data"]["paths"] = [str(tmp_path / "no-such-dataset")]
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(cfg))
    args = ["launch", "slurm", str(tmp_path / "bad.yaml"), "--nodes", "1", "--gpus-per-node",
            "0", "--nproc-per-node", "1", "--run-dir", str(tmp_path / "run")]  # fmt: skip
    out = subprocess.run([*CLI, *args, "--time", "2"], env=cluster.env, capture_output=True,
                         text=True, cwd=ROOT)  # fmt: skip
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "nothing was queued (2 problem(s)" in out.stderr
    assert f"{tmp_path / 'no-such-dataset'}.bin and " in out.stderr
    assert "--time 2 (120 s) leaves no room for a checkpoint: USR1 comes 300 s" in out.stderr
    assert cluster.run("squeue", "--noheader").stdout.strip() == ""
    assert not (tmp_path / "run").exists()
    small = job_config(corpus)
    small["model"]["vocab_size"] = 64  # the corpus' tokenizer has 512 tokens
    (tmp_path / "small.yaml").write_text(yaml.safe_dump(small))
    out = subprocess.run([*CLI, *args[:2], str(tmp_path / "small.yaml"), *args[3:]],
                         env=cluster.env, capture_output=True, text=True, cwd=ROOT)  # fmt: skip
    assert out.returncode == 2 and "model.vocab_size=64" in out.stderr
    assert cluster.run("squeue", "--noheader").stdout.strip() == ""
    job = submit(cluster, *args[2:], "--no-check")  # queued: it fails in the job instead
    state = cluster.wait(job)
    assert state["JobState"] == "FAILED"


@pytest.mark.slurm
def test_killed_job_requeues_and_resumes_logging_each_step_once(cluster, corpus, tmp_path):
    """kill -9 of the training processes mid-run (a crash, not a signal it can answer): the
    job requeues itself, resumes from the latest checkpoint and finishes; the steps the crash
    took past that checkpoint are taken again and logged once."""
    steps = 30
    config = write_config(tmp_path, corpus, train_steps=steps, save_interval=4)
    run_dir = tmp_path / "run"
    job = submit(
        cluster, str(config), "--nodes", "2", "--gpus-per-node", "0", "--nproc-per-node", "1",
        "--run-dir", str(run_dir),
    )  # fmt: skip
    latest = run_dir / "checkpoints" / "latest"
    deadline = time.time() + 300
    while not (latest.exists() and latest.read_text().strip() >= "step_0000006"):
        assert time.time() < deadline, "the job never saved a checkpoint"
        time.sleep(0.2)
    workers = [
        pid
        for pid in _processes_mentioning(str(run_dir))
        if "megatron_dyt.cli" in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        and b"megatron_dyt.launch.node" not in Path(f"/proc/{pid}/cmdline").read_bytes()
    ]
    assert workers
    for pid in workers:
        os.kill(pid, signal.SIGKILL)
    release_after_requeue(cluster, job)
    state = cluster.wait(job)
    log = (run_dir / "logs" / f"slurm-{job}.out").read_text()
    assert state["JobState"] == "COMPLETED", log[-3000:] + cluster.diagnostics(job)
    assert int(state["Restarts"]) == 1, log[-3000:]
    assert "training failed (exit " in log and "); requeueing job" in log
    assert "resuming from" in log
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "event" not in r] == list(range(1, steps + 1))
    assert json.loads((run_dir / "status.json").read_text())["state"] == "finished"


@pytest.mark.slurm
def test_a_job_that_fails_every_time_stops_after_max_requeues(cluster, corpus, tmp_path):
    """A crash with no newer checkpoint each time (here the site's setup breaks the launch)
    requeues --max-requeues times, then the job ends, the reason in its log; a config error
    (exit 2) is not requeued at all."""
    config = write_config(tmp_path, corpus)
    setup = tmp_path / "broken-site.sh"
    setup.write_text('srun() { echo "simulated crash of the launch" >&2; return 1; }\n')
    run_dir = tmp_path / "run"
    job = submit(
        cluster, str(config), "--nodes", "1", "--gpus-per-node", "0", "--nproc-per-node", "1",
        "--run-dir", str(run_dir), "--setup", str(setup), "--max-requeues", "2",
    )  # fmt: skip
    for restart in (1, 2):
        release_after_requeue(cluster, job, restarts=restart)
    state = cluster.wait(job)
    log = (run_dir / "logs" / f"slurm-{job}.out").read_text()
    assert state["JobState"] == "FAILED" and int(state["Restarts"]) == 2, log[-3000:]
    assert log.count("simulated crash of the launch") == 3
    assert "failed requeue 2 of 2" in log
    assert "training failed (exit 1) 2 requeue(s) in a row without progress" in log

    broken = job_config(corpus)
    broken["data"]["paths"] = [str(tmp_path / "no-such-dataset")]  # found missing at start
    (tmp_path / "broken.yaml").write_text(yaml.safe_dump(broken))
    bad = tmp_path / "bad"
    job = submit(
        cluster, str(tmp_path / "broken.yaml"), "--nodes", "1", "--gpus-per-node", "0",
        "--nproc-per-node", "1", "--run-dir", str(bad), "--no-check",
    )  # fmt: skip
    state = cluster.wait(job)
    log = (bad / "logs" / f"slurm-{job}.out").read_text()
    assert state["JobState"] == "FAILED" and int(state["Restarts"]) == 0, log[-3000:]
    assert "training exited with 2" in log and "requeueing" not in log


@pytest.mark.slurm
def test_a_sweep_run_on_two_nodes_equals_a_local_run(cluster, corpus, reference, tmp_path):
    """`sweep run --slurm --nodes-per-run 2`: the array task holds both nodes and trains its run
    with one torchrun per node (DP 2 across them), with the losses of `launch local --nproc 2`."""
    _, expected = reference
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(job_config(corpus)))
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({"base": "base.yaml", "grid": {"train.seed": [7]}}))
    out = tmp_path / "sweep"
    sub = subprocess.run(
        [*CLI, "sweep", "run", str(spec), "--out", str(out), "--slurm", "--nodes-per-run", "2"],
        env=cluster.env, capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    assert sub.returncode == 0, sub.stderr
    job = sub.stdout.split("submitted job array ")[1].split()[0]
    state = cluster.wait(f"{job}_0")
    (entry,) = json.loads((out / "plan.json").read_text())
    run_dir = out / entry["run_dir"]
    log = "".join(p.read_text() for p in (out / "slurm").glob("*.out"))
    assert state["JobState"] == "COMPLETED", log[-3000:] + cluster.diagnostics(f"{job}_0")
    assert json.loads((run_dir / "sweep.json").read_text())["state"] == "done"
    done = json.loads((run_dir / "checkpoints/step_0000008/complete.json").read_text())
    assert done["world_size"] == 2
    got = losses(run_dir)
    assert sorted(got) == sorted(expected)
    for step, loss in expected.items():
        assert got[step] == pytest.approx(loss, rel=1e-6, abs=0), step


@pytest.mark.slurm
def test_sweep_as_a_job_array_with_a_preempted_task(cluster, corpus, tmp_path):
    """`sweep run --slurm` on the cluster: one array task is signalled mid-run, checkpoints,
    requeues itself and resumes; every run finishes and `sweep report` writes its files.
    The runs are long enough (~0.1 s a step) that task 0 is still training when the signal
    lands: with 30 steps it could finish first on a loaded machine."""
    steps = 100
    base = job_config(corpus, train_steps=steps)
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    spec = tmp_path / "spec.yaml"
    grid = {"model.norm.alpha_attn": [0.5, 1.0], "model.norm.alpha_mlp": [0.3, 0.6]}
    spec.write_text(yaml.safe_dump({"base": "base.yaml", "grid": grid}))
    out = tmp_path / "sweep"
    sub = subprocess.run(
        [*CLI, "sweep", "run", str(spec), "--out", str(out), "--slurm"],
        env=cluster.env, capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    assert sub.returncode == 0, sub.stderr
    job = sub.stdout.split("submitted job array ")[1].split()[0]
    plan = json.loads((out / "plan.json").read_text())
    first = out / plan[0]["run_dir"] / "metrics.jsonl"
    deadline = time.time() + 300
    while not (first.exists() and len(first.read_text().splitlines()) >= 2):
        assert time.time() < deadline, "array task 0 never started training"
        time.sleep(0.2)
    cluster.run("scancel", "--batch", "--signal=USR1", f"{job}_0")
    release_after_requeue(cluster, f"{job}_0")
    cluster.wait(job)
    log0 = (out / "slurm" / f"{job}_0.out").read_text()
    assert "requeueing array task" in log0, log0[-3000:] + cluster.diagnostics(job)
    for entry in plan:
        run_dir = out / entry["run_dir"]
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
        done = [r["step"] for r in records if "event" not in r]  # not the checkpoint events
        assert done == list(range(1, steps + 1)), entry["name"]  # task 0: none lost or repeated
        assert json.loads((run_dir / "status.json").read_text())["state"] == "finished"
    report = subprocess.run([*CLI, "sweep", "report", str(out)], capture_output=True, text=True)
    assert report.returncode == 0, report.stderr
    files = {p.name for p in (out / "report").iterdir()}
    assert {"results.csv", "report.md"} <= files and any(f.endswith(".png") for f in files)
    rows = (out / "report" / "results.csv").read_text().splitlines()
    assert len(rows) == 1 + len(plan)
