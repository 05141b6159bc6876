"""The install and the layout: what the README's entry points import, from the repository root.

`python -m megatron_dyt …`, `torchrun -m …` and the sbatch script all run with the repository
root first on `sys.path`. So no folder there may be a regular package that shadows an installed
distribution (Hugging Face's `kernels` did: docs/design.md §2), and the wheel must hold
everything the package reads at run time.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import megatron_dyt

ROOT = Path(__file__).resolve().parents[1]


def run_at_root(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
    )


def top_level_names() -> list[str]:
    """Every name that `import NAME` could find at the repository root."""
    names = []
    for entry in ROOT.iterdir():
        if entry.name.startswith(".") or entry.name.endswith(".egg-info"):
            continue
        if entry.is_dir() and entry.name.isidentifier():
            names.append(entry.name)
        elif entry.suffix == ".py" and entry.stem.isidentifier():
            names.append(entry.stem)
    return sorted(names)


def test_the_promised_layout_is_there():
    for folder in ("megatron_dyt", "kernels", "configs", "launch", "eval", "tests"):
        assert (ROOT / folder).is_dir(), folder
    for folder in ("kernels", "launch", "eval"):  # guides for users, no Python
        assert (ROOT / folder / "README.md").is_file(), folder
        assert not list((ROOT / folder).rglob("*.py")), f"{folder}/ must hold no Python code"


@pytest.mark.parametrize(
    "args",
    [
        ["-m", "megatron_dyt", "--help"],
        ["-m", "megatron_dyt", "convert", "to-hf", "--help"],
        ["-c", "from transformers import LlamaForCausalLM; import lm_eval.models.huggingface"],
        [
            "-c",
            "import megatron_dyt.kernels.ops, megatron_dyt.eval.adapter, megatron_dyt.sweep.cli",
        ],
    ],
    ids=["cli", "convert-to-hf", "transformers+lm-eval-hf", "subpackages"],
)
@pytest.mark.slow  # a fresh interpreter that imports torch and more: 2-5 s each
def test_entry_points_import_from_the_repo_root(args):
    done = run_at_root(*args)
    assert done.returncode == 0, done.stderr[-3000:]


def test_nothing_at_the_repo_root_resolves_as_a_module_but_megatron_dyt():
    """A folder without `__init__.py` may still come back as a namespace package (origin None),
    which every regular package of that name elsewhere on sys.path outranks; a regular module or
    package inside the repository would win over the installed one."""
    names = top_level_names()
    assert {"megatron_dyt", "kernels", "eval", "launch"} <= set(names)
    probe = (
        "import importlib.util, json, sys\n"
        "out = {}\n"
        "for name in sys.argv[1:]:\n"
        "    spec = importlib.util.find_spec(name)\n"
        "    out[name] = None if spec is None else spec.origin\n"
        "print(json.dumps(out))\n"
    )
    done = run_at_root("-c", probe, *names)
    assert done.returncode == 0, done.stderr
    origins = json.loads(done.stdout)
    inside = {
        name: origin
        for name, origin in origins.items()
        if origin
        and name != "megatron_dyt"
        and Path(origin).resolve().parent in (ROOT, ROOT / name)
    }
    assert not inside, f"these resolve to code in the repository root: {inside}"
    assert origins["megatron_dyt"] == str(ROOT / "megatron_dyt" / "__init__.py")


def test_an_installed_package_wins_over_every_folder_at_the_root(tmp_path):
    """What broke `convert to-hf`: an installed `kernels` hidden by the repository's folder."""
    names = [n for n in top_level_names() if n != "megatron_dyt"]
    for name in names:
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text("WHO = 'installed'\n")
    probe = "import importlib, sys\nfor n in sys.argv[1:]:\n    importlib.import_module(n).WHO\n"
    done = run_at_root("-c", probe, *names, env={"PYTHONPATH": str(tmp_path)})
    assert done.returncode == 0, done.stderr[-2000:]


def test_version_everywhere(capsys):
    done = run_at_root("-m", "megatron_dyt", "--version")
    assert done.returncode == 0
    assert done.stdout.strip() == f"megatron-dyt {megatron_dyt.__version__}"
    from importlib.metadata import version

    assert version("megatron-dyt") == megatron_dyt.__version__


@pytest.mark.slow  # pip builds a wheel: 2-8 s
def test_the_wheel_holds_one_package_with_its_data(tmp_path):
    # Built from a copy: setuptools writes build/ and *.egg-info next to the sources.
    src = tmp_path / "src"
    skip = shutil.ignore_patterns("__pycache__", "*.egg-info", "build")
    shutil.copytree(ROOT / "megatron_dyt", src / "megatron_dyt", ignore=skip)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation"]
        + ["-w", str(tmp_path), str(src)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (wheel,) = tmp_path.glob("megatron_dyt-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops == {"megatron_dyt", f"megatron_dyt-{megatron_dyt.__version__}.dist-info"}
    for needed in (
        "megatron_dyt/kernels/ops.py",
        "megatron_dyt/eval/adapter.py",
        "megatron_dyt/eval/tasks/pycloze.yaml",
        "megatron_dyt/eval/tasks/pycloze.json",
        "megatron_dyt/sweep/cli.py",
        "megatron_dyt/launch/templates/sbatch.sh",
        "megatron_dyt/convert/hf_code/modeling_megatron_dyt.py",
    ):
        assert needed in names, needed
    # Installed from the wheel alone (no editable finder, outside the repository), the package
    # finds its data files.
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(site)
    probe = (
        "import sys; sys.path.insert(0, sys.argv[1])\n"
        "import megatron_dyt, megatron_dyt.eval.suites as s\n"
        "from importlib import resources\n"
        "assert megatron_dyt.__file__.startswith(sys.argv[1]), megatron_dyt.__file__\n"
        "assert (s.TASK_DIR / 'pycloze.yaml').is_file()\n"
        "assert resources.files('megatron_dyt.launch').joinpath('templates/sbatch.sh').is_file()\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe, str(site)], cwd=tmp_path, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
