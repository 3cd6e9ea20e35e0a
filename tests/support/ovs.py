"""ovs-vsctl against the testbed's OVSDB, as the OVS tests read it from outside the agent."""

from __future__ import annotations

import subprocess
from typing import Any


def vsctl(tb: Any, *args: str) -> str:
    """``ovs-vsctl`` on the testbed's database (``tb.ovsdb_remote``); fails the test on an error."""
    p = subprocess.run(["ovs-vsctl", f"--db={tb.ovsdb_remote}", "--timeout=20", *args], capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, p.stderr
    return p.stdout.strip()
