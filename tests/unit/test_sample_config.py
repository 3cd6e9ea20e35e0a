"""The shipped sample config documents every key, with the real defaults."""

from __future__ import annotations

import dataclasses
import re
import tomllib
from pathlib import Path

from cna_agent.config import AgentConfig, load_config

SAMPLE = Path(__file__).resolve().parents[2] / "systemd" / "agent.toml"


def _uncommented(text: str) -> str:
    """The sample with its commented-out key lines enabled."""
    return "\n".join(re.sub(r"^#(\w+ = )", r"\1", line) for line in text.splitlines())


def test_sample_loads_as_is(tmp_path):
    cfg = load_config(SAMPLE, environ={})
    assert cfg.to_dict() == AgentConfig().to_dict()


def test_every_key_is_documented_with_its_default(tmp_path):
    enabled = tmp_path / "agent.toml"
    enabled.write_text(_uncommented(SAMPLE.read_text()))
    data = tomllib.loads(enabled.read_text())
    defaults = AgentConfig().to_dict()
    for section, values in defaults.items():
        for key, value in values.items():
            if section == "tls":
                continue  # examples, not defaults (TLS is off by default)
            assert key in data.get(section, {}), f"{section}.{key} is missing from systemd/agent.toml"
            assert data[section][key] == value, f"{section}.{key}: sample says {data[section][key]!r}, default is {value!r}"
    assert set(data) == set(defaults)
    fields = {f.name for f in dataclasses.fields(AgentConfig)} - {"sources"}
    assert fields == set(defaults)
