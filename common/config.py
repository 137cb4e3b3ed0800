"""Typed configuration: dataclass schemas merged with a YAML file and `key=value` overrides, then validated.

Every entry point builds its config the same way (`load_config`): the dataclass defaults, then the YAML file,
then the overrides, checked against the schema by omegaconf (unknown keys and wrong types are errors that name
the key), then `validate`: every schema node may define `validate(self)`, which checks its own fields with
`check(condition, key, message)` using keys relative to the node; `validate` walks the tree (children first,
so a node's own checks may rely on valid children) and reports the full key, e.g. `data.masks.0.num_blocks`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Type, TypeVar

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from omegaconf.nodes import StringNode

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration value or key is wrong; the message names the key and says what to do."""

    def __init__(self, message: str, key: str = ""):
        super().__init__(f"{key}: {message}" if key else message)
        self.key, self.message = key, message

    def under(self, prefix: str) -> "ConfigError":
        """The same error for a node that sits at `prefix` (e.g. "data.") in a larger tree."""
        return ConfigError(self.message, prefix + self.key) if self.key and prefix else self


def check(condition: bool, key: str, message: str) -> None:
    """The one way a schema's `validate` refuses a value: `key` is relative to the node being validated."""
    if not condition:
        raise ConfigError(message, key)


def validate(cfg: Any, prefix: str = "") -> None:
    """Validate a config tree: each dataclass node's children (fields, list and dict items) first, then the
    node's own `validate()`. Raises ConfigError naming the full key (`prefix` + the node's relative key)."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        items = (value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, (list, tuple))
                 else [(None, value)])
        for k, item in items:
            if dataclasses.is_dataclass(item) and not isinstance(item, type):
                validate(item, f"{prefix}{f.name}." + ("" if k is None else f"{k}."))
    own = getattr(cfg, "validate", None)
    if own is not None:
        try:
            own()
        except ConfigError as e:
            raise e.under(prefix) from None
        except ValueError as e:  # a check shared with non-config code (e.g. a mask spec's) names its field
            raise ConfigError(str(e), prefix.rstrip(".")) from None


def load_config(schema: Type[T], path: Optional[str | Path] = None, overrides: Sequence[str] = ()) -> T:
    """Build a validated `schema` instance from its defaults, an optional YAML file and `key=value` overrides."""
    cfg = merged(schema, path)
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ConfigError(f"overrides must look like key=value, got {bad}")
    for item in overrides:
        # update (not a merge of a dotlist) so that list entries can be addressed: masks.0.num_blocks=4
        key, value = item.split("=", 1)
        try:
            try:
                OmegaConf.update(cfg, key.strip(), _parse_value(value), merge=True)
            except (OmegaConfBaseException, ValueError):
                if not _is_string_key(cfg, key.strip()):
                    raise
                OmegaConf.update(cfg, key.strip(), value, merge=True)  # text for a text key, e.g. inline JSON
        except (OmegaConfBaseException, ValueError) as e:
            raise ConfigError(f"override {item!r}: {_first_line(e)}") from None
    try:
        obj = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:
        raise ConfigError(f"invalid config{f' (file {path} and overrides)' if path else ''}: {_first_line(e)}") from None
    validate(obj)
    return obj


def merged(schema: Type[T], path: Optional[str | Path] = None):
    """The schema's defaults with a YAML file merged over them (a DictConfig, not yet validated)."""
    try:
        cfg = OmegaConf.structured(schema)
        if path is not None:
            if not Path(path).is_file():
                raise ConfigError(f"config file {path} does not exist")
            try:
                cfg = OmegaConf.merge(cfg, OmegaConf.load(path))
            except yaml.YAMLError as e:
                raise ConfigError(f"config file {path} is not valid YAML: {_first_line(e)}") from None
    except OmegaConfBaseException as e:
        # omegaconf's message names the key and the expected type; keep it, drop the stack noise
        raise ConfigError(f"invalid config in {path}: {_first_line(e)}") from None
    return cfg


def _is_string_key(cfg, key: str) -> bool:
    """Whether `key` (dotted) names a text field of the schema."""
    node = cfg
    try:
        for part in key.split("."):
            node = node._get_node(int(part) if part.isdigit() else part)
    except (OmegaConfBaseException, AttributeError, KeyError, IndexError, TypeError):
        return False
    return isinstance(node, StringNode)


def _parse_value(text: str) -> Any:
    """A YAML value, except that YAML 1.1's yes/no/on/off stay strings (`amp=off` is the string "off";
    bool fields still accept them: omegaconf converts)."""
    if not text.strip():
        return ""
    value = yaml.safe_load(text)
    if isinstance(value, bool) and text.strip().lower() not in ("true", "false"):
        return text.strip()
    return value


def _first_line(e: Exception) -> str:
    lines = str(e).splitlines() or [type(e).__name__]
    key = next((ln.split(":", 1)[1].strip() for ln in lines if ln.strip().startswith("full_key:")), "")
    return f"{lines[0]}" + (f" (key: {key})" if key and key not in lines[0] else "")


def to_dict(cfg: Any) -> Dict[str, Any]:
    """A plain, JSON-able dict of a config dataclass (for manifests, checkpoints and run folders)."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]


def to_yaml(cfg: Any) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
