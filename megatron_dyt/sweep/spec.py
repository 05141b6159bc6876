"""The sweep spec: a grid of config values, expanded into named, validated runs.

Kept apart from running and reporting so that a spec can be checked (every run's config
validated, names unique) before anything is written or started, and so the rest of the
package shares one reading of it. A spec (YAML) names a base config, overrides for every run
and a grid of axes:

    base: ../tiny-dyt.yaml                 # relative to the spec file (or the current folder)
    overrides: {train.train_steps: 50}
    grid:
      width:                               # tied keys: one value sets several config keys
        keys: [model.hidden_size, model.num_heads, model.ffn_hidden_size]
        values: [[64, 2, 176], [128, 4, 352]]
      model.norm.alpha_attn: [0.5, 1.0]    # a plain axis: a dotted config key and its values
      alpha_other: {keys: [model.norm.alpha_mlp, model.norm.alpha_final], values: [0.5, 1.0]}
      seed: {keys: [train.seed], values: [1, 2]}
    name: "w{width}-a{model.norm.alpha_attn}-o{alpha_other}-s{seed}"   # optional

Every combination of axis values is one run; every run's config is validated before anything
runs, so a typo fails at once with the run's name.

A study pools several grids that do not cross (an α₀ grid of DyT, the other norms, the squashing
functions) into one sweep folder with `parts`: each part has its own `overrides`, `grid` and
`name`, and the spec's own `grid` (e.g. the seeds) is crossed with every part, as the outer loop,
so a sweep cut short has whole parts for its first seeds. Run names start with the part's name:

    parts:
      alpha: {grid: {width: ..., alpha_attn: ...}, name: "w{width}-a{alpha_attn}"}
      norms: {grid: {model.norm.kind: [derf, rmsnorm]}}
    grid: {seed: {keys: [train.seed], values: [1, 2, 3]}}
    name: "{part}-{name}-s{seed}"                          # optional; default: part-axes
"""

from __future__ import annotations

import copy
import itertools
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from megatron_dyt.config import Config, ConfigError, apply_overrides, config_from_dict, load_tree
from megatron_dyt.errors import MegatronDyTError
from megatron_dyt.fileio import read_text

SPEC_KEYS = ("base", "overrides", "grid", "name", "parts")
PART_KEYS = ("overrides", "grid", "name")


class SweepError(MegatronDyTError, ValueError):
    """A sweep cannot go ahead as asked (a bad run index, nothing to submit); the message says
    why. A ValueError too, for callers that catch those."""


@dataclass
class Axis:
    """One grid dimension: its values set one or several (tied) config keys together."""

    name: str
    keys: list[str]
    values: list[Any]

    def settings(self, value: Any) -> dict[str, Any]:
        """The config keys one value of this axis sets (a tied axis: one value per key, or
        the same value for all of them)."""
        if len(self.keys) == 1:
            return {self.keys[0]: value}
        if isinstance(value, list):
            return dict(zip(self.keys, value, strict=True))
        return dict.fromkeys(self.keys, value)

    @staticmethod
    def label(value: Any) -> Any:
        """The value a report shows for this axis: a scalar, or the first of tied values."""
        return value[0] if isinstance(value, list) else value


@dataclass
class Part:
    """One grid of a study (`parts`): its own overrides, axes and name template."""

    name: str
    overrides: dict[str, Any]
    axes: list[Axis]
    template: str | None = None


def _grid_dict(axes: list[Axis]) -> dict[str, Any]:
    return {a.name: {"keys": a.keys, "values": a.values} for a in axes}


@dataclass
class SweepSpec:
    """A parsed spec; `source` names it in error messages. `axes` are the spec's own grid
    (crossed with every part when there are `parts`)."""

    base: Path | None
    overrides: dict[str, Any]
    axes: list[Axis]
    name: str | None = None
    source: str = "(spec)"
    parts: list[Part] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """The spec as YAML data, with the base config's path made absolute (sweep.yaml)."""
        out = {
            "base": str(self.base) if self.base else None,
            "overrides": self.overrides,
            "grid": _grid_dict(self.axes),
            "name": self.name,
        }
        if self.parts:
            out["parts"] = {
                p.name: {"overrides": p.overrides, "grid": _grid_dict(p.axes), "name": p.template}
                for p in self.parts
            }
        return out


@dataclass
class Run:
    """One combination of axis values: what a run of the sweep trains with."""

    index: int
    name: str
    axes: dict[str, Any]  # axis name -> label
    settings: dict[str, Any] = field(default_factory=dict)  # dotted config key -> value
    part: str | None = None  # the study part it belongs to (None: a spec without parts)


