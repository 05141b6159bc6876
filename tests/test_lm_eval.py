"""lm-eval as its users run it: the registered model `megatron-dyt`, `megatron-dyt lm-eval`,
few-shot and sample logs in `megatron-dyt eval`, and one BOS convention (none) shared by our
evaluation and lm-eval's `hf` backend on the Hugging Face export.

Per-request log-likelihoods are compared, not just accuracies: a BOS in front of the context on
one side only moves almost every one of them, while the accuracy may not move at all.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import distributed
import pytest
from common import tiny_dict, train_dict, train_worker

# Our model and the export in transformers, both fp32 on CPU, differ by the order of floating
# point sums only (docs/design.md: fused vs separate projections): ~1e-6 per token.
HF_ATOL = 1e-4
# `megatron-dyt eval` and `megatron-dyt lm-eval` run the same adapter on the same batches.
SAME_ATOL = 1e-6

SPACE_TASK = "spacepick"
# Which word completes the line? The choices follow the context after lm-eval's default
# target delimiter, a space, as in most real multiple-choice tasks.
SPACE_DOCS = [
    ("def add(a, b):\n    return a +", ["b", "a", "None", "self"], 0),
    ("for i in", ["range(10):", "range(10)", "10:", "loop:"], 0),
    ("import os\nimport", ["sys", "def", "return", "+"], 0),
    ("if x is", ["None:", "None", "none:", "null:"], 0),
    ("while True:\n    if done:\n       ", ["break", "return(", "stop", "exit;"], 0),
    ("class Point:\n    def", ["__init__(self):", "init(self):", "__init__:", "self:"], 0),
    ("x = [1, 2, 3]\ny = len(x) *", ["2", "x]", ")", "def"], 0),
    ("lines = text.split('\\n')\nprint(len(lines)", [")", "]", "}", "("], 0),
    ("try:\n    run()\nexcept", ["Exception:", "Exception", "catch:", "else:"], 0),
    ("def f(*args, **kwargs):\n    return", ["args", "*", "**", ")"], 0),
]


def _env() -> dict:
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


def _cli(*args: str, torchrun: int = 0, timeout: int = 400) -> subprocess.CompletedProcess:
    launcher = (
        [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={torchrun}"]
        + [f"--master-port={distributed._free_port()}", "-m", "megatron_dyt"]
        if torchrun
        else [sys.executable, "-m", "megatron_dyt"]
    )
    proc = subprocess.run(
        [*launcher, *args], capture_output=True, text=True, timeout=timeout, env=_env()
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    """A local task whose choices follow a space (data path absolute: lm-eval resolves a
    relative one from the working directory)."""
    folder = tmp_path_factory.mktemp("tasks")
    docs = [{"context": c, "choices": ch, "label": y} for c, ch, y in SPACE_DOCS]
    (folder / f"{SPACE_TASK}.json").write_text(json.dumps(docs, indent=1))
    (folder / f"{SPACE_TASK}.yaml").write_text(
        f"task: {SPACE_TASK}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {folder / f'{SPACE_TASK}.json'}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{context}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        "doc_to_target: label\n"
        "metric_list:\n  - metric: acc\n"
        "metadata:\n  version: 1.0\n"
    )
    return folder


@pytest.fixture(scope="module")
def run(corpus, tmp_path_factory) -> Path:
    """A DyT model trained 2 steps in one process (fp32; vocabulary 512, no padding rows)."""
    tmp = tmp_path_factory.mktemp("lmeval-run")
    cfg = train_dict(corpus, train_steps=2)
    cfg["model"]["norm"]["backend"] = "torch"
    distributed.run(train_worker, 1, cfg, str(tmp / "run"), tmp_path=tmp)
    return tmp / "run"


@pytest.fixture(scope="module")
def export(run, tmp_path_factory) -> Path:
    from megatron_dyt.convert.to_hf import export_to_hf

    return export_to_hf(run, tmp_path_factory.mktemp("lmeval-hf") / "hf", progress=False)


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _loglikelihoods(samples: list[dict]) -> dict[tuple[int, int], float]:
    """(document, choice) → the log-likelihood lm-eval logged for that request."""
    out = {}
    for s in samples:
        for i, resp in enumerate(s["resps"]):
            out[(s["doc_id"], i)] = float(resp[0][0])
    return out


def _hf_backend(export: Path, task_dir: Path, tasks: list[str], **kwargs) -> dict:
    """lm-eval's own `hf` backend on the export: per task, the per-request log-likelihoods."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from megatron_dyt.eval.run import offline_task_dir

    results = lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={export},trust_remote_code=True,dtype=float32",
        tasks=tasks,
        task_manager=TaskManager(include_path=[str(offline_task_dir()), str(task_dir)]),
        device="cpu",
        batch_size=4,
        log_samples=True,
        bootstrap_iters=0,
        **kwargs,
    )
    return {t: _loglikelihoods(results["samples"][t]) for t in tasks}


