"""IoErrorResumer's decisions: which paused VMs it resumes, when it waits, how it backs off.

libvirt's side is a small in-memory connection (domains with a state, disk errors and XML) because
an I/O-error pause needs a failing array; the real thing is exercised end to end in
tests/integration/test_storage_iscsi_guest.py (an unmapped tgtd LUN pauses a guest, the agent
resumes it when the LUN is back).
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass, field
from types import SimpleNamespace

import libvirt
import pytest

from cna_agent.compute.io_resume import FLAP_WINDOW_S, IoErrorResumer, list_io_paused
from cna_agent.compute.spec import DiskSpec, LunSource, StorageErrorPolicy, VmSpec
from cna_agent.contracts import VmStatus
from cna_agent.errors import NotFound

PAUSED, IOERR = libvirt.VIR_DOMAIN_PAUSED, libvirt.VIR_DOMAIN_PAUSED_IOERROR


@dataclass
class FakeDom:
    uuid: str
    nm: str
    st: tuple[int, int]
    errors: dict[str, int]
    xml: str

    def UUIDString(self) -> str:
        return self.uuid

    def name(self) -> str:
        return self.nm

    def state(self) -> tuple[int, int]:
        return self.st

    def diskErrors(self, flags: int) -> dict[str, int]:
        return self.errors

    def XMLDesc(self, flags: int) -> str:
        return self.xml


@dataclass
class FakeConn:
    doms: list[FakeDom]

    def listAllDomains(self, flags: int) -> list[FakeDom]:
        return [d for d in self.doms if d.st[0] == PAUSED]

    def lookupByUUIDString(self, uuid: str) -> FakeDom:
        (dom,) = [d for d in self.doms if d.uuid == uuid]
        return dom


class FakeHv:
    connected = True

    def __init__(self, conn: FakeConn) -> None:
        self.conn = conn

    async def call(self, fn, timeout: float):
        return fn(self.conn)


@dataclass
class FakeResolver:
    missing_luns: set[str] = field(default_factory=set)
    calls: list[str] = field(default_factory=list)

    async def resolve_lun(self, datastore: str, lun_id: str, *, field: str, vm: str):
        self.calls.append(f"lun {datastore} {lun_id}")
        if lun_id in self.missing_luns:
            raise NotFound(f"{field}.lun_id: LUN {lun_id} not found", field=f"{field}.lun_id")

    async def resolve_volume(self, volume_id: str, *, field: str):
        self.calls.append(f"volume {volume_id}")


class FakeEvents:
    def __init__(self) -> None:
        self.published: list[tuple[str, dict]] = []

    async def publish(self, type: str, **kw) -> None:
        self.published.append((type, kw))


class FakeVms:
    def __init__(self, conn: FakeConn, specs: dict[str, VmSpec], resolver: FakeResolver) -> None:
        self.hv = FakeHv(conn)
        self.events = FakeEvents()
        self.specs = specs
        self.resolver = resolver
        self.resumed: list[str] = []
        self.conn = conn

    async def definition(self, uuid: str):
        spec = self.specs.get(uuid)
        return SimpleNamespace(managed=spec is not None, spec=spec)

    async def resume(self, uuid: str):
        self.resumed.append(uuid)
        for d in self.conn.doms:
            if d.uuid == uuid:
                d.st, d.errors = (libvirt.VIR_DOMAIN_RUNNING, 1), {}
        return SimpleNamespace(error=None)


def _xml(path: str) -> str:
    return ("<domain><devices>"
            "<disk type='network' device='disk'><source protocol='iscsi' name='iqn.x:t/1'/><target dev='vda'/></disk>"
            f"<disk type='file' device='disk'><source file='{path}'/><target dev='vdb'/></disk>"
            "</devices></domain>")


@pytest.fixture
def world(tmp_path):
    data = tmp_path / "data.qcow2"
    data.write_bytes(b"\0" * 8192)
    spec = VmSpec(name="vm1", uuid="u1", disks=[DiskSpec(target="vda", lun=LunSource("san", "iqn.x:t/1")),
                                                 DiskSpec(target="vdb", volume="ds/data.qcow2")])
    dom = FakeDom("u1", "vm1", (PAUSED, IOERR), {"vda": libvirt.VIR_DOMAIN_DISK_ERROR_UNSPEC}, _xml(str(data)))
    foreign = FakeDom("u2", "foreign", (PAUSED, IOERR), {"vda": 1}, _xml(str(data)))
    user_paused = FakeDom("u3", "vm3", (PAUSED, libvirt.VIR_DOMAIN_PAUSED_USER), {}, _xml(str(data)))
    conn = FakeConn([dom, foreign, user_paused])
    resolver = FakeResolver()
    vms = FakeVms(conn, {"u1": spec, "u3": VmSpec(name="vm3", uuid="u3")}, resolver)
    clock = [1000.0]
    resumer = IoErrorResumer(vms.hv, vms, resolver, vms.resume, vms.events, interval_s=5, clock=lambda: clock[0])  # type: ignore[arg-type]
    yield SimpleNamespace(vms=vms, dom=dom, resolver=resolver, resumer=resumer, clock=clock, data=data)
    resumer.executor.shutdown()


def test_only_io_error_pauses_are_listed_with_their_failed_disks(world):
    got = list_io_paused(world.vms.hv.conn)  # type: ignore[arg-type]
    assert [(p.uuid, p.errors) for p in got] == [("u1", {"vda": 1}), ("u2", {"vda": 1})]
    assert got[0].sources == {"vda": "", "vdb": str(world.data)}


def test_a_vm_stays_paused_while_its_failed_lun_is_missing_then_is_resumed_once(world):
    world.resolver.missing_luns.add("iqn.x:t/1")
    assert asyncio.run(world.resumer.check_once()) == []
    assert world.vms.resumed == [] and world.resumer.state_of("u1")["last_reason"].startswith("vda: ")
    # only the failed disk (vda) is probed, and the foreign VM is never touched
    assert world.resolver.calls == ["lun san iqn.x:t/1"]
    world.resolver.missing_luns.clear()
    assert asyncio.run(world.resumer.check_once()) == ["u1"]
    assert world.vms.resumed == ["u1"]
    (kind, kw), = world.vms.events.published
    assert kind == "vm.io_error_resumed" and kw["attributes"]["disks"] == "vda" and kw["resource_id"] == "u1"


def test_a_failed_file_disk_needs_its_file_back(world):
    world.dom.errors = {"vdb": libvirt.VIR_DOMAIN_DISK_ERROR_UNSPEC}
    os.rename(world.data, str(world.data) + ".away")
    assert asyncio.run(world.resumer.check_once()) == []
    assert "No such file" in world.resumer.state_of("u1")["last_reason"]
    os.rename(str(world.data) + ".away", world.data)
    assert asyncio.run(world.resumer.check_once()) == ["u1"]
    assert world.resolver.calls == ["volume ds/data.qcow2", "volume ds/data.qcow2"]


def test_a_vm_that_pauses_again_right_after_a_resume_is_backed_off(world):
    assert asyncio.run(world.resumer.check_once()) == ["u1"]
    world.dom.st, world.dom.errors = (PAUSED, IOERR), {"vda": 1}  # the array failed again at once
    world.clock[0] += 3
    assert asyncio.run(world.resumer.check_once()) == []
    first = world.resumer.state_of("u1")
    assert first["failures"] == 1 and first["not_before"] == world.clock[0] + 10
    world.clock[0] += 10
    assert asyncio.run(world.resumer.check_once()) == ["u1"]
    world.dom.st, world.dom.errors = (PAUSED, IOERR), {"vda": 1}
    world.clock[0] += 1
    assert asyncio.run(world.resumer.check_once()) == []
    assert world.resumer.state_of("u1")["failures"] == 2 and world.resumer.state_of("u1")["not_before"] == world.clock[0] + 20
    # once a VM has stayed up for the flap window, a later error starts afresh
    world.clock[0] += 20
    assert asyncio.run(world.resumer.check_once()) == ["u1"]
    world.clock[0] += FLAP_WINDOW_S + 1
    assert asyncio.run(world.resumer.check_once()) == []
    assert world.resumer.state_of("u1") == {}


def test_manual_policy_resumes_nothing(world):
    r = IoErrorResumer(world.vms.hv, world.vms, world.resolver, world.vms.resume, world.vms.events, interval_s=5, enabled=False)  # type: ignore[arg-type]

    async def go():
        assert await r.check_once() == []
        assert await r.check_vm(VmStatus("u1", "vm1", "paused", "ioerror")) == []

    asyncio.run(go())
    assert world.vms.resumed == [] and world.resolver.calls == []


def test_the_per_vm_check_resumes_only_the_vm_it_is_given(world):
    async def go():
        # Running VMs and other pause reasons are not looked at (no libvirt call, no probe).
        assert await world.resumer.check_vm(VmStatus("u3", "vm3", "paused", "user")) == []
        world.resolver.missing_luns.add("iqn.x:t/1")
        (stays,) = await world.resumer.check_vm(VmStatus("u1", "vm1", "paused", "ioerror"))
        assert not stays.repaired and "vda" in stays.problem
        world.resolver.missing_luns.clear()
        return await world.resumer.check_vm(VmStatus("u1", "vm1", "paused", "ioerror"))

    (found,) = asyncio.run(go())
    assert (found.check, found.vm_uuid, found.repaired, found.action) == ("io-resume", "u1", True, "resumed")
    assert world.vms.resumed == ["u1"]


def _with_policy(world, action: str, after: int = 0, *, host_auto: bool = True):
    world.vms.specs["u1"].storage_errors = StorageErrorPolicy(action, after)
    powered: list[str] = []

    async def power_off(uuid: str):
        powered.append(uuid)
        for d in world.vms.conn.doms:
            if d.uuid == uuid:
                d.st, d.errors = (libvirt.VIR_DOMAIN_SHUTOFF, 1), {}
        return SimpleNamespace(error=None, id="op-off")

    r = IoErrorResumer(world.vms.hv, world.vms, world.resolver, world.vms.resume, world.vms.events, interval_s=5,  # type: ignore[arg-type]
                       enabled=host_auto, clock=lambda: world.clock[0], power_off=power_off)
    return r, powered


def test_a_vm_whose_policy_is_pause_is_left_paused_on_an_auto_resume_host(world):
    r, powered = _with_policy(world, "pause")
    assert asyncio.run(r.check_once()) == [] and world.vms.resumed == [] and powered == []
    assert world.resolver.calls == []  # not even probed
    r.executor.shutdown()


def test_a_vm_whose_policy_is_resume_is_resumed_on_a_manual_host(world):
    r, _ = _with_policy(world, "resume", host_auto=False)
    assert asyncio.run(r.check_once()) == ["u1"]
    r.executor.shutdown()


def test_poweroff_resumes_if_storage_returns_in_time_else_powers_off_after_its_delay(world):
    # storage back within the delay: resumed like "resume"
    r, powered = _with_policy(world, "poweroff", 30)
    assert asyncio.run(r.check_once()) == ["u1"] and powered == []
    r.executor.shutdown()
    # paused again (flap window long past), storage stays away: powered off once 30 s have passed
    world.dom.st, world.dom.errors = (PAUSED, IOERR), {"vda": 1}
    world.clock[0] += FLAP_WINDOW_S + 1
    world.resolver.missing_luns.add("iqn.x:t/1")
    r, powered = _with_policy(world, "poweroff", 30)

    async def go():
        first = await r.check_vm(VmStatus("u1", "vm1", "paused", "ioerror"))
        world.clock[0] += 29
        still = await r.check_vm(VmStatus("u1", "vm1", "paused", "ioerror"))
        world.clock[0] += 1
        done = await r.check_vm(VmStatus("u1", "vm1", "paused", "ioerror"))
        return first, still, done

    first, still, done = asyncio.run(go())
    r.executor.shutdown()
    assert not first[0].repaired and not still[0].repaired and powered == ["u1"]
    assert (done[0].repaired, done[0].action) == (True, "powered off")
    kind, kw = world.vms.events.published[-1]
    assert kind == "vm.io_error_powered_off" and kw["severity"] == "error" and kw["attributes"]["paused_s"] == "30"
