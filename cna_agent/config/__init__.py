"""The agent's configuration: one typed object, loaded and validated once at start-up.

Sources, later ones winning (the CRI-O model admins know):

1. defaults in the section dataclasses (every option has one, so an empty file is valid);
2. ``/etc/cna-agent/agent.toml`` (or ``--config``);
3. drop-ins ``<config>.d/*.toml`` in lexical order;
4. environment variables ``CNA_AGENT_<SECTION>_<KEY>`` (e.g. ``CNA_AGENT_GRPC_LISTEN``), so a
   systemd ``EnvironmentFile=`` can override one key without editing files.

Unknown sections and keys are errors, not warnings: a typo such as ``listn`` silently
ignored would leave the agent listening where the admin did not expect. Every error names the
key and the file it came from, and the daemon exits non-zero on it.

The package, one job per module: sections.py (the schema: dataclasses and defaults),
loading.py (files, drop-ins and environment merged), coerce.py (one value's type check),
declarations.py (the declared bridges, port groups and datastores), validation.py (the
cross-field checks), toml_render.py (the effective config as TOML). This module re-exports
the public names, so callers import from ``cna_agent.config`` only.
"""

from __future__ import annotations

from cna_agent.config.loading import DEFAULT_CONFIG_PATH, ENV_PREFIX, load_config
from cna_agent.config.sections import (
    VM_STATS_GROUPS,
    AgentConfig,
    ComputeConfig,
    ConfigError,
    GrpcConfig,
    HostConfig,
    LibvirtConfig,
    LogConfig,
    MetricsConfig,
    NetworkConfig,
    StateConfig,
    StatsConfig,
    StorageConfig,
    TlsConfig,
    VrmConfig,
)
from cna_agent.config.validation import is_loopback, parse_host_port

__all__ = [
    "DEFAULT_CONFIG_PATH",
    "ENV_PREFIX",
    "VM_STATS_GROUPS",
    "AgentConfig",
    "ComputeConfig",
    "ConfigError",
    "GrpcConfig",
    "HostConfig",
    "LibvirtConfig",
    "LogConfig",
    "MetricsConfig",
    "NetworkConfig",
    "StateConfig",
    "StatsConfig",
    "StorageConfig",
    "TlsConfig",
    "VrmConfig",
    "is_loopback",
    "load_config",
    "parse_host_port",
]
