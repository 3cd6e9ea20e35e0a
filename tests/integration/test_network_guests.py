"""Guests that really talk: OVS netdev bridges with VLAN port groups, a Linux bridge, and
reconciliation repairing a hand-deleted OVS port (network's own job: ports, labels, repair).

NIC hot-plug, unplug and link changes are compute's (compute/nics.py) and are checked on managed
VMs through the real agent in test_vm_nics_agent.py. Here the guests are plain transient domains
whose NICs are rendered by compute's own renderer, and network learns about them the way it does
in the daemon: through compute's inventory (the VmNics view).

Real daemons only: a private ovsdb-server + ovs-vswitchd (netdev datapath, tools/testbed.py),
the embedded libvirt QEMU driver, TCG test guests (tools/build-test-guest.py) whose serial
console shell runs ``ping``. libvirt plugs OVS NICs with ovs-vsctl, pointed at the private
database through OVS_RUNDIR (NetworkService sets it from ``[network] ovsdb``).

The guests' taps live in the host's network namespace (QEMU opens them there), so these
bridges are created in the host namespace with unique names, isolated (no uplink), and removed
afterwards; the netlink-only Linux bridge checks run in a scratch namespace (test_network_linux).
"""

from __future__ import annotations

import asyncio
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from support.ovs import vsctl

from cna_agent.compute.binder import generate_mac
from cna_agent.compute.inventory import VmInventory
from cna_agent.compute.render import interface_xml
from cna_agent.compute.spec import NicSpec, VmSpec
from cna_agent.errors import FailedPrecondition, InvalidArgument
from cna_agent.network.model import BridgeDecl, PortGroupDecl
from cna_agent.network.service import NetworkService
from cna_agent.operations import ResourceLocks
from support.console import ConsoleSocket, SerialLog
from support.guests import domain_xml
from support.libvirt import ConnHypervisor

pytestmark = [pytest.mark.needs_root, pytest.mark.slow]

ROOT_PORTS = ("<controller type='pci' index='0' model='pcie-root'/>"
              + "".join(f"<controller type='pci' index='{i}' model='pcie-root-port'/>" for i in range(1, 5)))


class Events:
    """Collects what the service publishes (the EventHub.publish signature)."""

    def __init__(self) -> None:
        self.items: list[tuple[str, dict[str, Any]]] = []

    async def publish(self, type: str, **fields: Any) -> None:
        self.items.append((type, fields))

    def of(self, type_: str) -> list[dict[str, Any]]:
        return [f for t, f in self.items if t == type_]


@pytest.fixture(scope="module")
def ovs(testbed):
    """The session's testbed OVS: one netdev-datapath ovs-vswitchd per network namespace
    works (a second one cannot open its "ovs-netdev" device), so tests share it."""
    return testbed



def _svc(tb: Any, conn: Any, tmp_path: Path) -> tuple[NetworkService, Events]:
    events = Events()
    inventory = VmInventory(ConnHypervisor(conn), ResourceLocks())  # type: ignore[arg-type]
    return NetworkService(ovsdb=tb.ovsdb_remote, ovsdb_timeout_s=10, state_dir=str(tmp_path / "state"), events=events,
                          vms=inventory), events


class Guest:
    def __init__(self, conn: Any, guest: dict, tmp_path: Path, name: str, ip: str, nics_xml: str) -> None:
        self.name = name
        self.log = tmp_path / f"{name}.log"
        self.sock = tmp_path / f"{name}.sock"
        xml = domain_xml(name, guest, serial_log=self.log, serial_socket=self.sock, memory_mib=160,
                         cmdline_extra=f"cna.ip={ip}/24", devices_extra=ROOT_PORTS + nics_xml)
        self.dom = conn.createXML(xml, 0)
        self.uuid = self.dom.UUIDString()
        self.console: ConsoleSocket | None = None

    def ready(self) -> ConsoleSocket:
        SerialLog(self.log).wait_for(r"CNA-GUEST-READY", timeout=120)
        self.console = ConsoleSocket(self.sock)
        self.console.send("\n")
        self.console.wait_for(r"cna# ", timeout=30, partial=True)
        return self.console

    def ping(self, ip: str) -> int:
        assert self.console is not None
        rc, _out = self.console.run(f"ping -c 3 -W 2 {ip}", timeout=60)
        return rc

    def destroy(self) -> None:
        if self.console is not None:
            self.console.close()
        try:
            self.dom.destroy()
        except Exception:
            pass


