"""The lm-eval adapter: exact loglikelihoods, TP/PP/DP equivalence, the `eval` command."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import distributed
import pytest
import torch
import torch.nn.functional as F
from common import tiny_dict, train_dict, train_worker

from megatron_dyt.config import config_from_dict

TASK = "pycloze"


def eval_dict(corpus: dict, tp: int = 1, pp: int = 1) -> dict:
    # seq 24 < the longest request, so left truncation is exercised too.
    return tiny_dict("dyt", tp=tp, pp=pp, num_layers=2, seq_length=24, vocab_size=512)


def _requests(rank: int, world: int):
    from lm_eval.tasks import get_task_dict

    from megatron_dyt.eval.run import task_manager

    task = get_task_dict([TASK], task_manager())[TASK]
    task.build_all_requests(rank=rank, world_size=world)
    return task.instances


def _build(cfg_dict: dict, full: dict | None, tokenizer_path: str, batch_size: int):
    from megatron.core import parallel_state as ps

    from megatron_dyt import parallel
    from megatron_dyt.data import load_tokenizer
    from megatron_dyt.eval.adapter import make_lm
    from megatron_dyt.model import (
        LlamaModel,
        full_state_dict,
        init_weights,
        load_full_state_dict,
        stage_module,
    )

    cfg = config_from_dict(cfg_dict)
    parallel.setup(cfg.parallel)
    if cfg.parallel.pipeline == 1:
        module = LlamaModel(cfg)
    else:
        module = stage_module(cfg, ps.get_pipeline_model_parallel_rank())
    init_weights(module, cfg.model, cfg.train.seed)
    if full is not None:
        load_full_state_dict(module, full)
    lm = make_lm(
        module, cfg, load_tokenizer(tokenizer_path), torch.device("cpu"), torch.float32, batch_size
    )
    return cfg, module, lm, full_state_dict(module)


def _score(cfg_dict: dict, full: dict | None, tokenizer_path: str, batch_size: int) -> dict:
    """This rank's share of the offline task's loglikelihoods, and the task score."""
    from megatron_dyt.eval.run import evaluate

    cfg, module, lm, weights = _build(cfg_dict, full, tokenizer_path, batch_size)
    instances = _requests(lm.rank, lm.world_size)
    out = {
        "weights": weights,
        "keys": [(i.doc_id, i.idx) for i in instances],
        "ll": lm.loglikelihood(instances, disable_tqdm=True),
    }
    results = evaluate(lm, [TASK], bootstrap_iters=0)
    out["acc"] = results["results"][TASK]["acc,none"] if results else None
    if cfg.parallel.tensor == cfg.parallel.pipeline == lm.world_size == 1:
        out["direct"] = [_direct(module, lm, i) for i in instances]
    return out


@torch.no_grad()
def _direct(model, lm, instance) -> tuple[float, bool]:
    """Sum of target-token log-probs with one unpadded sequence, as lm-eval's HF backend slices."""
    context, continuation = instance.args
    ctx, cont = lm._encode_pair(context, continuation)
    whole = (ctx + cont)[-(lm.max_length + 1) :]
    logits = model(torch.tensor([whole[:-1]]))[:, 0, : lm.info.vocab_size].float()  # [s, v]
    logp = F.log_softmax(logits, dim=-1)[-len(cont) :]
    target = torch.tensor(cont)
    greedy = bool((logp.argmax(-1) == target).all())
    return logp.gather(1, target[:, None]).sum().item(), greedy


