"""Typed run configuration: schema defaults + YAML differences + ``key=value`` overrides."""

from core.config.load import (
    compose,
    config_to_yaml,
    find_config,
    flatten,
    load_config,
    parse_override,
    save_config,
    to_config,
    validate,
)
from core.config.schema import Config

__all__ = [
    "Config",
    "compose",
    "config_to_yaml",
    "find_config",
    "flatten",
    "load_config",
    "parse_override",
    "save_config",
    "to_config",
    "validate",
]