def _assert_close(got: dict, want: dict, atol: float) -> None:
    assert sorted(got) == sorted(want) and got
    worst = max(abs(got[k] - want[k]) for k in want)
    assert worst <= atol, f"largest difference {worst:.3g} nats"


@pytest.mark.slow  # train, export, one CLI run, lm-eval's hf backend (~1 min)
def test_eval_and_the_hf_backend_on_the_export_score_alike(run, export, task_dir, tmp_path):
    config = json.loads((export / "tokenizer_config.json").read_text())
    assert config["add_bos_token"] is False  # the export adds no BOS, as training never does
    out = tmp_path / "eval"
    proc = _cli(
        "eval", str(run), "--tasks", SPACE_TASK, "--include-path", str(task_dir),
        "--log-samples", "--batch-size", "4", "--out", str(out),
    )  # fmt: skip
    assert f"| {SPACE_TASK} | acc |" in proc.stdout
    ours = _loglikelihoods(_read_jsonl(out / f"samples_{SPACE_TASK}.jsonl"))
    assert len(ours) == 4 * len(SPACE_DOCS)
    hf = _hf_backend(export, task_dir, [SPACE_TASK])[SPACE_TASK]
    _assert_close(ours, hf, HF_ATOL)


def _lm_eval_outputs(out: Path, tasks: list[str]) -> tuple[dict, dict]:
    """lm-eval's results_<date>.json and per task its samples_<task>_<date>.jsonl."""
    results = sorted(out.rglob("results_*.json"))
    assert len(results) == 1, results  # one writer
    samples = {}
    for task in tasks:
        files = sorted(out.rglob(f"samples_{task}_*.jsonl"))
        assert len(files) == 1, files
        samples[task] = _loglikelihoods(_read_jsonl(files[0]))
    return json.loads(results[0].read_text()), samples


@pytest.mark.slow  # two CLI runs and lm-eval's hf backend (~2 min)
def test_lm_eval_command_few_shot_matches_eval_and_the_hf_backend(run, export, task_dir, tmp_path):
    tasks = ["pycloze", SPACE_TASK]
    out = tmp_path / "lm-eval"
    proc = _cli(
        "lm-eval", "--model", "megatron-dyt", "--model_args", f"pretrained={run},batch_size=4",
        "--tasks", ",".join(tasks), "--include_path", str(task_dir), "--num_fewshot", "2",
        "--limit", "6", "--log_samples", "--output_path", str(out), "--device", "cpu",
    )  # fmt: skip
    assert "pycloze" in proc.stdout and SPACE_TASK in proc.stdout  # lm-eval's table
    results, harness = _lm_eval_outputs(out, tasks)
    assert results["config"]["model"] == "megatron-dyt"
    assert results["config"]["layout"] == {"tensor": 1, "pipeline": 1, "data": 1}
    assert results["n-shot"] == {t: 2 for t in tasks}
    assert all(len(harness[t]) == 6 * 4 for t in tasks)  # 6 documents × 4 choices

    ev = tmp_path / "eval"
    _cli(
        "eval", str(run), "--tasks", ",".join(tasks), "--include-path", str(task_dir),
        "--num-fewshot", "2", "--limit", "6", "--log-samples", "--batch-size", "4",
        "--out", str(ev),
    )  # fmt: skip
    for task in tasks:
        ours = _loglikelihoods(_read_jsonl(ev / f"samples_{task}.jsonl"))
        _assert_close(harness[task], ours, SAME_ATOL)
        assert json.loads((ev / "results.json").read_text())["n-shot"][task] == 2
    # The hf backend stops on pycloze (its empty target delimiter lets a choice merge into the
    # context's last token: an empty continuation); it scores the task whose choices follow a
    # space exactly as we do.
    hf = _hf_backend(export, task_dir, [SPACE_TASK], num_fewshot=2, limit=6)
    _assert_close(harness[SPACE_TASK], hf[SPACE_TASK], HF_ATOL)


