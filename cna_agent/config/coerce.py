"""Type-checking one config value against the type its dataclass field declares.

Separate because two readers share it, with the same messages: the section merge (files and
environment variables, in loading.py) and the declared network and datastore tables (in
declarations.py). Environment values arrive as strings and are converted; file values must
already have the right TOML type.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from cna_agent.config.sections import ConfigError

__all__ = ["coerce", "field_types"]


def coerce(section: str, key: str, want: type, value: Any, origin: str) -> Any:
    """Check one value's type; environment strings are converted, file values must match."""
    where = f"{section}.{key} (from {origin})"
    if isinstance(value, str) and origin.startswith("env "):
        try:
            if want is bool:
                low = value.strip().lower()
                if low in ("1", "true", "yes", "on"):
                    return True
                if low in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            if want is int:
                return int(value)
            if want is float:
                return float(value)
        except ValueError:
            raise ConfigError(f"{where}: expected {want.__name__}, got {value!r}") from None
        return value
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if want is bool and not isinstance(value, bool):
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if want is int and (not isinstance(value, int) or isinstance(value, bool)):
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if want is float and not isinstance(value, float):
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if want is str and not isinstance(value, str):
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    return value


def field_types(cls: type) -> dict[str, type]:
    """Field name -> the type coerce() checks; the annotations are strings (postponed), and
    anything but str/int/float/bool (the declaration tuples) maps to dict."""
    hints = {"str": str, "int": int, "float": float, "bool": bool}
    return {f.name: hints.get(f.type, dict) if isinstance(f.type, str) else f.type for f in dataclasses.fields(cls)}
