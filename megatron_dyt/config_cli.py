"""`megatron-dyt config …`: the reference of every config key, and a config as a run resolves it.

`config keys` is generated from the pydantic models in `megatron_dyt/config.py` (names, types,
bounds, defaults, descriptions), so it cannot drift from what is validated. `config show` prints
the YAML a run saves as its `config.yaml`: bases merged, overrides applied, defaults filled in.
Bad input raises `ConfigError`; the main CLI prints it in one line and exits with status 2.
"""

from __future__ import annotations

import argparse
import types
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal, Union, get_args, get_origin

SECTION = "section"
_BOUNDS = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}  # annotated_types attribute -> sign


@dataclass(frozen=True)
class KeyDoc:
    """One row of the reference: a key, or a section (type `section`, no default)."""

    key: str
    type: str
    default: str
    description: str


def key_docs() -> list[KeyDoc]:
    """Every section and key of the config in schema order: a section, its own keys, then its
    subsections."""
    from megatron_dyt.config import Config

    return list(_walk(Config, ""))


def _walk(model: Any, prefix: str) -> Iterator[KeyDoc]:
    sections = []
    for name, field in model.model_fields.items():
        if _is_section(field.annotation):
            sections.append((name, field))
            continue
        yield KeyDoc(
            prefix + name,
            _type_text(field.annotation, field.metadata),
            _yaml_text(field.get_default(call_default_factory=True)),
            _one_line(field.description),
        )
    for name, field in sections:
        yield KeyDoc(prefix + name, SECTION, "", _one_line(field.description))
        yield from _walk(field.annotation, f"{prefix}{name}.")


def _is_section(annotation: Any) -> bool:
    from pydantic import BaseModel

    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _type_text(annotation: Any, metadata: list[Any]) -> str:
    """The type as a YAML writer sees it (`int | null`, `tanh | hardtanh`), with its bounds."""
    bounds = [
        f"{sign} {getattr(m, attr)}"
        for m in metadata
        for attr, sign in _BOUNDS.items()
        if hasattr(m, attr)
    ]
    name = _type_name(annotation)
    return f"{name} ({', '.join(bounds)})" if bounds else name


def _type_name(annotation: Any) -> str:
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Literal:
        return " | ".join(str(a) for a in args)
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if annotation is type(None):
        return "null"
    if origin is list:
        return f"list[{_type_name(args[0])}]"
    return annotation.__name__


def _yaml_text(value: Any) -> str:
    """A default as it would be written in a config file (`null`, `true`, `1.0e-05`, `[]`)."""
    import yaml

    text = yaml.safe_dump(value, default_flow_style=True, allow_unicode=True).strip()
    return text.removesuffix("...").strip()


def _one_line(text: str | None) -> str:
    return " ".join((text or "").split())


def format_text(docs: list[KeyDoc]) -> str:
    """Aligned plain text: each section as a heading, then its keys, one per line."""
    keys = [d for d in docs if d.type != SECTION]
    widths = [max(len(getattr(d, col)) for d in keys) for col in ("key", "type", "default")]
    lines: list[str] = []
    for d in docs:
        if d.type == SECTION:
            lines += [""] if lines else []
            lines.append(f"[{d.key}]  {d.description}")
        else:
            cells = (d.key.ljust(widths[0]), d.type.ljust(widths[1]), d.default.ljust(widths[2]))
            lines.append("  ".join((*cells, d.description)))
    return "\n".join(lines)


def format_markdown(docs: list[KeyDoc]) -> str:
    """One Markdown table; section rows in bold."""

    def cell(text: str, code: bool = True) -> str:
        text = text.replace("|", "\\|")
        return f"`{text}`" if code and text else text

    rows = ["| key | type | default | description |", "|---|---|---|---|"]
    for d in docs:
        if d.type == SECTION:
            rows.append(f"| **{d.key}** | section | | {cell(d.description, code=False)} |")
        else:
            rows.append(
                f"| {cell(d.key)} | {cell(d.type)} | {cell(d.default)}"
                f" | {cell(d.description, code=False)} |"
            )
    return "\n".join(rows)


def cmd_keys(args: argparse.Namespace) -> int:
    docs = key_docs()
    print(format_markdown(docs) if args.markdown else format_text(docs))
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from megatron_dyt.config import load_config

    print(load_config(args.config, args.overrides).to_yaml(), end="")
    return 0


def add_config_parser(subparsers: argparse._SubParsersAction) -> None:
    """Add `config` with its subcommands `keys` and `show`; each sets `func(args) -> exit code`."""
    config = subparsers.add_parser(
        "config",
        help="every config key documented, or a config resolved and validated",
        description="The config's reference (generated from its schema) and resolved configs.",
    )
    sub = config.add_subparsers(dest="config_command", required=True, metavar="COMMAND")

    keys = sub.add_parser(
        "keys",
        help="every key with its type, default and description",
        description="List every config section and key (dotted, e.g. model.norm.alpha_attn)"
        " with its type, bounds, default and description, generated from the schema.",
    )
    keys.add_argument("--markdown", action="store_true", help="print a Markdown table")
    keys.set_defaults(func=cmd_keys)

    show = sub.add_parser(
        "show",
        help="the resolved, validated config as YAML",
        description="Print the config a run of CONFIG with these overrides saves as its"
        " config.yaml: bases merged, overrides applied, every default filled in, validated.",
    )
    show.add_argument(
        "config", metavar="CONFIG", help="YAML config, e.g. configs/llama-7b-dyt.yaml"
    )
    show.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="e.g. model.norm.alpha_attn=0.5"
    )
    show.set_defaults(func=cmd_show)
