"""Loading the config: the main file, its drop-ins and the environment, merged and validated.

Separate from the schema because this is the only code that knows the sources and their
order (defaults, agent.toml, ``agent.toml.d/*.toml`` in lexical order, then
``CNA_AGENT_<SECTION>_<KEY>``), rejects unknown sections and keys, and remembers where each
value came from so every error can name its file or variable.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cna_agent.config.coerce import coerce, field_types
from cna_agent.config.declarations import datastore_declarations, network_declarations
from cna_agent.config.sections import (
    SECTION_TYPES,
    TABLE_KEYS,
    AgentConfig,
    ConfigError,
)
from cna_agent.config.validation import validate

__all__ = ["DEFAULT_CONFIG_PATH", "ENV_PREFIX", "load_config"]

DEFAULT_CONFIG_PATH = Path("/etc/cna-agent/agent.toml")
ENV_PREFIX = "CNA_AGENT_"


def merge(target: dict[str, dict[str, tuple[Any, str]]], data: Mapping[str, Any], origin: str) -> None:
    """Fold one file's sections into ``target`` as (value, origin) pairs, last file winning;
    named tables ([network.bridges.NAME]) merge per entry."""
    for section, values in data.items():
        if section not in SECTION_TYPES:
            known = ", ".join(sorted(SECTION_TYPES))
            raise ConfigError(f"unknown section [{section}] in {origin} (known: {known})")
        if not isinstance(values, Mapping):
            raise ConfigError(f"[{section}] in {origin} must be a table")
        types = field_types(SECTION_TYPES[section])
        for key, value in values.items():
            if key not in types:
                known = ", ".join(sorted(types))
                raise ConfigError(f"unknown key {section}.{key} in {origin} (known: {known})")
            if key in TABLE_KEYS.get(section, ()):
                if not isinstance(value, Mapping):
                    raise ConfigError(f"{section}.{key} in {origin} must be tables like [{section}.{key}.NAME]")
                entries, _ = target.setdefault(section, {}).get(key, ({}, origin))
                for name, entry in value.items():
                    if not isinstance(entry, Mapping):
                        raise ConfigError(f"{section}.{key}.{name} in {origin} must be a table")
                    entries = {**entries, name: (dict(entry), origin)}
                target[section][key] = (entries, origin)
                continue
            target.setdefault(section, {})[key] = (coerce(section, key, types[key], value, origin), origin)


def read_toml(path: Path) -> dict[str, Any]:
    """One TOML file; unreadable or invalid files are ConfigErrors naming the file."""
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None


def env_overrides(environ: Mapping[str, str]) -> dict[str, dict[str, str]]:
    """CNA_AGENT_<SECTION>_<KEY> values by section; names whose section is unknown (such as
    CNA_AGENT_OPTS, the unit's extra arguments) are not config and are skipped."""
    out: dict[str, dict[str, str]] = {}
    for name, value in environ.items():
        if not name.startswith(ENV_PREFIX):
            continue
        rest = name[len(ENV_PREFIX):].lower()
        section, _, key = rest.partition("_")
        if section in SECTION_TYPES and key:
            out.setdefault(section, {})[key] = value
    return out


def load_config(
    path: str | os.PathLike[str] | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    require_file: bool | None = None,
) -> AgentConfig:
    """Load, merge and validate the configuration.

    ``require_file`` defaults to True when a path was given explicitly: an admin who passes
    ``--config`` and mistypes it should hear so, while a missing default file just means
    "all defaults".
    """
    environ = os.environ if environ is None else environ
    explicit = path is not None
    cfg_path = Path(path) if path is not None else DEFAULT_CONFIG_PATH
    require = explicit if require_file is None else require_file
    merged: dict[str, dict[str, tuple[Any, str]]] = {}
    sources: list[str] = []
    if cfg_path.exists():
        merge(merged, read_toml(cfg_path), str(cfg_path))
        sources.append(str(cfg_path))
    elif require:
        raise ConfigError(f"{cfg_path}: config file does not exist")
    dropin_dir = Path(str(cfg_path) + ".d")
    if dropin_dir.is_dir():
        for dropin in sorted(dropin_dir.glob("*.toml")):
            merge(merged, read_toml(dropin), str(dropin))
            sources.append(str(dropin))
    for section, values in env_overrides(environ).items():
        types = field_types(SECTION_TYPES[section])
        for key, value in values.items():
            origin = f"env {ENV_PREFIX}{section.upper()}_{key.upper()}"
            if key not in types:
                raise ConfigError(f"unknown key {section}.{key} in {origin}")
            if key in TABLE_KEYS.get(section, ()):
                raise ConfigError(f"{section}.{key} in {origin}: declared networks and datastores are tables in agent.toml, not environment variables")
            merged.setdefault(section, {})[key] = (coerce(section, key, types[key], value, origin), origin)
    network_tables = {k: merged.get("network", {}).pop(k, ({}, ""))[0] for k in TABLE_KEYS["network"]}
    datastore_tables = merged.get("storage", {}).pop("datastores", ({}, ""))[0]
    sections = {
        name: cls(**{k: v for k, (v, _) in merged.get(name, {}).items()}) for name, cls in SECTION_TYPES.items()
    }
    sections["network"] = network_declarations(sections["network"], network_tables)
    sections["storage"] = datastore_declarations(sections["storage"], datastore_tables)
    config = AgentConfig(**sections, sources=tuple(sources))
    origins = {(s, k): o for s, vals in merged.items() for k, (_, o) in vals.items()}
    validate(config, origins)
    return config
