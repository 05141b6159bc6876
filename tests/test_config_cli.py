"""`megatron-dyt config keys` (the reference generated from the schema) and `config show`."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from megatron_dyt.cli import main
from megatron_dyt.config import Config, load_config
from megatron_dyt.config_cli import key_docs

ROOT = Path(__file__).resolve().parents[1]


def _schema(model: type[BaseModel] = Config, prefix: str = "") -> tuple[dict, set]:
    """(leaf key -> its field, section keys), walked from the pydantic models themselves."""
    leaves, sections = {}, set()
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            sections.add(prefix + name)
            sub_leaves, sub_sections = _schema(ann, f"{prefix}{name}.")
            leaves.update(sub_leaves)
            sections |= sub_sections
        else:
            leaves[prefix + name] = field
    return leaves, sections


def test_every_key_has_a_description():
    leaves, _ = _schema()
    assert len(leaves) > 50
    for key, field in leaves.items():
        assert field.description and field.description.strip(), key


def test_keys_lists_exactly_the_schema(capsys):
    assert main(["config", "keys"]) == 0
    out = capsys.readouterr().out
    leaves, sections = _schema()
    rows = [line for line in out.splitlines() if line and not line.startswith("[")]
    headings = [line for line in out.splitlines() if line.startswith("[")]
    assert [row.split()[0] for row in rows] == list(leaves)  # schema order, each once
    assert {h[1 : h.index("]")] for h in headings} == sections
    docs = {d.key: d for d in key_docs()}
    for row in rows:
        doc = docs[row.split()[0]]
        assert doc.description and row.endswith(doc.description), row
    for heading in headings:
        assert heading.split("]", 1)[1].strip()  # sections are described too
    # Columns line up: every description starts in the same column.
    starts = {row.index(docs[row.split()[0]].description) for row in rows}
    assert len(starts) == 1


def test_keys_show_types_bounds_and_defaults():
    docs = {d.key: d for d in key_docs()}
    assert (docs["model.num_kv_heads"].type, docs["model.num_kv_heads"].default) == (
        "int | null (> 0)",
        "null",
    )
    assert docs["model.norm.kind"].type == "rmsnorm | layernorm | dyt | derf"
    assert docs["train.min_lr_ratio"].type == "float (>= 0, <= 1)"
    assert (docs["data.paths"].type, docs["data.paths"].default) == ("list[str]", "[]")
    assert docs["model.norm.eps"].default == "1.0e-05"
    assert docs["model.norm"].type == "section"


def test_keys_markdown_is_one_table_of_the_schema(capsys):
    assert main(["config", "keys", "--markdown"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[:2] == ["| key | type | default | description |", "|---|---|---|---|"]
    leaves, sections = _schema()
    keys, heads = [], set()
    for line in lines[2:]:
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        assert len(cells) == 4 and cells[3], line  # escaped pipes (int \| null) stay in a cell
        if cells[1] == "section":
            heads.add(cells[0].strip("*"))
        else:
            keys.append(cells[0].strip("`"))
    assert keys == list(leaves) and heads == sections


def test_show_prints_the_resolved_config_with_overrides(capsys, tmp_path):
    preset = ROOT / "configs/llama-7b-dyt.yaml"
    overrides = ["train.lr=1e-4", "model.norm.alpha_attn=0.5", "parallel.tensor=2"]
    assert main(["config", "show", str(preset), *overrides]) == 0
    out = capsys.readouterr().out
    expected = load_config(preset, overrides)
    assert out == expected.to_yaml()  # what a run saves as its config.yaml
    assert "base" not in yaml.safe_load(out)
    (tmp_path / "config.yaml").write_text(out)
    again = load_config(tmp_path / "config.yaml")
    assert again == expected
    assert (again.train.lr, again.model.norm.alpha_attn, again.parallel.tensor) == (1e-4, 0.5, 2)


@pytest.mark.parametrize(
    "args,message",
    [
        (["missing.yaml"], "config file 'missing.yaml' does not exist"),
        (["configs/tiny-dyt.yaml", "train.lrr=1"], "did you mean 'train.lr'?"),
        (["configs/tiny-dyt.yaml", "train.lr=-1"], "train.lr=-1: Input should be greater than 0"),
    ],
    ids=["missing-file", "unknown-key", "bad-value"],
)
def test_show_reports_bad_input_without_traceback(args, message, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert main(["config", "show", *args]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("megatron-dyt: ") and message in captured.err
    assert "Traceback" not in captured.err
