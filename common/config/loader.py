"""YAML files plus dotted `--set a.b=c` overrides → a validated ``UnmaskConfig``."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from pydantic import ValidationError

if TYPE_CHECKING:
    from common.config import UnmaskConfig

REPO_ROOT = Path(__file__).resolve().parents[2]
CONFIG_DIR = REPO_ROOT / "configs"


class ConfigError(ValueError):
    """A config that cannot run; the message is one line naming the field path."""


def resolve_config_path(name_or_path: str) -> Path:
    """A path to a YAML file, or the name of a preset in ``configs/`` (with or without ``.yaml``)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    for candidate in (CONFIG_DIR / name_or_path, CONFIG_DIR / f"{name_or_path}.yaml"):
        if candidate.is_file():
            return candidate
    presets = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
    raise ConfigError(f"config {name_or_path!r} not found: give a YAML path or one of: {presets}")


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` strings (value parsed as YAML) to a nested dict, in order."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not of the form section.field=value")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: value is not valid YAML ({e.problem})") from None
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {part!r} is a value, not a section")
            node = child
        node[parts[-1]] = value
    return data


def format_validation_error(err: ValidationError) -> str:
    """One line: the first error's dotted field path and reason, plus how many more there are."""
    errors = err.errors()
    first = errors[0]
    loc = ".".join(str(p) for p in first["loc"])
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        msg = "unknown key (check the spelling; `unmask config` prints every valid key)"
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"config error at {loc or '<root>'}: {msg}{more}"


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> "UnmaskConfig":
    """Load a YAML preset (default ``configs/tiny_countdown.yaml``), apply overrides, validate."""
    from common.config import UnmaskConfig

    file = resolve_config_path(str(path) if path is not None else "tiny_countdown")
    try:
        data = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{file}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{file}: the top level must be a mapping of sections")
    data = apply_overrides(data, list(overrides or []))
    try:
        return UnmaskConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e)) from None


def dump_config(cfg: "UnmaskConfig") -> str:
    """The resolved config as YAML, as written into the run directory."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