@pytest.fixture(scope="module")
def single(corpus, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("single")
    return distributed.run(
        _score, 1, eval_dict(corpus), None, corpus["tokenizer"], 5, tmp_path=tmp
    )[0]


@pytest.mark.slow  # one spawned rank scores the whole task (~25 s)
def test_loglikelihoods_equal_a_direct_computation(single):
    assert len(single["ll"]) == 4 * 32  # 32 documents × 4 choices
    for (ll, greedy), (ref, ref_greedy) in zip(single["ll"], single["direct"], strict=True):
        assert ll == pytest.approx(ref, abs=1e-4)  # batched + right-padded vs one by one
        assert greedy == ref_greedy
    assert 0 <= single["acc"] <= 1


@pytest.mark.parametrize("tp,pp,dp", [(2, 1, 1), (1, 2, 1), (1, 1, 2)])
@pytest.mark.distributed
def test_parallel_layouts_give_the_same_loglikelihoods(tp, pp, dp, corpus, single, tmp_path):
    ranks = distributed.run(
        _score,
        tp * pp * dp,
        eval_dict(corpus, tp=tp, pp=pp),
        single["weights"],
        corpus["tokenizer"],
        5,
        tmp_path=tmp_path,
    )
    reference = dict(zip(single["keys"], single["ll"], strict=True))
    seen = set()
    for r in ranks:
        for key, (ll, greedy) in zip(r["keys"], r["ll"], strict=True):
            assert ll == pytest.approx(reference[key][0], abs=1e-4), key
            assert greedy == reference[key][1]
            seen.add(key)
    assert seen == set(reference)  # DP ranks split the requests between them, all are scored
    assert ranks[0]["acc"] == single["acc"]


def _rolling_and_generate(cfg_dict: dict, tokenizer_path: str) -> dict:
    from lm_eval.api.instance import Instance

    cfg, model, lm, _ = _build(cfg_dict, None, tokenizer_path, 3)
    text = "def add(a, b):\n    return a + b\n\n" * 6  # longer than the 24-token context
    rolling = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])[0]
    tokens = lm.tok_encode(text)
    seq, L = [lm.prefix_token_id, *tokens], lm.max_length
    direct = 0.0
    with torch.no_grad():
        # Predict tokens[p : p + n] in chunks of L, each with as much context as fits (≤ L).
        for p in range(0, len(tokens), L):
            end = min(p + L, len(tokens))
            begin = max(0, end - L)
            logits = model(torch.tensor([seq[begin:end]]))[:, 0, : cfg.model.vocab_size]
            logp = F.log_softmax(logits.float(), -1)[-(end - p) :]
            direct += logp.gather(1, torch.tensor(seq[p + 1 : end + 1])[:, None]).sum().item()
    generated = lm.generate_until(
        [Instance("generate_until", {}, ("def f(x):\n", {"until": ["\n\n"], "max_gen_toks": 6}), 0)]
    )[0]
    # The same greedy loop written out by hand.
    ids = lm.tok_encode("def f(x):\n")
    manual = []
    with torch.no_grad():
        for _ in range(6):
            window = (ids + manual)[-lm.max_length :]
            logits = model(torch.tensor([window]))[-1, 0, : cfg.model.vocab_size]
            nxt = int(logits.argmax())
            if nxt == lm.eot_token_id:
                break
            manual.append(nxt)
            if "\n\n" in lm.tok_decode(manual):
                break
    # Edge cases lm-eval's HF model accepts: an empty context, an empty stop string.
    edge = lm.generate_until(
        [
            Instance("generate_until", {}, ("", {"until": ["", "\n\n"], "max_gen_toks": 3}), 0),
            Instance("generate_until", {}, ("def f(x):\n", {"until": [""], "max_gen_toks": 6}), 1),
        ]
    )
    empty = []  # the empty context by hand: greedy from the prefix token alone
    with torch.no_grad():
        for _ in range(3):
            logits = model(torch.tensor([[lm.prefix_token_id, *empty]]))[-1, 0]
            nxt = int(logits[: cfg.model.vocab_size].argmax())
            if nxt == lm.eot_token_id:
                break
            empty.append(nxt)
            if "\n\n" in lm.tok_decode(empty):
                break
    return {
        "edge": edge,
        "empty_manual": lm.tok_decode(empty).split("\n\n")[0],
        "rolling": rolling,
        "direct": direct,
        "generated": generated,
        "manual": lm.tok_decode(manual).split("\n\n")[0],
        "n_tokens": len(tokens),
    }


@pytest.mark.slow  # a spawned rank (~8 s)
def test_rolling_windows_and_greedy_generation(corpus, tmp_path):
    out = distributed.run(
        _rolling_and_generate, 1, eval_dict(corpus), corpus["tokenizer"], tmp_path=tmp_path
    )[0]
    assert out["n_tokens"] > 24  # several disjoint windows
    assert out["rolling"] == pytest.approx(out["direct"], abs=1e-3)
    assert out["rolling"] < 0 and math.isfinite(out["rolling"])
    assert out["generated"] == out["manual"]
    assert out["edge"][0] == out["empty_manual"]
    assert out["edge"][1].startswith(out["generated"])  # the same tokens, no stop string


@pytest.fixture(scope="module")
def trained_tp2(corpus, tmp_path_factory):
    """A checkpoint saved by `megatron-dyt train` at TP=2 (two processes). Its vocabulary of 513
    is padded to 514 rows at TP=2 but 513 at TP=1: evaluating it in one process must refit them."""
    tmp = tmp_path_factory.mktemp("trained")
    run = tmp / "run"
    cfg = train_dict(corpus, tp=2, train_steps=2)
    cfg["model"].update(vocab_size=513, make_vocab_size_divisible_by=1)
    distributed.run(train_worker, 2, cfg, str(run), tmp_path=tmp)
    return run


