"""The one per-VM reconcile (compute/reconcile.py): which VMs each check sees, when it runs
(start-up, a VM's events, each check's own interval), and that a failing check stops no other.

The VMs are real libvirt domains on libvirt's test driver (test:///default, an in-memory host)
read by the real VmInventory; the checks are recording stand-ins, because what they compare
(OVS ports, thread pinning, paused guests) is tested with their owners.
"""

from __future__ import annotations

import asyncio
import uuid as uuidlib
from xml.etree import ElementTree as ET

import libvirt
import pytest

from cna_agent.compute import domxml as dx
from cna_agent.compute.inventory import VmInventory
from cna_agent.compute.reconcile import VmReconciler
from cna_agent.compute.spec import VmSpec
from cna_agent.contracts import Finding, VmStatus
from cna_agent.operations import ResourceLocks
from support.libvirt import ConnHypervisor


class Recording:
    def __init__(self, name: str, interval_s: float = 0.0, fail: bool = False) -> None:
        self.name, self.interval_s, self.fail = name, interval_s, fail
        self.seen: list[VmStatus] = []

    async def check_vm(self, vm: VmStatus) -> list[Finding]:
        self.seen.append(vm)
        if self.fail:
            raise RuntimeError("the array is on fire")
        return [Finding(self.name, vm.uuid, "drifted")]


def _define(conn: libvirt.virConnect, name: str, *, managed: bool) -> str:
    uuid = str(uuidlib.uuid4())
    meta = ""
    if managed:
        body = dx.metadata_element(VmSpec(name=name, uuid=uuid).to_json(), agent_version="test")
        meta = "<metadata>" + ET.tostring(body, encoding="unicode") + "</metadata>"
    conn.defineXML(f"<domain type='test'><name>{name}</name><uuid>{uuid}</uuid><memory>131072</memory>{meta}"
                   "<os><type>hvm</type></os></domain>")
    return uuid


@pytest.fixture
def host():
    conn = libvirt.open("test:///default")
    ours = _define(conn, f"ours-{uuidlib.uuid4().hex[:6]}", managed=True)
    foreign = _define(conn, f"foreign-{uuidlib.uuid4().hex[:6]}", managed=False)
    conn.lookupByUUIDString(ours).create()
    yield conn, ours, foreign
    for uuid in (ours, foreign):
        dom = conn.lookupByUUIDString(uuid)
        if dom.isActive():
            dom.destroy()
        dom.undefine()
    conn.close()


def test_a_vm_is_checked_by_every_check_with_its_state_and_foreign_vms_never(host):
    conn, ours, foreign = host
    ports, pins = Recording("ports"), Recording("placement")
    rec = VmReconciler(VmInventory(ConnHypervisor(conn), ResourceLocks()), [ports, pins])  # type: ignore[arg-type]
    found = asyncio.run(rec.reconcile(ours))
    assert [(f.check, f.vm_uuid) for f in found] == [("ports", ours), ("placement", ours)]
    (seen,) = ports.seen
    assert (seen.uuid, seen.state) == (ours, "running") and seen.name.startswith("ours-")
    assert asyncio.run(rec.reconcile(foreign)) == [] and len(ports.seen) == 1
    assert asyncio.run(rec.reconcile(str(uuidlib.uuid4()))) == []  # gone meanwhile: nothing to do


def test_a_failing_check_does_not_stop_the_others(host):
    conn, ours, _ = host
    broken, fine = Recording("broken", fail=True), Recording("fine")
    rec = VmReconciler(VmInventory(ConnHypervisor(conn), ResourceLocks()), [broken, fine])  # type: ignore[arg-type]
    found = asyncio.run(rec.reconcile(ours))
    assert [f.check for f in found] == ["fine"] and len(broken.seen) == 1


def test_start_up_events_and_each_checks_own_interval(host):
    conn, ours, foreign = host
    fast, slow, events_only = Recording("fast", 0.2), Recording("slow", 5.0), Recording("events-only", 0.0)
    inventory = VmInventory(ConnHypervisor(conn), ResourceLocks())
    rec = VmReconciler(inventory, [fast, slow, events_only])  # type: ignore[arg-type]

    async def go():
        await rec.start()
        await asyncio.sleep(0.1)
        after_start = {c.name: len(c.seen) for c in (fast, slow, events_only)}
        await asyncio.sleep(0.65)
        timed = {c.name: len(c.seen) for c in (fast, slow, events_only)}
        rec.enqueue(ours)
        rec.enqueue(ours)  # twice before it ran: once
        rec.enqueue(foreign)
        await asyncio.sleep(0.1)
        evented = {c.name: len(c.seen) for c in (fast, slow, events_only)}
        await rec.stop()
        return after_start, timed, evented

    after_start, timed, evented = asyncio.run(go())
    managed = sum(1 for v in asyncio.run(inventory.list()) if v.managed)
    # start-up: every check over every managed VM (the test driver's own "test" domain is not ours)
    assert after_start == {"fast": managed, "slow": managed, "events-only": managed}
    # the timer: only the fast check ran again, a few times
    assert timed["fast"] >= managed * 3 and timed["slow"] == managed and timed["events-only"] == managed
    # an event: every check for that VM, once; the foreign VM's event is ignored
    assert evented["slow"] == managed + 1 and evented["events-only"] == managed + 1
    assert {v.uuid for v in events_only.seen} == {ours}
