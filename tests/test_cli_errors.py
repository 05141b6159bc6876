"""What the `megatron-dyt` command does with an exception: bad input (a `MegatronDyTError`, or an
OSError naming a path) is one line on stderr and its exit code; anything else is a bug and keeps
its traceback."""

from __future__ import annotations

import pytest

from megatron_dyt import cli
from megatron_dyt.errors import MegatronDyTError, UsageError
from megatron_dyt.training.trainer import TrainingError


def _main_raising(monkeypatch, exc: BaseException) -> int:
    """`megatron-dyt info …` whose command raises `exc` (the parser is built inside `main`)."""

    def boom(args):
        raise exc

    monkeypatch.setattr(cli, "cmd_info", boom)
    return cli.main(["info", "configs/tiny-dyt.yaml"])


@pytest.mark.parametrize(
    "exc, code",
    [
        (UsageError("--batch-size '0': expected a positive integer or 'auto'"), 2),
        (TrainingError("loss is nan at step 5: training diverged"), 1),
        (FileNotFoundError(2, "No such file or directory", "/no/such/file"), 2),
    ],
)
def test_bad_input_is_one_line(monkeypatch, capsys, exc, code):
    assert _main_raising(monkeypatch, exc) == code
    err = capsys.readouterr().err
    assert err == f"megatron-dyt: error: {exc}\n"


@pytest.mark.parametrize(
    "exc", [KeyError("weight"), ValueError("a bug"), OSError("no path involved"), TypeError("x")]
)
def test_a_bug_keeps_its_traceback(monkeypatch, exc):
    assert not isinstance(exc, MegatronDyTError)
    with pytest.raises(type(exc)):
        _main_raising(monkeypatch, exc)


@pytest.mark.parametrize("command", ["info", "train", "launch"])
def test_a_binary_config_file_is_one_line_naming_it(tmp_path, capsys, command):
    from megatron_dyt.cli import main

    config = tmp_path / "damaged.yaml"
    config.write_bytes(b"model:\n  name: \x80\x81\x82\n")
    args = {
        "info": ["info", str(config)],
        "train": ["train", str(config), "--run-dir", str(tmp_path / "run")],
        "launch": ["launch", "slurm", str(config), "--nodes", "1", "--dry-run"],
    }[command]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"config file '{config}' is not UTF-8 text (byte 0x80 at offset 15)" in err
    assert "Traceback" not in err and not (tmp_path / "run").exists()
