"""Shared test helpers: a warm libvirt capabilities cache, and a real agent process.

The embedded libvirt driver probes every installed QEMU binary the first time a state
directory is used (about 12 s on the test machines, x86_64 and aarch64 emulators both). The
probe result is a cache under ``<root>/cache/qemu/capabilities``, valid as long as the QEMU
binaries and libvirt do not change, so the session warms it once and every agent the tests
start gets a copy: same code path, minus the repeated probe.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from support import AgentProcess, start_agent


@pytest.fixture(scope="session")
def libvirt_caps_cache(tmp_path_factory) -> Path | None:
    """A warmed embedded-libvirt capabilities cache (None when libvirt-python is missing)."""
    try:
        import libvirt
    except ImportError:
        return None
    root = tmp_path_factory.mktemp("libvirt-warm")
    from cna_agent.compute.hypervisor import ensure_event_loop

    ensure_event_loop()
    conn = libvirt.open(f"qemu:///embed?root={root}")
    conn.getCapabilities()
    conn.close()
    cache = root / "cache" / "qemu" / "capabilities"
    return cache if cache.is_dir() else None


@pytest.fixture
def agent_factory(tmp_path, libvirt_caps_cache):
    started: list[AgentProcess] = []

    def factory(name: str = "agent", **kw) -> AgentProcess:
        agent = start_agent(tmp_path / name, libvirt_caps_cache, **kw)
        started.append(agent)
        return agent

    yield factory
    for agent in started:
        agent.stop()


@pytest.fixture
def agent(agent_factory) -> AgentProcess:
    return agent_factory()
