"""Two agents on the two namespace hosts (support/hosts.py), and what migration tests check
from outside them: where libvirt has the domain, which QEMU processes run it, what each
agent's state database still holds for it.

Why a module: the live, fault and convergence migration tests all need the same pair of agents
(each pointed at its own host's libvirtd, each accepting incoming migrations from the other) and
the same outside views; judging a migration from the agents' own answers would prove nothing.
"""

from __future__ import annotations

import shutil
import signal
import sqlite3
import subprocess
import tempfile
import time
from pathlib import Path

from support.agent import AgentProcess, start_agent
from support.hosts import agent_config as hosts_agent_config
from support.hosts import remove_domains
from support.procs import proc_argvs
from support.tools import REPO


def agent_config(host, images: Path, extra: str = "") -> str:
    return hosts_agent_config(host, f"{REPO / '.cache' / 'guests'},{images}") + extra


def make_base(prefix: str) -> Path:
    """A short /tmp directory QEMU (running unprivileged under the hosts' libvirtds) can traverse."""
    base = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    base.chmod(0o711)
    (base / "img").mkdir()
    return base


def restart(agent: AgentProcess, *, env: dict | None = None, sig: int = signal.SIGKILL) -> AgentProcess:
    """Kill ``agent`` (SIGKILL unless told otherwise; nothing happens to its guests: libvirtd
    runs them) and start it again on the same config, state and TCP port."""
    agent.stop(sig)
    new = start_agent(agent.dir, None, config=agent.config, env=env)
    new.tcp_port, new.extra = agent.tcp_port, agent.extra
    return new


def qemu_pids(uuid: str, *, incoming: bool | None = None) -> list[int]:
    """QEMU processes of guest ``uuid`` on this machine (either host); ``incoming`` True: only
    those started with -incoming (a destination's), False: only the others, None: all."""
    return [pid for pid, argv in proc_argvs()
            if b"qemu-system" in argv[0] and any(uuid.encode() in a for a in argv)
            and (incoming is None or (b"-incoming" in argv) == incoming)]


def claims(agent: AgentProcess, uuid: str) -> dict[str, int]:
    """What the agent's state database holds for VM ``uuid``: placement rows and prepared
    incoming migrations (read from the SQLite file, not asked of the agent)."""
    db = sqlite3.connect(f"file:{agent.dir / 'state' / 'agent.db'}?mode=ro", uri=True, timeout=10)
    try:
        placements = db.execute("SELECT COUNT(*) FROM placements WHERE vm_uuid = ?", (uuid,)).fetchone()[0]
        prepared = sum(1 for (v,) in db.execute("SELECT value FROM kv WHERE key LIKE 'migration.incoming.%'") if uuid in v)
    finally:
        db.close()
    return {"placements": placements, "prepared": prepared}


def wait_until(check, timeout: float, what: str, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(interval)


def tear_down(agents, hosts, base: Path, bridges: tuple[str, ...] = ()) -> None:
    for agent in agents:
        agent.stop()
    for bridge in bridges:
        subprocess.run(["ip", "link", "del", bridge], capture_output=True, timeout=30)
    for host in hosts:
        remove_domains(host.uri, str(base))
    shutil.rmtree(base, ignore_errors=True)