async def _nic(svc: NetworkService, pg: str, mac: str = "") -> str:
    """A NIC in port group ``pg`` as compute renders it (the port group bound by network)."""
    binding = await svc.resolve_port_group(pg, field="nic.port_group")
    taken = {n.mac for n in await svc.vms.vm_nics()}
    nic = NicSpec(port_group=pg, mac=mac or generate_mac(taken), interface_id=str(uuid.uuid4()))
    return interface_xml(VmSpec(name="g", uuid=str(uuid.uuid4()), nics=[nic]), 0, binding)


def test_ovs_vlan_port_groups_ping_and_reconcile(ovs, embedded_libvirt, test_guest, tmp_path):
    guest = test_guest("x86_64")
    suffix = uuid.uuid4().hex[:6]
    br = f"cbr{suffix}"
    svc, events = _svc(ovs, embedded_libvirt, tmp_path)
    guests: list[Guest] = []

    async def main() -> None:
        decl, changes = await svc.ensure_bridge(BridgeDecl(name=br, type="ovs", datapath_type="netdev"))
        assert changes and changes[0].startswith("created")
        _, again = await svc.ensure_bridge(BridgeDecl(name=br, type="ovs", datapath_type="netdev"))
        assert again == []  # idempotent
        await svc.ensure_port_group(PortGroupDecl(name=f"pg10-{suffix}", bridge=br, vlan=10))
        await svc.ensure_port_group(PortGroupDecl(name=f"pg20-{suffix}", bridge=br, vlan=20))
        a = Guest(embedded_libvirt, guest, tmp_path, f"na{suffix}", "10.77.0.1", await _nic(svc, f"pg10-{suffix}"))
        guests.append(a)
        b = Guest(embedded_libvirt, guest, tmp_path, f"nb{suffix}", "10.77.0.2", await _nic(svc, f"pg10-{suffix}"))
        guests.append(b)
        c = Guest(embedded_libvirt, guest, tmp_path, f"nc{suffix}", "10.77.0.3", await _nic(svc, f"pg20-{suffix}"))
        guests.append(c)
        for g in guests:
            g.ready()

        # libvirt plugged the ports with the VLAN; the first reconcile labels them with their
        # port group (external_ids), after which nothing is left to repair.
        labelled = await svc.reconcile(repair=True)
        assert all(d.repaired and "external_ids" in d.problem for d in labelled), labelled
        assert await svc.reconcile(repair=False) == []
        vifs = {v.vm_uuid: v for v in await svc.vifs()}
        assert vsctl(ovs, "get", "Port", vifs[b.uuid].device, "external_ids:port-group").strip('"') == f"pg10-{suffix}"
        assert vsctl(ovs, "get", "Port", vifs[a.uuid].device, "tag") == "10"
        assert vsctl(ovs, "get", "Port", vifs[c.uuid].device, "tag") == "20"
        assert vifs[a.uuid].port_group == f"pg10-{suffix}"

        assert a.ping("10.77.0.2") == 0, "same VLAN must talk"
        assert c.ping("10.77.0.1") != 0, "another VLAN must not reach VLAN 10"

        # Delete guest B's port by hand: reconcile finds it and puts it back with its VLAN.
        dev_b = vifs[b.uuid].device
        vsctl(ovs, "del-port", br, dev_b)
        assert a.ping("10.77.0.2") != 0
        found = await svc.reconcile(repair=False)
        assert [d.resource for d in found if not d.repaired] == [f"port/{dev_b}"]
        fixed = await svc.reconcile(repair=True)
        assert [(d.resource, d.repaired) for d in fixed] == [(f"port/{dev_b}", True)]
        assert vsctl(ovs, "get", "Port", dev_b, "tag") == "10"
        assert vsctl(ovs, "get", "Interface", dev_b, "external_ids:vm-uuid").strip('"') == b.uuid
        assert any(e["resource_id"] == f"port/{dev_b}" for e in events.of("network.repaired"))
        assert any(e["resource_id"] == f"port/{dev_b}" for e in events.of("network.drift"))
        deadline = time.monotonic() + 30
        while a.ping("10.77.0.2") != 0:
            assert time.monotonic() < deadline, "repaired port does not carry traffic"
        assert await svc.reconcile(repair=False) == []

        # Bad input changes nothing on the host.
        before = vsctl(ovs, "show")
        for bad, exc in (
            (lambda: svc.ensure_port_group(PortGroupDecl(name="pgx", bridge=br, vlan=4095)), InvalidArgument),
            (lambda: svc.ensure_port_group(PortGroupDecl(name="pgx", bridge="nosuchbr", vlan=5)), InvalidArgument),
            (lambda: svc.ensure_bridge(BridgeDecl(name="a-very-long-bridge", type="ovs")), InvalidArgument),
            (lambda: svc.ensure_bridge(BridgeDecl(name=f"cbx{suffix}", type="ovs", uplink="nosuchnic0")), InvalidArgument),
            (lambda: svc.resolve_port_group("nosuchpg", field="nic.port_group"), InvalidArgument),
        ):
            with pytest.raises(exc):
                await bad()
        assert vsctl(ovs, "show") == before
        assert set(svc.port_groups) == {f"pg10-{suffix}", f"pg20-{suffix}"}

    try:
        asyncio.run(main())
    finally:
        for g in guests:
            g.destroy()
        subprocess.run(["ovs-vsctl", f"--db={ovs.ovsdb_remote}", "--if-exists", "del-br", br], timeout=30)
        asyncio.run(svc.close())