def load_spec(path: str | Path) -> SweepSpec:
    """Read and check a sweep spec; the base config path is resolved against the spec's folder."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"sweep spec '{path}' does not exist")
    try:
        data = yaml.safe_load(read_text(path, "sweep spec")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"sweep spec '{path}' is not valid YAML: {exc}") from None
    return spec_from_dict(data, path.parent, str(path))


def spec_from_dict(data: Any, folder: Path = Path("."), source: str = "(spec)") -> SweepSpec:
    """Check spec data (from YAML): known keys, a base that exists, well-formed axes, one axis
    per config key."""
    if not isinstance(data, dict):
        raise ConfigError(f"sweep spec {source} must hold a mapping, got {type(data).__name__}")
    unknown = sorted(set(data) - set(SPEC_KEYS))
    if unknown:
        raise ConfigError(
            f"sweep spec {source}: unknown key {unknown[0]!r} (allowed: {', '.join(SPEC_KEYS)})"
        )
    base = None
    if data.get("base") is not None:
        base = Path(str(data["base"]))
        if not base.is_absolute():
            base = folder / base if (folder / base).is_file() else base
        if not base.is_file():
            raise ConfigError(
                f"sweep spec {source}: base config '{data['base']}' not found (looked in"
                f" '{folder}' and the current folder)"
            )
        base = base.resolve()
    overrides = data.get("overrides") or {}
    if not isinstance(overrides, dict):
        raise ConfigError(f"sweep spec {source}: 'overrides' must map dotted keys to values")
    parts = _parse_parts(data.get("parts"), source)
    grid = data.get("grid")
    if parts and grid is None:
        grid = {}
    if not isinstance(grid, dict) or (not grid and not parts):
        raise ConfigError(
            f"sweep spec {source}: 'grid' must map axes to value lists, e.g."
            " grid: {model.norm.alpha_attn: [0.5, 1.0]}"
        )
    axes = [_parse_axis(str(name), entry, source) for name, entry in grid.items()]
    _one_axis_per_key(axes, source)
    for part in parts:
        _one_axis_per_key([*part.axes, *axes], source)
    name = data.get("name")
    if name is not None and not isinstance(name, str):
        raise ConfigError(f"sweep spec {source}: 'name' must be a template string")
    return SweepSpec(base, dict(overrides), axes, name, source, parts)


def _one_axis_per_key(axes: list[Axis], source: str) -> None:
    owner: dict[str, str] = {}
    for axis in axes:
        for key in axis.keys:
            if key in owner:
                raise ConfigError(
                    f"sweep spec {source}: grid axes {owner[key]!r} and {axis.name!r} both set"
                    f" {key}; one axis per key (tie keys into one axis with 'keys')"
                )
            owner[key] = axis.name


def _parse_parts(parts: Any, source: str) -> list[Part]:
    """A study's `parts`: name -> {overrides, grid, name}."""
    if parts is None:
        return []
    if not isinstance(parts, dict) or not parts:
        raise ConfigError(
            f"sweep spec {source}: 'parts' must map part names to {{overrides, grid, name}}"
        )
    out = []
    for part_name, entry in parts.items():
        where = f"sweep spec {source}: parts.{part_name}"
        if not isinstance(entry, dict):
            raise ConfigError(f"{where} must be a mapping with a 'grid'")
        unknown = sorted(set(entry) - set(PART_KEYS))
        if unknown:
            raise ConfigError(
                f"{where}: unknown key {unknown[0]!r} (allowed: {', '.join(PART_KEYS)})"
            )
        overrides = entry.get("overrides") or {}
        if not isinstance(overrides, dict):
            raise ConfigError(f"{where}: 'overrides' must map dotted keys to values")
        grid = entry.get("grid") or {}
        if not isinstance(grid, dict):
            raise ConfigError(f"{where}: 'grid' must map axes to value lists")
        template = entry.get("name")
        if template is not None and not isinstance(template, str):
            raise ConfigError(f"{where}: 'name' must be a template string")
        axes = [_parse_axis(str(n), e, f"{source} (part {part_name})") for n, e in grid.items()]
        out.append(Part(str(part_name), dict(overrides), axes, template))
    return out


def _parse_axis(name: str, entry: Any, source: str) -> Axis:
    where = f"sweep spec {source}: grid.{name}"
    if isinstance(entry, list):
        keys, values = [name], entry
    elif isinstance(entry, dict) and set(entry) == {"keys", "values"}:
        keys = [entry["keys"]] if isinstance(entry["keys"], str) else entry["keys"]
        values = entry["values"]
        if not isinstance(keys, list) or not keys or not all(isinstance(k, str) for k in keys):
            raise ConfigError(f"{where}: 'keys' must be a dotted key or a list of them")
        if not isinstance(values, list):
            raise ConfigError(f"{where}: 'values' must be a list")
    else:
        raise ConfigError(
            f"{where}: expected a list of values or {{keys: [...], values: [...]}}, got {entry!r}"
        )
    if not values:
        raise ConfigError(f"{where}: has no values")
    for v in values:
        if isinstance(v, list) and len(v) != len(keys):
            raise ConfigError(
                f"{where}: value {v!r} has {len(v)} entries for {len(keys)} keys {keys};"
                " give one value per key, or a single value for all of them"
            )
    return Axis(name, list(keys), list(values))


