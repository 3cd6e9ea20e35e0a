"""Fixtures for integration tests: cached test guests, the daemon testbed, an embedded libvirt.

Why here: every integration test needs the same expensive things (a bootable guest, real
daemons); building/starting them once per session keeps the suite fast, and tearing them down
here guarantees no QEMU process or daemon is left behind.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from types import ModuleType
from typing import Callable, Iterator

import pytest

REPO = Path(__file__).resolve().parents[2]
TOOLS = REPO / "tools"
sys.path.insert(0, str(Path(__file__).resolve().parent))


def _load_tool(name: str, file: str) -> ModuleType:
    """Import a tools/ script by path (build-test-guest.py has a dash, so no plain import)."""
    spec = importlib.util.spec_from_file_location(name, TOOLS / file)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


testbed_mod = _load_tool("cna_testbed", "testbed.py")


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
def test_guest() -> Callable[[str], dict]:
    """arch -> {kernel, initrd, arch, marker, console}; built once and cached across sessions."""
    cache: dict[str, dict] = {}

    def get(arch: str = "x86_64") -> dict:
        if arch not in cache:
            p = subprocess.run([sys.executable, str(TOOLS / "build-test-guest.py"), "--arch", arch,
                                "--print-json"], capture_output=True, text=True, timeout=900)
            if p.returncode != 0:
                pytest.fail(f"build-test-guest.py --arch {arch} failed: {p.stderr[-2000:]}")
            cache[arch] = json.loads(p.stdout)
        return cache[arch]

    return get


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


_event_loop_started = False


def _start_event_loop() -> None:
    """libvirt's default event loop in one daemon thread (needed for the embedded driver)."""
    global _event_loop_started
    import libvirt

    if _event_loop_started:
        return
    libvirt.virEventRegisterDefaultImpl()

    def loop() -> None:
        while True:
            libvirt.virEventRunDefaultImpl()

    threading.Thread(target=loop, name="libvirt-events", daemon=True).start()
    _event_loop_started = True


@pytest.fixture(scope="session")
def embedded_libvirt(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """A `qemu:///embed` connection (no daemon); every domain left at the end is destroyed.

    qemu.conf for the embedded root: QEMU runs as root without relabelling (so the cached guest
    files keep their owner) and chardev logs are written by QEMU itself (no virtlogd).
    """
    libvirt = pytest.importorskip("libvirt")
    if os.geteuid() != 0:
        pytest.skip("the embedded QEMU driver here needs root")
    root = tmp_path_factory.mktemp("embed", numbered=True)
    (root / "etc").mkdir(exist_ok=True)
    (root / "etc" / "qemu.conf").write_text(
        'user = "root"\ngroup = "root"\ndynamic_ownership = 0\nremember_owner = 0\n'
        'security_driver = "none"\nstdio_handler = "file"\n')
    _start_event_loop()
    conn = libvirt.open(f"qemu:///embed?root={root}")
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
