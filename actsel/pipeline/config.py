"""Run configuration: one dataclass per stage, read from TOML or YAML and command-line overrides.

Every section is validated when it is built: an unknown key, a value of the
wrong type or an unknown name raises ``ConfigError`` with the valid choices, so
a typo fails before any model is loaded.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib


class ConfigError(ValueError):
    """An invalid run configuration."""


ESTIMATORS = ("one_shot", "conditional", "influence")
CONTEXTS = ("alone", "in_context")
SPANS = ("example", "input", "label", "last")
BUILTIN_MASKS = ("causal", "isolated", "isolated_sink", "label_blind", "sink_free")
SELECTORS = ("random", "activation-rank", "activation-diversity", "kate", "uncertainty", "votek", "fast-votek", "oracle")


@dataclass
class TaskConfig:
    """Task source and the number of pool and evaluation examples to draw from it."""

    name: str | None = "demo"
    files: list[str] | None = None
    hub: str | None = None
    kind: str = "classification"
    text_columns: list[str] = field(default_factory=lambda: ["text"])
    label_column: str = "label"
    template: str | None = None
    data_dir: str | None = None
    n_pool: int | None = 60
    n_eval: int | None = 30
    seed: int = 0

    def __post_init__(self) -> None:
        sources = [value for value in (self.name, self.files, self.hub) if value]
        if len(sources) != 1:
            raise ConfigError("task: give exactly one of name (a built-in task), files (1 or 2 paths) or hub (a dataset id).")
        if self.name:
            from actsel.tasks.registry import TASK_NAMES

            if self.name.partition(":")[0] not in TASK_NAMES:
                raise ConfigError(f"task.name {self.name!r} is not a built-in task; valid: {TASK_NAMES}. "
                                  f"Use task.files or task.hub for your own data.")
        if self.files is not None and not 1 <= len(self.files) <= 2:
            raise ConfigError(f"task.files takes one file (split into pool and eval) or two (pool, eval); got {len(self.files)}.")
        if self.kind not in ("classification", "generation"):
            raise ConfigError(f"task.kind {self.kind!r} is invalid; valid: ['classification', 'generation'].")
        for key in ("n_pool", "n_eval"):
            value = getattr(self, key)
            if value is not None and value < 2:
                raise ConfigError(f"task.{key} must be at least 2 (or empty for all examples), got {value}.")


@dataclass
class ModelConfig:
    spec: str = "smollm2-135m"
    device: str | None = None
    dtype: str = "float32"


@dataclass
class FeatureConfig:
    """Activation statistics: hooks, layers, masks, spans and context."""

    hooks: list[str] = field(default_factory=lambda: ["hook_mlp_out", "hook_resid_post"])
    layers: list[int] | None = None
    masks: list[str] = field(default_factory=lambda: ["causal", "sink_free"])
    spans: list[str] = field(default_factory=lambda: ["example"])
    context: str = "alone"
    n_context: int = 3
    skip_first_token: bool = False
    batch_size: int = 16
    chunk_size: int = 32

    def __post_init__(self) -> None:
        if self.context not in CONTEXTS:
            raise ConfigError(f"features.context {self.context!r} is invalid; valid: {list(CONTEXTS)}.")
        for span in self.spans:
            if span not in SPANS:
                raise ConfigError(f"features.spans: {span!r} is invalid; valid: {list(SPANS)}.")
        for mask in self.masks:
            if mask not in BUILTIN_MASKS:
                raise ConfigError(f"features.masks: {mask!r} is invalid; valid: {list(BUILTIN_MASKS)}.")
        if not self.hooks:
            raise ConfigError("features.hooks is empty; give at least one hook name such as 'hook_mlp_out'.")
        _check_positive("features", self, ("batch_size", "chunk_size"))


@dataclass
class UtilityConfig:
    estimator: str = "one_shot"
    metric: str | None = None
    mask: str = "causal"
    n_prompts: int = 200
    k: int = 4
    label_balanced: bool = False
    batch_size: int = 32
    chunk_size: int = 16

    def __post_init__(self) -> None:
        if self.estimator not in ESTIMATORS:
            raise ConfigError(f"utility.estimator {self.estimator!r} is invalid; valid: {list(ESTIMATORS)}.")
        if self.mask not in BUILTIN_MASKS:
            raise ConfigError(f"utility.mask {self.mask!r} is invalid; valid: {list(BUILTIN_MASKS)}.")
        _check_positive("utility", self, ("n_prompts", "k", "batch_size", "chunk_size"))


@dataclass
class CorrelationConfig:
    n_bootstrap: int = 1000
    ci: float = 0.95

    def __post_init__(self) -> None:
        if not 0.0 < self.ci < 1.0:
            raise ConfigError(f"correlation.ci must be between 0 and 1, got {self.ci}.")
        _check_positive("correlation", self, ("n_bootstrap",))


@dataclass
class SelectionConfig:
    strategies: list[str] = field(default_factory=lambda: list(SELECTORS))
    budgets: list[int] = field(default_factory=lambda: [8, 16])
    seeds: list[int] = field(default_factory=lambda: [0, 1])
    k: int = 4
    n_prompts: int = 2
    rank_feature: dict = field(default_factory=lambda: {
        "hook": "blocks.15.hook_mlp_out", "statistic": "kurtosis", "mask": "causal", "span": "example"})
    rank_order: str = "highest"
    enabled: bool = True

    def __post_init__(self) -> None:
        for name in self.strategies:
            if name not in SELECTORS:
                raise ConfigError(f"selection.strategies: {name!r} is invalid; valid: {list(SELECTORS)}.")
        if self.rank_order not in ("highest", "lowest"):
            raise ConfigError(f"selection.rank_order {self.rank_order!r} is invalid; valid: ['highest', 'lowest'].")
        for budget in self.budgets:
            if budget < self.k:
                raise ConfigError(f"selection.budgets: budget {budget} is smaller than k={self.k}; every prompt needs k selected examples.")
        _check_positive("selection", self, ("k", "n_prompts"))


@dataclass
class RunConfig:
    """A whole run; ``output`` is the folder that receives every result."""

    task: TaskConfig = field(default_factory=TaskConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    features: FeatureConfig = field(default_factory=FeatureConfig)
    utility: UtilityConfig = field(default_factory=UtilityConfig)
    correlation: CorrelationConfig = field(default_factory=CorrelationConfig)
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    output: str = "runs/demo"
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)

    def section_key(self, *names: str) -> str:
        """JSON of the named sections, the stable input of a stage's cache key."""
        data = self.to_dict()
        return json.dumps({name: data[name] for name in names}, sort_keys=True)


