"""VmInventory.vm_nics on libvirt's test driver: a shut-off domain's NICs are parsed once per
cached definition (the network drift loop lists every NIC each minute), a running domain's
from its live XML every time, and a changed or deleted definition is seen at once."""

from __future__ import annotations

import asyncio

import libvirt

from cna_agent.compute import inventory as inv_mod
from cna_agent.compute.inventory import VmInventory
from cna_agent.operations import ResourceLocks
from support.libvirt import ConnHypervisor

NIC = "<interface type='bridge'><mac address='{mac}'/><source bridge='br-test'/></interface>"
XML = """<domain type='test'><name>{name}</name>{uuid}<memory>65536</memory><vcpu>1</vcpu>
<os><type arch='x86_64'>hvm</type></os><devices>{nics}</devices></domain>"""


def _define(conn, name: str, *macs: str, uuid: str = ""):
    return conn.defineXML(XML.format(name=name, uuid=f"<uuid>{uuid}</uuid>" if uuid else "",
                                     nics="".join(NIC.format(mac=m) for m in macs)))


def test_stopped_domains_nics_are_parsed_once_per_definition(tmp_path, monkeypatch):
    node = tmp_path / "node.xml"
    node.write_text("<node/>")
    libvirt.registerErrorHandler(lambda c, e: None, None)
    conn = libvirt.open(f"test://{node}")
    a = _define(conn, "nic-a", "52:54:00:00:00:0a")
    b = _define(conn, "nic-b", "52:54:00:00:00:0b")
    c = _define(conn, "nic-c", "52:54:00:00:00:0c")
    c.create()
    inventory = VmInventory(ConnHypervisor(conn), ResourceLocks())
    parsed: list[str] = []
    real = inv_mod.interfaces_of

    def counted(uuid, name, active, xml, *rest):
        parsed.append(name)
        return real(uuid, name, active, xml, *rest)

    monkeypatch.setattr(inv_mod, "interfaces_of", counted)

    def nics() -> dict[str, list[tuple[str, bool]]]:
        out: dict[str, list[tuple[str, bool]]] = {}
        for n in asyncio.run(inventory.vm_nics()):
            out.setdefault(n.vm_name, []).append((n.mac, n.active))
        return out

    first = nics()
    assert first == {"nic-a": [("52:54:00:00:00:0a", False)], "nic-b": [("52:54:00:00:00:0b", False)],
                     "nic-c": [("52:54:00:00:00:0c", True)]}
    assert sorted(parsed) == ["nic-a", "nic-b", "nic-c"]
    parsed.clear()
    assert nics() == first
    assert parsed == ["nic-c"]  # only the running domain's live XML is parsed again

    # a NIC added to a's definition: libvirt's DEFINED event makes the inventory forget it
    _define(conn, "nic-a", "52:54:00:00:00:0a", "52:54:00:00:00:1a", uuid=a.UUIDString())
    inventory.forget(a.UUIDString())
    parsed.clear()
    assert nics()["nic-a"] == [("52:54:00:00:00:0a", False), ("52:54:00:00:00:1a", False)]
    assert sorted(parsed) == ["nic-a", "nic-c"]

    # b deleted: gone from the listing and from what is kept; a started: its live XML is read
    b_uuid = b.UUIDString()
    b.undefine()
    inventory.vanished(b_uuid)
    a.create()
    parsed.clear()
    now = nics()
    assert set(now) == {"nic-a", "nic-c"} and all(active for _, active in now["nic-a"])
    assert sorted(parsed) == ["nic-a", "nic-c"]
    assert set(inventory._stopped_nics) == set()  # nothing shut off is left to keep
    conn.close()
