"""The first-boot watch (compute/first_boot.py) on libvirt's test:///default driver: what it
does once the guest's report says done or failed (the drive leaves the persistent definition,
the mark in libvirt's metadata says so, the image is deleted, an event without secrets is
published), and what an agent restart finds in the seeds directory (a VM that is gone loses its
image; a stopped one keeps it, unpolled). The guest agent's file read is the one stand-in: the
test driver has no guest agent; tests/e2e/test_guest_agent.py reads the real one on Debian. The
test driver cannot detach devices either, so detach_seed is played by a redefinition without
the drive (the e2e test sees libvirt's real detach, live and persistent)."""

from __future__ import annotations

import asyncio
import uuid as uuidlib
from pathlib import Path
from types import SimpleNamespace

import libvirt
import pytest

from cna_agent.compute import first_boot as fb
from cna_agent.compute import seed_drive
from cna_agent.compute.customization_mark import CustomizationMark, read_mark
from cna_agent.compute.inventory import VmInventory
from cna_agent.compute.marks import write_metadata
from cna_agent.compute.spec import VmSpec
from cna_agent.compute.vmops import save_spec
from cna_agent.operations import OperationRunner
from cna_agent.state.eventlog import EventHub, EventLog
from cna_agent.state.journal import OperationJournal
from cna_agent.state.store import StateStore
from support.libvirt import ConnHypervisor


class _Pool:
    async def run(self, fn, *, timeout=None, what="", outlast=0.0):
        return fn()


@pytest.fixture
def world(tmp_path):
    libvirt.registerErrorHandler(lambda c, e: None, None)
    conn = libvirt.open("test:///default")
    name = f"fb-{uuidlib.uuid4().hex[:8]}"
    state = tmp_path / "state"
    (state / "seeds").mkdir(parents=True)
    dom = conn.defineXML(f"<domain type='test'><name>{name}</name><memory>131072</memory><os><type>hvm</type></os>"
                         f"<devices>{seed_drive.seed_disk(str(state / 'seeds' / 'x.img'), windows=False).to_xml()}</devices>"
                         f"</domain>")
    uuid = dom.UUIDString()
    save_spec(dom, VmSpec(name=name, uuid=uuid, guest_agent=True), False)
    write_metadata(dom, fb.CUSTOMIZATION_NS, fb.CUSTOMIZATION_KEY, CustomizationMark(fb.PENDING, "linux", 100.0).to_xml())
    seed = Path(seed_drive.seed_path(str(state), uuid))
    seed.write_bytes(b"fat image")
    store = StateStore(tmp_path / "agent.db")
    hub = EventHub(store, EventLog(store))
    runner = OperationRunner(store, OperationJournal(store), hub, encode=lambda kind, result: ("google.protobuf.Empty", b""))
    hv = ConnHypervisor(conn)
    inventory = VmInventory(hv, runner.locks)  # type: ignore[arg-type]
    watch = fb.FirstBoot(hv, inventory, hub, pool=_Pool(), state_dir=str(state), poll_interval_s=0.05)  # type: ignore[arg-type]
    yield SimpleNamespace(conn=conn, dom=dom, uuid=uuid, seed=seed, state=state, watch=watch, hub=hub, inventory=inventory)
    store.close()
    if dom.isActive():
        dom.destroy()
    dom.undefine()
    conn.close()


@pytest.fixture(autouse=True)
def _redefine_without_the_drive(monkeypatch):
    from xml.etree import ElementTree as ET

    def detach(dom: libvirt.virDomain) -> None:
        root = ET.fromstring(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
        devices = root.find("devices")
        for disk in devices.findall("disk"):
            if disk.findtext("serial") == seed_drive.SERIAL:
                devices.remove(disk)
        dom.connect().defineXML(ET.tostring(root, encoding="unicode"))

    monkeypatch.setattr(fb, "detach_seed", detach)


def _seed_in(dom: libvirt.virDomain, flags: int) -> bool:
    return seed_drive.SERIAL in dom.XMLDesc(flags)


def test_a_report_of_done_removes_the_drive_marks_the_vm_and_says_so(world, monkeypatch) -> None:
    reads: list[str] = []

    def read(dom, path):
        reads.append(path)
        return None if len(reads) < 3 else '{"v1": {"datasource": "DataSourceNoCloud", "errors": []}}'

    monkeypatch.setattr(fb, "read_guest_file", read)
    world.dom.create()

    async def go() -> None:
        world.watch.agent_changed(world.uuid, True)  # the guest agent connected: polled from now
        task = world.watch._polls[world.uuid]
        await asyncio.wait_for(task, 10)

    asyncio.run(go())
    assert reads == [fb.LINUX_REPORT] * 3  # polled until the report appeared
    assert not _seed_in(world.dom, libvirt.VIR_DOMAIN_XML_INACTIVE) and not world.seed.exists()
    mark = read_mark(world.dom)
    assert mark is not None and (mark.state, mark.since, mark.message) == (fb.DONE, 100.0, "cloud-init finished")
    assert mark.finished > mark.since
    events = asyncio.run(world.hub.list(types=["vm.customization."], resource_id=world.uuid))
    assert [e.type for e in events] == ["vm.customization.done"]


def test_a_report_with_errors_is_failed_and_the_drive_goes_too(world, monkeypatch) -> None:
    monkeypatch.setattr(fb, "read_guest_file", lambda dom, path: '{"v1": {"errors": ["cc_users: no such group"]}}')
    world.dom.create()

    async def go() -> None:
        world.watch._poll(world.uuid)
        await asyncio.wait_for(world.watch._polls[world.uuid], 10)

    asyncio.run(go())
    mark = read_mark(world.dom)
    assert mark.state == fb.FAILED and "no such group" in mark.message
    assert not world.seed.exists() and not _seed_in(world.dom, libvirt.VIR_DOMAIN_XML_INACTIVE)


def test_after_a_restart_images_of_gone_vms_are_removed_and_stopped_vms_wait(world, monkeypatch) -> None:
    monkeypatch.setattr(fb, "read_guest_file", lambda dom, path: pytest.fail("a stopped VM is not polled"))
    orphan = Path(seed_drive.seed_path(str(world.state), str(uuidlib.uuid4())))
    orphan.write_bytes(b"left by a create that died before its define")
    asyncio.run(world.watch.start())
    assert not orphan.exists()
    assert world.seed.exists() and not world.watch._polls  # stopped: its next boot's agent connection polls
    assert read_mark(world.dom).state == fb.PENDING


def test_an_undefined_vm_loses_its_image(world) -> None:
    world.watch.vm_state_changed(world.uuid, "deleted")
    assert not world.seed.exists()
