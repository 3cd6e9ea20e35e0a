"""Shared test helpers: a warm libvirt capabilities cache, and a real agent process.

The embedded libvirt driver probes every installed QEMU binary the first time a state
directory is used (about 12 s on the test machines, x86_64 and aarch64 emulators both). The
probe result is a cache under ``<root>/cache/qemu/capabilities``, valid as long as the QEMU
binaries and libvirt do not change, so the session warms it once and every agent the tests
start gets a copy: same code path, minus the repeated probe.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import support
from support import AgentProcess, start_agent


@pytest.fixture(scope="session")
def libvirt_caps_cache(tmp_path_factory) -> Path | None:
    """A warmed embedded-libvirt capabilities cache (None when libvirt-python is missing).

    Warmed in a child process: libvirt lets one process open only one embedded root for its
    lifetime, and the pytest process must stay free to open its own (tests/integration).
    """
    root = tmp_path_factory.mktemp("libvirt-warm")
    code = (
        "import libvirt, sys\n"
        "libvirt.registerErrorHandler(lambda c, e: None, None)\n"
        "libvirt.virEventRegisterDefaultImpl()  # the embedded driver refuses to open without one\n"
        # Same qemu.conf as the agent's roots: the cache is only valid for the same QEMU uid.
        f"from cna_agent.hypervisor import prepare_embedded_root; prepare_embedded_root({str(root)!r})\n"
        f"conn = libvirt.open('qemu:///embed?root={root}')\n"
        "conn.getCapabilities(); conn.close()\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    if out.returncode != 0:
        if "No module named 'libvirt'" in out.stderr:
            return None
        raise RuntimeError(f"warming libvirt's capabilities cache failed: {out.stderr[-2000:]}")
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


@pytest.fixture(autouse=True)
def _destroy_leftover_guests():
    """After each test, kill the guests of agents that test started (they outlive agents)."""
    first = len(support.STARTED)
    yield
    for agent in support.STARTED[first:]:
        support.kill_guests_of(agent)


@pytest.fixture
def system_libvirtd():
    """The host's libvirtd (qemu:///system: QEMU runs as its own unprivileged user), started if
    it was not running and left as it was found."""
    if not Path("/usr/sbin/libvirtd").exists():
        pytest.fail("libvirtd is not installed: run tools/setup.sh")
    was_running = support.libvirtd_answers()
    if not was_running:
        support.start_libvirtd()
    yield
    if was_running and not support.libvirtd_answers():
        support.start_libvirtd()
    elif not was_running and support.libvirtd_answers():
        support.stop_libvirtd()