SECTIONS = {
    "task": TaskConfig,
    "model": ModelConfig,
    "features": FeatureConfig,
    "utility": UtilityConfig,
    "correlation": CorrelationConfig,
    "selection": SelectionConfig,
}
TOP_LEVEL = ("output", "seed")


def _check_positive(section: str, config, names) -> None:
    for name in names:
        value = getattr(config, name)
        if value < 1:
            raise ConfigError(f"{section}.{name} must be a positive integer, got {value}.")


def _type_matches(value: Any, annotation: Any) -> bool:
    """Check whether ``value`` fits a simple annotation such as ``int | None`` or ``list[str]``."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_type_matches(value, option) for option in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if origin is list:
        (item_type,) = typing.get_args(annotation)
        return isinstance(value, list) and all(_type_matches(item, item_type) for item in value)
    if origin is dict or annotation is dict:
        return isinstance(value, dict)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, annotation)


def _build_section(name: str, values: dict) -> Any:
    cls = SECTIONS[name]
    if not isinstance(values, dict):
        raise ConfigError(f"Section [{name}] must be a table of keys, got {type(values).__name__}.")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    for key, value in values.items():
        if key not in known:
            raise ConfigError(f"Unknown key {name}.{key}; valid keys in [{name}]: {sorted(known)}.")
        if not _type_matches(value, hints[key]):
            expected = getattr(hints[key], "__name__", None) or str(hints[key])
            raise ConfigError(
                f"{name}.{key} has the wrong type: got {value!r} ({type(value).__name__}), expected {expected}."
            )
    return cls(**values)


def config_from_dict(data: dict) -> RunConfig:
    """Build a validated ``RunConfig`` from nested dicts (as read from TOML or YAML)."""
    unknown = [key for key in data if key not in SECTIONS and key not in TOP_LEVEL]
    if unknown:
        raise ConfigError(f"Unknown top-level key {unknown[0]!r}; valid: {sorted([*SECTIONS, *TOP_LEVEL])}.")
    task_values = data.get("task", {})
    if isinstance(task_values, dict) and (task_values.get("files") or task_values.get("hub")) and "name" not in task_values:
        data = {**data, "task": {**task_values, "name": None}}
    sections = {name: _build_section(name, data.get(name, {})) for name in SECTIONS}
    top = {key: data[key] for key in TOP_LEVEL if key in data}
    if "output" in top and not isinstance(top["output"], str):
        raise ConfigError(f"output must be a folder path (string), got {top['output']!r}.")
    if "seed" in top and not _type_matches(top["seed"], int):
        raise ConfigError(f"seed must be an integer, got {top['seed']!r}.")
    return RunConfig(**sections, **top)


def read_config_file(path: str | Path) -> dict:
    """Read a TOML (``.toml``) or YAML (``.yaml``/``.yml``) file into nested dicts."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"Config file not found: {path}.")
    if path.suffix == ".toml":
        try:
            return tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"Config file {path} is not valid TOML: {err}.") from err
    if path.suffix in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"Config file {path} is not valid YAML: {err}.") from err
        if not isinstance(data, dict):
            raise ConfigError(f"Config file {path} must hold a mapping of sections.")
        return data
    raise ConfigError(f"Config file {path} must end in .toml, .yaml or .yml.")