def test_linux_bridge_two_guests_ping_and_vlan_refused(ovs, embedded_libvirt, test_guest, tmp_path):
    guest = test_guest("x86_64")
    suffix = uuid.uuid4().hex[:6]
    br = f"lbr{suffix}"
    svc, events = _svc(ovs, embedded_libvirt, tmp_path)
    guests: list[Guest] = []

    async def main() -> None:
        _, changes = await svc.ensure_bridge(BridgeDecl(name=br, type="linux", mtu=1400))
        assert changes[0] == f"created Linux bridge {br}"
        await svc.ensure_port_group(PortGroupDecl(name=f"lpg-{suffix}", bridge=br))
        binding = await svc.resolve_port_group(f"lpg-{suffix}", field="f")
        assert binding.kind == "linux-bridge" and binding.vlan is None and binding.mtu == 1400
        support = await svc.facts()
        if not support["linux_vlan_devices"]:
            with pytest.raises(FailedPrecondition, match="8021q"):
                await svc.ensure_port_group(PortGroupDecl(name=f"lv-{suffix}", bridge=br, vlan=30))
            assert f"lv-{suffix}" not in svc.port_groups
        a = Guest(embedded_libvirt, guest, tmp_path, f"la{suffix}", "10.78.0.1", await _nic(svc, f"lpg-{suffix}"))
        guests.append(a)
        b = Guest(embedded_libvirt, guest, tmp_path, f"lb{suffix}", "10.78.0.2", await _nic(svc, f"lpg-{suffix}"))
        guests.append(b)
        for g in guests:
            g.ready()
        assert a.ping("10.78.0.2") == 0
        assert b.ping("10.78.0.1") == 0
        # A bridge brought down by hand is drift; reconcile brings it up again.
        subprocess.run(["ip", "link", "set", br, "down"], check=True, timeout=10)
        fixed = await svc.reconcile(repair=True)
        assert (f"bridge/{br}", True) in [(d.resource, d.repaired) for d in fixed]
        assert (await asyncio.to_thread(svc.linux.state, br)).up

    try:
        asyncio.run(main())
    finally:
        for g in guests:
            g.destroy()
        subprocess.run(["ip", "link", "del", br], timeout=10, capture_output=True)
        asyncio.run(svc.close())
