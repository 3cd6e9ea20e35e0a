"""The daemon speaks sd_notify as systemd expects (Type=notify, WatchdogSec)."""

from __future__ import annotations

import os
import signal
import socket
import time

from support.agent import write_config


def _collect(sock: socket.socket, until: str, timeout: float) -> list[str]:
    messages: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sock.settimeout(max(0.05, deadline - time.monotonic()))
        try:
            messages.append(sock.recv(4096).decode())
        except socket.timeout:
            break
        if any(until in m for m in messages):
            break
    return messages


def test_ready_watchdog_and_stopping_reach_the_notify_socket(agent_factory, tmp_path):
    notify_path = tmp_path / "notify.sock"
    sd = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sd.bind(str(notify_path))
    try:
        base = tmp_path / "node"
        base.mkdir()
        cfg, _ = write_config(base, tcp_port=None)
        agent = agent_factory("node", tcp=False, config=cfg, wait=False,
                              env={"NOTIFY_SOCKET": str(notify_path), "WATCHDOG_USEC": "2000000"})
        ready = _collect(sd, "READY=1", timeout=90)
        assert any("READY=1" in m for m in ready), f"no READY=1 in {ready}\n{agent.log_text()}"
        assert any("STATUS=serving" in m for m in ready)
        # The watchdog is pinged at half of WATCHDOG_USEC (1 s) while the agent is healthy.
        pings = [m for m in _collect(sd, "\x00never", timeout=3.5) if "WATCHDOG=1" in m]
        assert len(pings) >= 2
        agent.proc.send_signal(signal.SIGTERM)
        stopping = _collect(sd, "STOPPING=1", timeout=30)
        assert any("STOPPING=1" in m for m in stopping)
        assert agent.proc.wait(timeout=30) == 0
    finally:
        sd.close()
        if notify_path.exists():
            os.unlink(notify_path)