def apply_override(data: dict, assignment: str) -> None:
    """Apply ``section.key=value`` (the value parsed as JSON, else kept as a string) to ``data``."""
    if "=" not in assignment:
        raise ConfigError(f"Override {assignment!r} must look like section.key=value.")
    dotted, raw = assignment.split("=", 1)
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    parts = dotted.strip().split(".")
    if len(parts) == 1:
        data[parts[0]] = value
    elif len(parts) == 2:
        data.setdefault(parts[0], {})[parts[1]] = value
    else:
        raise ConfigError(f"Override {assignment!r} has too many dots; use section.key=value.")


def dump_toml(config: RunConfig) -> str:
    """Render a config as TOML (the subset this module reads: tables, scalars, lists, inline tables)."""

    def scalar(value: Any) -> str:
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, (int, float)):
            return repr(value)
        if isinstance(value, str):
            return json.dumps(value)
        if isinstance(value, list):
            return "[" + ", ".join(scalar(item) for item in value) + "]"
        if isinstance(value, dict):
            return "{ " + ", ".join(f"{key} = {scalar(item)}" for key, item in value.items()) + " }"
        raise TypeError(f"Cannot write {value!r} as TOML.")

    data = config.to_dict()
    lines = [f"{key} = {scalar(data[key])}" for key in TOP_LEVEL]
    for section in SECTIONS:
        lines.append("")
        lines.append(f"[{section}]")
        for key, value in data[section].items():
            if value is None:
                lines.append(f"# {key} is unset")
            else:
                lines.append(f"{key} = {scalar(value)}")
    return "\n".join(lines) + "\n"


def replace_section(config: RunConfig, name: str, **changes) -> RunConfig:
    section = dataclasses.replace(getattr(config, name), **changes)
    return dataclasses.replace(config, **{name: section})