def _eval_checkpoint(path: str, out: str) -> dict | None:
    from megatron_dyt.eval.run import evaluate_checkpoint

    result = evaluate_checkpoint(path, [TASK], batch_size=4, out_dir=out)
    return result.summary


@pytest.mark.distributed
def test_eval_command_merges_tp_shards_in_one_process(trained_tp2, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "megatron_dyt",
            "eval",
            str(trained_tp2),
            "--tasks",
            TASK,
            "--batch-size",
            "4",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    assert "| pycloze | acc |" in proc.stdout
    results = json.loads((out / "results.json").read_text())
    acc = results["results"][TASK]["acc,none"]
    assert "average (headline metric per task)" in (out / "results.md").read_text()
    # The same checkpoint evaluated at its saved layout, TP=2 in two processes.
    ranks = distributed.run(
        _eval_checkpoint, 2, str(trained_tp2), str(tmp_path / "tp2"), tmp_path=tmp_path
    )
    assert ranks[0]["rows"][0]["value"] == pytest.approx(acc)


@pytest.mark.distributed  # trained_tp2: two ranks
def test_eval_errors(trained_tp2, tmp_path, capsys):
    from megatron_dyt.cli import main

    assert main(["eval", str(trained_tp2), "--tasks", "pyclose"]) == 2
    err = capsys.readouterr().err
    assert "unknown task 'pyclose' (close: pycloze" in err and "Traceback" not in err
    assert main(["eval", str(tmp_path / "nope")]) == 2
    assert f"checkpoint '{tmp_path / 'nope'}' does not exist" in capsys.readouterr().err
    assert main(["eval", str(tmp_path)]) == 2
    assert "no complete checkpoint under" in capsys.readouterr().err
    assert main(["eval", str(trained_tp2), "model.ffn_hidden_size=128", "--limit", "1"]) == 2
    assert (
        "tensor 'layers.0.mlp.gate_up.weight' has shape [192, 64], the model expects [256, 64]"
        in capsys.readouterr().err
    )


def test_suites():
    from megatron_dyt.eval.suites import SUITES, expand, summarize

    assert len(SUITES["paper15"]) == 15
    assert expand(None, "paper15") == SUITES["paper15"]
    assert expand("quick,pycloze", None) == [*SUITES["quick"], "pycloze"]
    with pytest.raises(ValueError, match="unknown suite 'paper16'"):
        expand(None, "paper16")
    s = summarize(
        {
            "record": {"f1,none": 0.5, "em,none": 0.4, "f1_stderr,none": 0.01},
            "boolq": {"acc,none": 0.7},
        },
        ["record", "boolq"],
    )
    assert [r["metric"] for r in s["rows"]] == ["f1", "acc"]
    assert s["average_headline"] == pytest.approx(0.6)
    assert s["average_all_metrics"] == pytest.approx((0.5 + 0.4 + 0.7) / 3)


@pytest.mark.slow  # lm-eval's task index is built first: 5-12 s
def test_missing_hf_dataset_is_named(monkeypatch):
    from megatron_dyt.eval.run import check_datasets, task_manager

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", "/nonexistent-cache")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError) as err:
        check_datasets(["piqa"], task_manager())
    text = str(err.value)
    assert "task 'piqa'" in text and "HF_DATASETS_OFFLINE=1" in text
    assert "datasets.load_dataset(" in text


def test_bundled_task_data_is_absolute():
    import yaml

    from megatron_dyt.eval.run import offline_task_dir

    config = yaml.safe_load((offline_task_dir() / "pycloze.yaml").read_text())
    path = Path(config["dataset_kwargs"]["data_files"]["test"])
    assert path.is_absolute() and path.is_file()
    assert len(json.loads(path.read_text())) == 32


@pytest.mark.slow
def test_zero_shot_scores_are_logged_during_training(corpus, tmp_path):
    cfg = train_dict(corpus, train_steps=4)
    cfg["eval"] = {"suite": "offline", "every_n_steps": 2, "limit": 8, "batch_size": 4}
    distributed.run(train_worker, 1, cfg, str(tmp_path / "run"), tmp_path=tmp_path)
    lines = [json.loads(x) for x in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    scored = {x["step"]: x["eval/pycloze/acc"] for x in lines if "eval/pycloze/acc" in x}
    assert sorted(scored) == [2, 4]
    assert all(0 <= v <= 1 for v in scored.values())
