"""Two libvirt "hosts" on this one machine (tools/testbed.py ``hosts``), as the tests use them.

Why: migration between agents needs two libvirtds that do not know each other's domains, with
different host UUIDs (libvirt refuses to migrate a guest "to the same host"), both reachable over
TCP. tools/testbed.py runs each in a mount namespace of its own (private /run, /var/lib/libvirt,
/etc/libvirt ..., own cgroup directories, the machine's network namespace and /tmp shared); this
module wraps one brought-up pair for tests: the URIs to connect to, the facts a test checks from
outside (host UUID, the libvirtd pid, the QEMU pids of each host) and a free incoming-migration
port inside a host's own range. ``import libvirt`` happens inside the functions.
"""

from __future__ import annotations

import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path

from support.tools import load_tool


def testbed_module():
    """tools/testbed.py, loaded once per process under the name the integration conftest uses
    (loading it twice would make two distinct TestbedError classes)."""
    return sys.modules.get("cna_testbed") or load_tool("cna_testbed", "testbed.py")


@dataclass
class Host:
    """One namespace host: ``uri`` (qemu+tcp://127.0.0.1:PORT/system), ``host_uuid`` (what its
    libvirtd.conf sets and its capabilities report), ``libvirtd_pid``, ``virtlogd_pid``,
    ``migration_ports`` / ``display_ports`` (inclusive ranges in its qemu.conf)."""

    name: str
    uri: str
    tcp_port: int
    host_uuid: str
    libvirtd_pid: int
    virtlogd_pid: int | None
    migration_ports: tuple[int, int]
    display_ports: tuple[int, int]
    _ns: object = field(repr=False)

    @property
    def root(self) -> Path:
        """This host's file system as its libvirtd sees it (its private /run/libvirt ...)."""
        return self._ns.root

    def qemu_pids(self) -> dict[str, int]:
        """domain name -> pid of its QEMU on this host (libvirtd's pid files in the host's
        private /run/libvirt/qemu, each a live qemu-system process in this host's cgroups)."""
        return self._ns.qemu_pids()

    def pids(self) -> list[int]:
        """Every process of this host (libvirtd, virtlogd, QEMU, the namespace holder)."""
        return self._ns.pids()

    def migration_uri(self) -> str:
        """``tcp://127.0.0.1:PORT`` with PORT free right now inside this host's migration range
        (the address the destination QEMU listens on for an incoming migration)."""
        lo, hi = self.migration_ports
        for port in range(lo, hi + 1):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            finally:
                s.close()
            return f"tcp://127.0.0.1:{port}"
        raise RuntimeError(f"host {self.name}: no free port in its migration range {lo}-{hi}")

    def open(self):
        """A new libvirt connection to this host (the caller closes it)."""
        import libvirt

        return libvirt.open(self.uri)


@dataclass
class TwoHosts:
    """Host ``a`` and host ``b`` of one testbed run dir (``testbed`` is the Testbed)."""

    a: Host
    b: Host
    testbed: object = field(repr=False)

    def __iter__(self):
        return iter((self.a, self.b))


def _host(ns) -> Host:
    return Host(name=ns.name, uri=ns.uri, tcp_port=ns.tcp_port, host_uuid=ns.host_uuid,
                libvirtd_pid=ns.libvirtd_pid, virtlogd_pid=ns.virtlogd_pid,
                migration_ports=ns.migration_ports, display_ports=ns.display_ports, _ns=ns)


def start_two_hosts(run_dir: Path) -> TwoHosts:
    """Bring up hosts a and b under run_dir (tools/testbed.py) and return them; on failure
    whatever came up is torn down and TestbedError raised."""
    tb = testbed_module().Testbed(run_dir)
    hosts = tb.hosts_up()
    return TwoHosts(a=_host(hosts["a"]), b=_host(hosts["b"]), testbed=tb)


def stop_two_hosts(hosts: TwoHosts) -> None:
    """Tear both hosts down: daemons, QEMU, namespaces, cgroups and private dirs."""
    hosts.testbed.hosts_down()


def domain_state(uri: str, uuid: str) -> tuple[bool, bool] | None:
    """(persistent, active) of domain ``uuid`` on the libvirt at ``uri``, or None when it is not
    there: where a VM is, judged from each host's libvirt rather than from an agent."""
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
    """Destroy and undefine the domains on the libvirt at ``uri`` whose XML names ``marker`` (a
    test's directory): guests outlive the agents that made them."""
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


def agent_config(host: Host, image_dirs: str) -> str:
    """The config lines an agent on namespace host ``host`` needs for migrations: its libvirt,
    the image directories (comma-separated) and the address the peers' QEMU send memory to."""
    return (f'[libvirt]\nuri = "{host.uri}"\n[compute]\nimage_dirs = "{image_dirs}"\n'
            f'[migration]\nlibvirt_uri = "{host.uri}"\nmigrate_host = "127.0.0.1"\n')