def expand(spec: SweepSpec) -> list[Run]:
    """The cartesian product of the grid's axes, in spec order (the last axis varies fastest);
    with `parts`, the spec's own axes are the outer loop and each part's grid the inner one."""
    runs: list[Run] = []
    for combo in itertools.product(*(a.values for a in spec.axes)):
        for part in spec.parts or [None]:
            part_axes = part.axes if part else []
            for inner in itertools.product(*(a.values for a in part_axes)):
                settings = dict(spec.overrides)
                settings.update(part.overrides if part else {})
                axes = {}
                for axis, value in [
                    *zip(part_axes, inner, strict=True),
                    *zip(spec.axes, combo, strict=True),
                ]:
                    settings.update(axis.settings(value))
                    axes[axis.name] = Axis.label(value)
                name = _run_name(spec, axes, part)
                runs.append(Run(len(runs), name, axes, settings, part.name if part else None))
    seen: dict[str, int] = {}
    for run in runs:
        if run.name in seen:
            raise ConfigError(
                f"sweep spec {spec.source}: runs {seen[run.name]} and {run.index} are both named"
                f" {run.name!r}; make the 'name' template use every axis"
                f" ({', '.join(_axis_names(spec))}), and give tied axes values whose"
                " first entries differ (names and reports show the first)"
            )
        seen[run.name] = run.index
    return runs


def format_value(value: Any, fmt: str = "") -> str:
    """An axis value as run names and listings show it (floats without trailing zeros)."""
    if fmt:
        return format(value, fmt)
    return f"{value:g}" if isinstance(value, float) else str(value)


def _axis_names(spec: SweepSpec) -> list[str]:
    names = [a.name for p in spec.parts for a in p.axes] + [a.name for a in spec.axes]
    return list(dict.fromkeys(names))


def _run_name(spec: SweepSpec, axes: dict[str, Any], part: Part | None = None) -> str:
    """The run's name from the spec's template; in a study, the part's name and its own
    template (if any) first, unless the spec's template places them with {part} and {name}."""
    if part is not None:
        inner = SweepSpec(None, {}, [a for a in part.axes], part.template, spec.source)
        own = _run_name(inner, {a.name: axes[a.name] for a in part.axes}) if part.axes else ""
        shared = {a.name: axes[a.name] for a in spec.axes}
        if spec.name is None:
            rest = _run_name(SweepSpec(None, {}, spec.axes, None, spec.source), shared)
            name = "-".join(x for x in (part.name, own, rest if shared else "") if x)
            return re.sub(r"[^A-Za-z0-9._=+-]", "_", name)
        axes = {**axes, "part": part.name, "name": own}
        spec = SweepSpec(None, {}, spec.axes, spec.name, spec.source)
    if spec.name is None:
        name = "-".join(f"{k.rpartition('.')[2]}{format_value(v)}" for k, v in axes.items())
    else:

        def field_value(match: re.Match) -> str:
            key, fmt = match.group(1), match.group(2) or ""
            if key not in axes:
                raise ConfigError(
                    f"sweep spec {spec.source}: name template field {{{key}}} is not an axis"
                    f" (axes: {', '.join(axes)})"
                )
            try:
                return format_value(axes[key], fmt)
            except (ValueError, TypeError) as exc:
                raise ConfigError(
                    f"sweep spec {spec.source}: name template field {match.group(0)} cannot"
                    f" format {axes[key]!r}: {exc}"
                ) from None

        name = re.sub(r"\{([^{}:]+)(?::([^{}]*))?\}", field_value, spec.name)
    return re.sub(r"[^A-Za-z0-9._=+-]", "_", name)


def load_base(spec: SweepSpec) -> dict[str, Any]:
    """The base config as a plain tree (empty: the defaults), for overrides per run."""
    if spec.base is None:
        return {}
    return load_tree(spec.base)


def run_config(base_tree: dict[str, Any], run: Run, base_name: str = "(defaults)") -> Config:
    """The validated config of one run; errors name the run."""
    tree = copy.deepcopy(base_tree)
    try:
        apply_overrides(tree, {str(key): value for key, value in run.settings.items()})
    except ConfigError as exc:
        raise ConfigError(f"sweep run {run.index} '{run.name}': {exc}") from None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # vocab padding notes, once per run, are noise here
        return config_from_dict(tree, f"of sweep run {run.index} '{run.name}' (base {base_name})")


def validate(spec: SweepSpec) -> list[tuple[Run, Config]]:
    """Expand and validate every run up front: a bad key or value fails before anything runs."""
    tree = load_base(spec)
    base_name = str(spec.base) if spec.base else "(defaults)"
    group = spec.name or Path(spec.source).stem
    train = tree.setdefault("train", {})
    if train.get("wandb_project") and not train.get("wandb_group"):
        train["wandb_group"] = group  # the sweep's runs side by side in W&B
    return [(run, run_config(tree, run, base_name)) for run in expand(spec)]
