"""Helpers for tests that move VMs between the two namespace hosts (support.hosts) with one agent
per host: what libvirt on a host says about a domain, one agent per host, and the clean-up of
what a test left on the hosts (the guests outlive the agents). ``import libvirt`` happens inside
the functions."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from support.agent import AgentProcess, start_agent


def domain_state(uri: str, uuid: str) -> tuple[bool, bool] | None:
    """(persistent, active) of ``uuid`` on the libvirt at ``uri``, or None when it is not there."""
    import libvirt

    conn = libvirt.open(uri)
    try:
        dom = conn.lookupByUUIDString(uuid)
        return bool(dom.isPersistent()), bool(dom.isActive())
    except libvirt.libvirtError:
        return None
    finally:
        conn.close()


def remove_domains(uri: str, marker: str) -> None:
    """Destroy and undefine every domain on ``uri`` whose XML mentions ``marker`` (a test's
    directory: its paths are in the domain's disks and logs)."""
    import libvirt

    conn = libvirt.open(uri)
    try:
        for dom in conn.listAllDomains():
            try:
                if marker in dom.XMLDesc(0):
                    if dom.isActive():
                        dom.destroy()
                    if dom.isPersistent():
                        dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_NVRAM)
            except libvirt.libvirtError:
                continue
    finally:
        conn.close()


def temp_base(prefix: str) -> Path:
    """A directory under /tmp both hosts see (their mount namespaces share /tmp), traversable by
    QEMU's user."""
    base = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    base.chmod(0o711)
    return base


def start_pair(two_hosts, base: Path, extra_a: str, extra_b: str) -> tuple[AgentProcess, AgentProcess]:
    """One agent per host (``base/a`` on host a, ``base/b`` on host b), each connected to its
    host's libvirtd and taking incoming migrations there; ``extra_*``: more TOML per agent."""
    agents = []
    for name, host, extra in (("a", two_hosts.a, extra_a), ("b", two_hosts.b, extra_b)):
        config = (f'[libvirt]\nuri = "{host.uri}"\n[migration]\nlibvirt_uri = "{host.uri}"\nmigrate_host = "127.0.0.1"\n'
                  + extra)
        agents.append(start_agent(base / name, None, extra_config=config))
    return agents[0], agents[1]


def stop_pair(agents: tuple[AgentProcess, ...], two_hosts, base: Path) -> None:
    for agent in agents:
        agent.stop()
    for host in (two_hosts.a, two_hosts.b):
        remove_domains(host.uri, str(base))
    shutil.rmtree(base, ignore_errors=True)
