"""The host's MACs as a new NIC's MAC is chosen: every domain's (live and persistent, managed or
not), read once per domain and again only when its definition changed or the entry aged out;
a NIC with a given MAC does not make the host's MACs be read at all.

On libvirt's test driver, with a counting wrapper around the connection, so "read once" is seen
as the number of XMLDesc calls, not assumed."""

from __future__ import annotations

import asyncio
import uuid as uuidlib

import libvirt
import pytest

from cna_agent.compute import inventory as inv
from cna_agent.compute.binder import Binder
from cna_agent.compute.inventory import VmInventory
from cna_agent.compute.spec import NicSpec
from cna_agent.operations import ResourceLocks
from support.libvirt import ConnHypervisor


class Counting:
    """The connection, with each domain's XMLDesc calls counted."""

    def __init__(self, conn: libvirt.virConnect) -> None:
        self.conn, self.xml_reads = conn, 0

    def listAllDomains(self, flags: int = 0):  # noqa: N802 (libvirt's name)
        outer = self

        class Dom:
            def __init__(self, d):
                self._d = d

            def __getattr__(self, name):
                return getattr(self._d, name)

            def XMLDesc(self, flags=0):  # noqa: N802
                outer.xml_reads += 1
                return self._d.XMLDesc(flags)

        return [Dom(d) for d in self.conn.listAllDomains(flags)]


def _define(conn: libvirt.virConnect, mac: str) -> str:
    uuid = str(uuidlib.uuid4())
    conn.defineXML(f"<domain type='test'><name>m-{uuid[:8]}</name><uuid>{uuid}</uuid><memory>131072</memory>"
                   f"<os><type>hvm</type></os><devices><interface type='network'><mac address='{mac}'/>"
                   "<source network='default'/></interface></devices></domain>")
    return uuid


@pytest.fixture
def host():
    conn = libvirt.open("test:///default")
    made = [_define(conn, "52:54:00:aa:00:01"), _define(conn, "52:54:00:AA:00:02")]
    counting = Counting(conn)
    yield conn, counting, VmInventory(ConnHypervisor(counting), ResourceLocks()), made
    for uuid in made:
        try:
            conn.lookupByUUIDString(uuid).undefine()
        except libvirt.libvirtError:
            pass
    conn.close()


def test_each_domains_macs_are_read_once_until_its_definition_changes(host) -> None:
    conn, counting, inventory, made = host
    first = asyncio.run(inventory.all_macs())
    assert {"52:54:00:aa:00:01", "52:54:00:aa:00:02"} <= first
    reads = counting.xml_reads
    assert reads >= 2
    assert asyncio.run(inventory.all_macs()) == first and counting.xml_reads == reads  # nothing read again

    made.append(_define(conn, "52:54:00:aa:00:03"))  # a new domain is read at once
    assert "52:54:00:aa:00:03" in asyncio.run(inventory.all_macs()) and counting.xml_reads == reads + 1

    dom = conn.lookupByUUIDString(made[0])  # its NIC changes: the definition event makes it forgotten
    conn.defineXML(dom.XMLDesc(0).replace("52:54:00:aa:00:01", "52:54:00:aa:00:09"))
    inventory.forget(made[0])
    macs = asyncio.run(inventory.all_macs())
    assert "52:54:00:aa:00:09" in macs and "52:54:00:aa:00:01" not in macs

    conn.lookupByUUIDString(made[1]).undefine()  # a domain that went takes its MACs with it
    assert "52:54:00:aa:00:02" not in asyncio.run(inventory.all_macs())


def test_an_entry_older_than_the_ttl_is_read_again(host, monkeypatch) -> None:
    _conn, counting, inventory, _made = host
    asyncio.run(inventory.all_macs())
    reads = counting.xml_reads
    monkeypatch.setattr(inv, "MAC_TTL_S", 0.0)
    asyncio.run(inventory.all_macs())
    assert counting.xml_reads > reads


def test_given_macs_do_not_read_the_hosts_and_a_generated_one_is_free(host) -> None:
    _conn, counting, inventory, _made = host
    binder = Binder(inventory, None, None, None, None)  # type: ignore[arg-type]
    given = [NicSpec(port_group="p", mac="52:54:00:AB:CD:EF")]
    asyncio.run(binder.fill_macs(given))
    assert given[0].mac == "52:54:00:ab:cd:ef" and counting.xml_reads == 0
    new = [NicSpec(port_group="p")]
    asyncio.run(binder.fill_macs(new))
    assert new[0].mac.startswith("52:54:00:") and new[0].mac not in {"52:54:00:aa:00:01", "52:54:00:aa:00:02"}
    assert counting.xml_reads >= 2
