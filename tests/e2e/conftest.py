"""Fixtures for e2e tests that boot guests through the real agent process.

Why here: several e2e test modules need agents whose VMs boot the test guests, and the
migration tests (test_vm_migration*.py) need one agent on each of the two namespace hosts; the
helpers behind the fixtures are in tests/support (agent.py, guests.py, hosts.py).
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from support.agent import start_agent
from support.hosts import agent_config, remove_domains
from support.tools import REPO


@pytest.fixture
def vm_agent_factory(libvirt_caps_cache):
    """Agents under a short /tmp path: QEMU's monitor socket lives under the embedded root and
    a unix socket path must stay below 108 bytes (pytest's tmp_path names are too long)."""
    started = []

    def factory(image_dirs: tuple[str, ...] = (), *, mode: str = "embedded", extra_config: str = ""):
        """``mode``: "embedded" or "system" (take the ``libvirt_mode`` fixture to run both;
        "system" needs the ``system_libvirtd`` fixture, which ``libvirt_mode`` brings)."""
        base = Path(tempfile.mkdtemp(prefix="cv", dir="/tmp"))
        dirs = ",".join(image_dirs or (str(REPO / ".cache" / "guests"),))
        agent = start_agent(base / "a", libvirt_caps_cache, mode=mode,
                            extra_config=f'[compute]\nimage_dirs = "{dirs}"\n' + extra_config)
        started.append((agent, base))
        return agent

    yield factory
    for agent, base in started:
        agent.stop()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def two_agents(two_hosts, libvirt_caps_cache):
    """One agent per host (``two_hosts``), each with the other's libvirt reachable for incoming
    migrations; yields (agent_a, agent_b, two_hosts, base dir). Host A alone has a port group
    (``agent_a.extra["pg"]``), for a destination that cannot take a VM."""
    import libvirt

    libvirt.registerErrorHandler(lambda _c, _e: None, None)
    base = Path(tempfile.mkdtemp(prefix="mg", dir="/tmp"))
    base.chmod(0o711)
    images = base / "img"
    images.mkdir()
    guests = REPO / ".cache" / "guests"
    agents = []
    s = base.name[-5:].lower()
    bridge, pg = f"mgb{s}", f"mgp{s}"
    for name, host in (("a", two_hosts.a), ("b", two_hosts.b)):
        extra = agent_config(host, f"{guests},{images}")
        if name == "a":  # a port group only host A has
            extra += (f'[network]\nreconcile_interval_s = 0\n[network.bridges.{bridge}]\ntype = "linux"\n'
                      f'[network.port_groups.{pg}]\nbridge = "{bridge}"\n')
        agents.append(start_agent(base / name, None, extra_config=extra))
    agents[0].extra["pg"] = pg
    yield agents[0], agents[1], two_hosts, base
    for agent in agents:
        agent.stop()
    subprocess.run(["ip", "link", "del", bridge], capture_output=True, timeout=30)
    for host in (two_hosts.a, two_hosts.b):
        remove_domains(host.uri, str(base))
    shutil.rmtree(base, ignore_errors=True)
