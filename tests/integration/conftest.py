"""Fixtures for integration tests: the daemon testbed, an embedded libvirt, the host's libvirtd.

Why here: every integration test needs the same expensive things (a bootable guest, real
daemons); building/starting them once per session keeps the suite fast (the guests come from
the cross-tier ``test_guest`` fixture in tests/conftest.py), and tearing them down
here guarantees no QEMU process or daemon is left behind. The helpers behind them are in
tests/support (libvirt.py, tools.py).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import pytest

from support import libvirt as test_libvirt
from support.tools import load_tool

testbed_mod = load_tool("cna_testbed", "testbed.py")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: boots real guests; skip with -m 'not slow'")
    config.addinivalue_line("markers", "needs_root: needs root (daemons, network namespaces)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.geteuid() != 0:
        skip = pytest.mark.skip(reason="needs root")
        for item in items:
            if "needs_root" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def testbed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """libvirtd, OVS (netdev datapath) and tgtd, up for the session and stopped afterwards.

    Uses a private run dir so the session's OVS DB starts empty; daemons that were already
    running (e.g. a host libvirtd) are reused and left running.
    """
    if os.geteuid() != 0:
        pytest.skip("the testbed needs root")
    tb = testbed_mod.Testbed(tmp_path_factory.mktemp("tb", numbered=True))
    try:
        tb.up()
    except testbed_mod.TestbedError as e:
        tb.down()
        pytest.fail(f"testbed up failed: {e}")
    yield tb
    tb.down()


@pytest.fixture(scope="session")
def embedded_libvirt(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """A `qemu:///embed` connection (no daemon); every domain left at the end is destroyed.

    Its qemu.conf (support.libvirt.EMBEDDED_QEMU_CONF): QEMU runs as root without relabelling
    (so the cached guest files keep their owner) and chardev logs are written by QEMU itself.
    """
    libvirt = pytest.importorskip("libvirt")
    if os.geteuid() != 0:
        pytest.skip("the embedded QEMU driver here needs root")
    conn = test_libvirt.open_embedded(tmp_path_factory.mktemp("embed", numbered=True))
    try:
        yield conn
    finally:
        for dom in conn.listAllDomains():
            try:
                if dom.isActive():
                    dom.destroy()
                if dom.isPersistent():
                    dom.undefine()
            except libvirt.libvirtError:
                pass
        conn.close()
