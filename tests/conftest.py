"""Fixtures every tier shares: a warm libvirt capabilities cache, the real agent process, and
the test guests.

The embedded libvirt driver probes every installed QEMU binary the first time a state
directory is used (about 12 s on the test machines, x86_64 and aarch64 emulators both). The
probe result is a cache under ``<root>/cache/qemu/capabilities``, valid as long as the QEMU
binaries and libvirt do not change, so the session warms it once and every agent the tests
start gets a copy: same code path, minus the repeated probe.

The helpers behind these fixtures are in tests/support (on sys.path through pyproject's
``pythonpath``); fixtures only one tier uses are in that tier's conftest.py.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import pytest

from support import agent as agent_proc
from support.agent import AgentProcess, start_agent
from support.guests import build_guest
from support import hosts as test_hosts
from support import libvirt as test_libvirt
from support.libvirt import warm_capabilities_cache


@pytest.fixture(scope="session")
def libvirt_caps_cache(tmp_path_factory) -> Path | None:
    """A warmed embedded-libvirt capabilities cache (None when libvirt-python is missing).

    Warmed in a child process: libvirt lets one process open only one embedded root for its
    lifetime, and the pytest process must stay free to open its own (tests/integration).
    """
    return warm_capabilities_cache(tmp_path_factory.mktemp("libvirt-warm"))


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
    first = len(agent_proc.STARTED)
    yield
    for agent in agent_proc.STARTED[first:]:
        agent_proc.kill_guests_of(agent)
        agent_proc.remove_system_domains(agent)


@pytest.fixture(scope="session")
def test_guest() -> Callable[..., dict]:
    """arch -> {kernel, initrd, arch, marker, console}; built once and cached across sessions
    (support.guests.build_guest)."""

    def get(arch: str = "x86_64") -> dict:
        return build_guest(arch)

    return get


@pytest.fixture(params=agent_proc.MODES)
def libvirt_mode(request) -> str:
    """Run the test once per way the agent drives QEMU (support.agent.MODES); "system" brings
    up the host's libvirtd for the test (``system_libvirtd``)."""
    if request.param == "system":
        request.getfixturevalue("system_libvirtd")
    return request.param


@pytest.fixture
def system_mode(system_libvirtd) -> str:
    """The host's libvirtd only (the production way), for a test whose embedded-driver run would
    repeat what other tests already drive on the embedded driver (kept out for suite time)."""
    return "system"


@pytest.fixture
def system_libvirtd():
    """The host's libvirtd (qemu:///system: QEMU runs as its own unprivileged user), started if
    it was not running and left as it was found (other tests' agents pick qemu:///system when
    its socket exists). Before it is stopped, the domains of the agents this test started are
    removed: a definition left on its disk would be adopted by the next test's agent."""
    if not Path("/usr/sbin/libvirtd").exists():
        pytest.fail("libvirtd is not installed: run tools/setup.sh")
    was_running = test_libvirt.libvirtd_answers()
    had_virtlogd = test_libvirt.virtlogd_running()
    if not was_running:
        test_libvirt.start_libvirtd()
    first = len(agent_proc.STARTED)
    yield
    if not test_libvirt.libvirtd_answers():
        test_libvirt.start_libvirtd()
    for agent in agent_proc.STARTED[first:]:
        agent_proc.remove_system_domains(agent)
    if not was_running and test_libvirt.libvirtd_answers():
        test_libvirt.stop_libvirtd()
    if not had_virtlogd and test_libvirt.virtlogd_running():
        test_libvirt.stop_virtlogd()


@pytest.fixture(scope="session")
def two_hosts(tmp_path_factory):
    """Two libvirt hosts on this machine, ``a`` and ``b`` (support.hosts.TwoHosts): each its own
    libvirtd in a mount namespace, ``uri`` qemu+tcp://127.0.0.1:PORT/system, ``host_uuid``,
    ``libvirtd_pid``, ``qemu_pids()``, ``migration_uri()``. Up for the session, torn down with
    their guests at its end; shared by the integration and e2e tiers (migration)."""
    if os.geteuid() != 0:
        pytest.skip("two namespace hosts need root")
    try:
        hosts = test_hosts.start_two_hosts(tmp_path_factory.mktemp("hosts", numbered=True))
    except test_hosts.testbed_module().TestbedError as e:
        pytest.fail(f"two hosts did not come up: {e}")
    yield hosts
    test_hosts.stop_two_hosts(hosts)