@pytest.mark.distributed  # torchrun, 2 processes
def test_lm_eval_command_under_torchrun_at_pp2(run, task_dir, tmp_path):
    """A pipeline of two stages under torchrun scores like one process; only rank 0 writes."""
    from megatron_dyt.convert.reshard import reshard_checkpoint

    pp2 = reshard_checkpoint(run, tmp_path / "pp2", pipeline=2, zero_stage=1, progress=False)
    outputs = {}
    for name, procs, model in (("one", 0, run), ("pp2", 2, pp2)):
        out = tmp_path / name
        _cli(
            "lm-eval", "--model_args", f"pretrained={model},batch_size=3", "--tasks", SPACE_TASK,
            "--include_path", str(task_dir), "--limit", "5", "--log_samples",
            "--output_path", str(out), "--device", "cpu", torchrun=procs,
        )  # fmt: skip
        outputs[name] = _lm_eval_outputs(out, [SPACE_TASK])
    results, samples = outputs["pp2"]
    assert results["config"]["layout"] == {"tensor": 1, "pipeline": 2, "data": 1}
    assert results["config"]["batch_sizes"] == [3]  # ours, beside the CLI's own default of 1
    _assert_close(samples[SPACE_TASK], outputs["one"][1][SPACE_TASK], HF_ATOL)


# ---- registration and bad input ------------------------------------------------------------------


def test_the_model_is_registered_beside_lm_evals_own():
    import lm_eval.api.registry as registry

    from megatron_dyt.eval.adapter import MegatronDyTLM

    assert registry.get_model("megatron-dyt") is MegatronDyTLM
    assert registry.get_model("hf").__name__ == "HFLM"  # registering ours hides none of lm-eval's


@pytest.mark.parametrize(
    "args,message",
    [
        (
            "pretrained=x,batchsize=8",
            "unknown --model_args key 'batchsize' (did you mean batch_size?) for model"
            " 'megatron-dyt'; allowed: pretrained, batch_size,",
        ),
        ("batch_size=8", "needs pretrained=RUN_DIR_OR_CHECKPOINT"),
        ("pretrained=x,batch_size=0", "batch_size=0: expected a positive whole number or 'auto'"),
        ("pretrained=x,max_gen_toks=-1", "max_gen_toks=-1: expected a positive whole number"),
    ],
)
def test_bad_model_args_are_named(args, message):
    from megatron_dyt.errors import EvalError
    from megatron_dyt.eval.adapter import MegatronDyTLM

    with pytest.raises(EvalError) as err:
        MegatronDyTLM.create_from_arg_string(args, {"batch_size": 1, "device": "cuda:0"})
    assert message in str(err.value)


def test_bad_dtype_and_device_are_named():
    from megatron_dyt.config import config_from_dict
    from megatron_dyt.errors import UsageError
    from megatron_dyt.inference.load import load_checkpoint, resolve_dtype

    with pytest.raises(UsageError, match="dtype 'float64' is not allowed; allowed: auto, float32"):
        resolve_dtype("float64", config_from_dict(tiny_dict()))
    with pytest.raises(UsageError, match="device 'tpu' is not allowed; allowed: cuda, cpu"):
        load_checkpoint("nowhere", device="tpu")


@pytest.mark.slow  # the CLI in a fresh interpreter, lm-eval's task index
def test_command_line_errors_are_one_line(run, tmp_path):
    cases = [
        (
            ["lm-eval", "--model_args", f"pretrained={run},bogus=1", "--tasks", "pycloze"],
            "unknown --model_args key 'bogus'",
        ),
        (["lm-eval", "--model_args", f"pretrained={run}"], "lm-eval: No tasks specified"),
        (["eval", str(run), "--num-fewshot", "-1"], "argument --num-fewshot: '-1': expected"),
        (
            ["eval", str(run), "--include-path", str(tmp_path / "none")],
            f"include path '{tmp_path / 'none'}' is not a folder",
        ),
    ]
    for args, message in cases:
        proc = subprocess.run(
            [sys.executable, "-m", "megatron_dyt", *args],
            capture_output=True,
            text=True,
            timeout=300,
            env=_env(),
        )
        assert proc.returncode == 2, (args, proc.stderr[-3000:])
        assert message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-3000:]


@pytest.mark.parametrize(
    "content,message",
    [
        (b"task: x\n\x80\x81", "is not UTF-8 text (byte 0x80 at offset 8)"),
        (b"task: x\ndataset_path: [unclosed\n", "is not valid YAML (line 3, column 1: expected"),
    ],
)
def test_a_damaged_task_file_of_an_include_path_is_named(tmp_path, content, message):
    """lm-eval would skip it with a log line (and call the task unknown): one error instead."""
    from megatron_dyt.errors import MegatronDyTError
    from megatron_dyt.eval.run import task_manager

    (tmp_path / "good.yaml").write_text("task: fine\nprocess_docs: !function utils.docs\n")
    (tmp_path / "bad.yaml").write_bytes(content)
    with pytest.raises(MegatronDyTError) as exc:
        task_manager(tmp_path)
    assert f"lm-eval task file '{tmp_path / 'bad.yaml'}'" in str(exc.value)
    assert message in str(exc.value) and "\n" not in str(exc.value)
