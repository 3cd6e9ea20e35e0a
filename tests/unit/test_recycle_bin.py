"""The recycle bin (compute/recycle.py) on libvirt's test:///default driver (a real driver, in
memory): the mark is libvirt metadata in the domain's persistent definition (read back from
the domain XML, not from the agent), a VM in the bin is hidden from the listing but still holds
its disks, every operation but restore and delete refuses it, a restore clears the mark, and
the sweep deletes exactly the VMs whose hold is up, as their DeleteVm asked."""

from __future__ import annotations

import asyncio
import uuid
from types import SimpleNamespace

import libvirt
import pytest

from cna_agent.compute import recycle
from cna_agent.compute.inventory import VmInventory
from cna_agent.compute.spec import DiskSpec, VmSpec
from cna_agent.compute.vmops import VmOps, save_spec
from cna_agent.errors import FailedPrecondition, InvalidArgument
from cna_agent.operations import OperationRunner
from cna_agent.state.eventlog import EventHub, EventLog
from cna_agent.state.journal import OperationJournal
from cna_agent.state.store import StateStore
from support.libvirt import ConnHypervisor


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def world(tmp_path):
    libvirt.registerErrorHandler(lambda c, e: None, None)
    conn = libvirt.open("test:///default")  # one in-memory host per process: each test defines its own VM
    name = f"rb-{uuid.uuid4().hex[:8]}"
    dom = conn.defineXML(f"<domain type='test'><name>{name}</name><memory>131072</memory><os><type>hvm</type></os></domain>")
    save_spec(dom, VmSpec(name=name, uuid=dom.UUIDString(), disks=[DiskSpec(volume=f"ds/{name}/root.qcow2")]), False)
    store = StateStore(tmp_path / "agent.db")
    hub = EventHub(store, EventLog(store))
    runner = OperationRunner(store, OperationJournal(store), hub, encode=lambda kind, result: ("google.protobuf.Empty", b""))
    hv = ConnHypervisor(conn)
    inventory = VmInventory(hv, runner.locks)  # type: ignore[arg-type]
    ops = VmOps(hv, runner, hub, inventory)  # type: ignore[arg-type]
    purged: list[tuple[str, bool]] = []
    released: list[str] = []

    async def purge(uuid: str, delete_disks: bool):
        purged.append((uuid, delete_disks))
        return SimpleNamespace(id="op-purge", done=False, error=None)

    async def release(uuid: str) -> None:
        released.append(uuid)

    clock = Clock()
    bin_ = recycle.RecycleBin(ops, purge=purge, release=release, clock=clock)
    yield SimpleNamespace(name=name, conn=conn, dom=dom, inventory=inventory, bin=bin_, runner=runner, hub=hub, purged=purged,
                          released=released, clock=clock)
    store.close()
    dom.undefine()
    conn.close()


def _op(runner: OperationRunner):
    """An OperationContext of a real (journalled) operation, for recycle() to note into."""
    from cna_agent.operations import OperationContext

    async def begin():
        record, _created = await runner._store.run(lambda: runner._journal.begin("vm.delete", "x"))
        return OperationContext(record, runner)

    return begin()


def test_a_recycled_vm_is_marked_in_libvirt_hidden_refused_and_restorable(world) -> None:
    uuid = world.dom.UUIDString()

    async def run():
        op = await _op(world.runner)
        await world.bin.recycle(op, uuid, world.name, 3600, True)
        # the mark is in the persistent definition libvirt keeps (read from its XML)
        xml = world.dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
        assert recycle.RECYCLE_NS in xml and 'delete-disks="yes"' in xml
        assert world.released == [uuid]
        assert world.name not in [v.name for v in await world.inventory.list()]
        assert world.name in [v.name for v in await world.inventory.list(recycled=True)]
        users = await world.inventory.disk_users()
        assert f"ds/{world.name}/root.qcow2" in [u.volume for u in users]  # its disk is still held
        with pytest.raises(FailedPrecondition, match="recycle bin until") as err:
            await world.inventory.lookup_uuid(world.name)
        assert err.value.field == "vm"
        assert (await world.inventory.lookup_uuid(world.name, allow_recycled=True))[0] == uuid
        info = await world.inventory.get(uuid)
        assert info.recycle_expires == world.clock.now + 3600
        events = await world.hub.list(0, types=["vm.recycled"])
        assert events and events[-1].resource_id == uuid

        restored = await world.bin.restore(world.name)
        async for final in world.runner.watch(restored.id):
            pass
        assert final.state == "succeeded", final.error
        assert recycle.RECYCLE_NS not in world.dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
        assert world.name in [v.name for v in await world.inventory.list()]
        with pytest.raises(FailedPrecondition, match="not in the recycle bin"):
            await world.bin.restore(world.name)

    asyncio.run(run())


def test_the_sweep_deletes_only_what_has_expired_as_its_delete_asked(world) -> None:
    uuid = world.dom.UUIDString()

    async def run():
        await world.bin.recycle(await _op(world.runner), uuid, world.name, 60, False)
        assert await world.bin.sweep() == [] and world.purged == []
        world.clock.now += 61
        # a fresh inventory, as after an agent restart: the mark is read back from libvirt
        world.bin.ops.inventory.forget(uuid)
        assert await world.bin.sweep() == [uuid]
        assert world.purged == [(uuid, False)]

    asyncio.run(run())


def test_hold_bounds_and_mark_parsing() -> None:
    recycle.check_hold(0)
    recycle.check_hold(recycle.MAX_HOLD_S)
    for bad in (-1, recycle.MAX_HOLD_S + 1):
        with pytest.raises(InvalidArgument) as err:
            recycle.check_hold(bad)
        assert err.value.field == "hold_time_s"
    mark = recycle.RecycleMark(1.5, 2.5, True)
    assert recycle.RecycleMark.from_xml(mark.to_xml()) == mark
    assert recycle.RecycleMark.from_xml("<recycle/>") is None and recycle.RecycleMark.from_xml("<") is None


def test_cli_hold_durations() -> None:
    import argparse

    from cna_agent.cli.vm import hold_seconds

    assert [hold_seconds(t) for t in ("3600", "90m", "12h", "7d", "30s")] == [3600, 5400, 43200, 604800, 30]
    for bad in ("", "7w", "d", "1.5.d"):
        with pytest.raises(argparse.ArgumentTypeError):
            hold_seconds(bad)


def test_a_listing_that_raced_a_change_does_not_cache_what_it_read(world) -> None:
    """The read ran before the mark was written and returns after the change's forget(): what it
    found is from before the change and must not be cached (seen: a VM just moved to the bin
    listed again by a listing that raced the move)."""
    uuid = world.dom.UUIDString()
    inventory = world.inventory
    plain_call = inventory.hv.call

    async def racing_call(fn, **kw):
        out = await plain_call(fn, **kw)
        inventory.forget(uuid)  # the change lands while the read is in flight
        return out

    async def run():
        inventory.hv.call = racing_call
        try:
            await inventory.list()
            assert uuid not in inventory._cache
            await inventory.definition(uuid)
            assert uuid not in inventory._cache
        finally:
            inventory.hv.call = plain_call
        await inventory.list()
        assert uuid in inventory._cache  # no change raced this one: cached

    asyncio.run(run())
