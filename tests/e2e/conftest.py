"""Fixtures for e2e tests that boot guests through the real agent process.

Why here: several e2e test modules need agents whose VMs boot the test guests; the helpers
behind the fixture are in tests/support (agent.py, guests.py).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest

from support.agent import start_agent
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
