"""Rendering the effective config as TOML (what ``cna-agent check-config`` prints).

Separate because it is output formatting only: it turns the plain dict of
AgentConfig.to_dict() into TOML text, sections first and named tables ([network.bridges.br0])
after their section, and knows nothing of the schema or of how the config was loaded.
"""

from __future__ import annotations

from typing import Any

__all__ = ["render_toml", "toml_value"]


def render_toml(data: dict[str, dict[str, Any]]) -> str:
    """TOML text for ``{section: {key: value | {name: {key: value}}}}`` (AgentConfig.to_dict())."""
    lines: list[str] = []
    for section, values in data.items():
        lines.append(f"[{section}]")
        tables = {k: v for k, v in values.items() if isinstance(v, dict) and v}
        for key, value in values.items():
            if key not in tables:
                lines.append(f"{key} = {toml_value(value)}")
        lines.append("")
        for key, entries in tables.items():
            for name, entry in entries.items():
                lines.append(f"[{section}.{key}.{toml_value(name)}]")
                lines.extend(f"{k} = {toml_value(v)}" for k, v in entry.items())
                lines.append("")
    return "\n".join(lines)


def toml_value(value: Any) -> str:
    """One value as a TOML literal (inline tables and arrays for nested values)."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    text = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'
