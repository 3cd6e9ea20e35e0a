"""Recovery of cut-short disk QoS, NIC, snapshot and update operations (recovery_devices.py),
decided on libvirt's test:///default driver (a real libvirt driver with an in-memory host): the
effect libvirt shows ends the operation with its result and the spec completed to match; an
effect it does not show ends ABORTED naming what it shows; nothing is redone."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import libvirt

from cna_agent.compute.inventory import VmInfo, VmInventory
from cna_agent.compute.recovery_devices import DeviceRecovery
from cna_agent.compute.spec import DiskSpec, IoQos, NicSpec, VmSpec
from cna_agent.contracts import VmNic
from cna_agent.errors import CODES
from cna_agent.operations import ResourceLocks
from cna_agent.state.journal import OperationError
from support.libvirt import ConnHypervisor

MAC = "aa:bb:cc:dd:ee:ff"  # the test driver's domain's NIC


def _setup():
    conn = libvirt.open("test:///default")
    dom = conn.lookupByName("test")
    hv = ConnHypervisor(conn)
    inventory = VmInventory(hv, ResourceLocks())  # type: ignore[arg-type]
    return conn, dom, inventory, DeviceRecovery(hv, inventory)  # type: ignore[arg-type]


def _spec(**kw) -> VmSpec:
    return VmSpec(name="test", disks=[DiskSpec(target="vda", volume="/guest/diskimage1", qos=kw.pop("qos", IoQos()))],
                  nics=[NicSpec(port_group="pg", mac=MAC, link_down=kw.pop("link_down", False))], **kw)


def _aborted(outcome, *words: str) -> None:
    assert isinstance(outcome, OperationError) and outcome.code == CODES["ABORTED"], outcome
    for w in words:
        assert w in outcome.message, outcome.message


def test_disk_qos_is_completed_only_when_libvirt_has_every_limit() -> None:
    _conn, dom, inventory, rec = _setup()
    after = _spec(qos=IoQos(total_iops_sec=250))
    record = SimpleNamespace(target=dom.UUIDString(), metadata={"disk_target": "vda", "spec_after": after.to_json()})

    async def run() -> None:
        _aborted(await rec.recover_disk_qos(record), "vda", "does not have them", "nothing was redone")
        dom.setBlockIoTune("vda", {"total_iops_sec": 250, "total_iops_sec_max": 500}, libvirt.VIR_DOMAIN_AFFECT_LIVE)
        # live only: the persistent definition still lacks the limit, and that is said
        _aborted(await rec.recover_disk_qos(record), "persistent definition")
        dom.setBlockIoTune("vda", {"total_iops_sec": 250, "total_iops_sec_max": 500}, libvirt.VIR_DOMAIN_AFFECT_CONFIG)
        done = await rec.recover_disk_qos(record)
        assert isinstance(done, VmInfo)
        # the spec libvirt keeps now records the limit (it was written by recovery)
        stored = VmInventory.read_definition(dom).spec
        assert stored is not None and stored.disks[0].qos.total_iops_sec == 250

    asyncio.run(run())


def test_nic_link_and_attach_follow_the_interface_libvirt_has() -> None:
    _conn, dom, _inventory, rec = _setup()
    down = _spec(link_down=True)
    link = SimpleNamespace(target=dom.UUIDString(), metadata={"nic_mac": MAC, "link": "down", "spec_after": down.to_json()})
    attach = SimpleNamespace(target=dom.UUIDString(), metadata={"nic_mac": MAC, "spec_after": _spec().to_json()})
    missing = SimpleNamespace(target=dom.UUIDString(), metadata={"nic_mac": "52:54:00:00:00:99", "spec_after": _spec().to_json()})

    async def run() -> None:
        _aborted(await rec.recover_nic_link(link), "link of NIC", "shows it up")
        nic = await rec.recover_nic_attach(attach)  # libvirt has the MAC: attached, the spec follows
        assert isinstance(nic, VmNic) and nic.mac == MAC
        _aborted(await rec.recover_nic_attach(missing), "libvirt shows no such NIC", "nothing was redone")
        assert await rec.recover_nic_detach(missing) is None  # not in libvirt any more: detached
        _aborted(await rec.recover_nic_detach(attach), "still has it")

    asyncio.run(run())


def test_snapshots_are_judged_by_libvirts_list_and_current_snapshot() -> None:
    _conn, dom, _inventory, rec = _setup()
    uuid = dom.UUIDString()
    create = SimpleNamespace(target=uuid, metadata={"snapshot": "s1"})

    async def run() -> None:
        _aborted(await rec.recover_snapshot_create(create), "no such snapshot")
        dom.snapshotCreateXML("<domainsnapshot><name>s1</name></domainsnapshot>", 0)
        taken = await rec.recover_snapshot_create(create)
        assert taken.name == "s1"
        dom.snapshotCreateXML("<domainsnapshot><name>s2</name></domainsnapshot>", 0)  # current: s2
        revert = SimpleNamespace(target=uuid, metadata={"snapshot": "s1", "current_before": "s2"})
        _aborted(await rec.recover_snapshot_revert(revert), "current snapshot is s2")
        dom.revertToSnapshot(dom.snapshotLookupByName("s1"), 0)
        assert isinstance(await rec.recover_snapshot_revert(revert), VmInfo)
        delete = SimpleNamespace(target=uuid, metadata={"snapshot": "s2"})
        _aborted(await rec.recover_snapshot_delete(delete), "still has it")
        dom.snapshotLookupByName("s2").delete(0)
        assert await rec.recover_snapshot_delete(delete) is None

    asyncio.run(run())


def test_a_quiesced_snapshot_cut_short_thaws_the_guests_filesystems() -> None:
    """The test driver keeps a frozen count per domain: fsThaw reports how many it thawed."""
    _conn, dom, _inventory, rec = _setup()
    create = SimpleNamespace(target=dom.UUIDString(), metadata={"snapshot": "q1", "quiesce": "true"})
    assert dom.fsFreeze() > 0  # what libvirt did before the agent died

    async def run() -> None:
        _aborted(await rec.recover_snapshot_create(create), "no such snapshot")

    asyncio.run(run())
    assert dom.fsThaw() == 0  # recovery thawed them already
    plain = SimpleNamespace(target=dom.UUIDString(), metadata={"snapshot": "q1"})
    dom.fsFreeze()
    asyncio.run(rec.recover_snapshot_create(plain))
    assert dom.fsThaw() > 0  # not quiesced: nothing of the guest's was touched


def test_an_update_is_done_when_libvirts_spec_has_the_fields() -> None:
    _conn, dom, _inventory, rec = _setup()
    before, after = _spec(memory_mib=512), _spec(memory_mib=768)
    record = SimpleNamespace(target=dom.UUIDString(), metadata={"spec_after": after.to_json(), "mask": "memory_mib"})
    from cna_agent.compute.vmops import save_spec

    async def run() -> None:
        save_spec(dom, before, True)
        _aborted(await rec.recover_update(record), "memory_mib", "previous one", "vCPUs")
        save_spec(dom, after, True)
        assert isinstance(await rec.recover_update(record), VmInfo)

    asyncio.run(run())


def test_an_update_with_changes_for_the_next_start_gets_its_pending_mark_when_the_crash_came_before_it() -> None:
    from cna_agent.compute.pending_changes import read_mark
    from cna_agent.compute.vmops import save_spec

    _conn, dom, _inventory, rec = _setup()
    after = _spec(max_vcpus=4)
    record = SimpleNamespace(target=dom.UUIDString(), metadata={
        "spec_after": after.to_json(), "mask": "max_vcpus", "pending": "max_vcpus", "waiting": "max_vcpus",
        "qemu": "4242:777"})

    async def run() -> None:
        save_spec(dom, after, True)  # the definition for the next start was written, the mark not
        assert isinstance(await rec.recover_update(record), VmInfo)
        mark = read_mark(dom)
        assert mark is not None and mark.fields == ("max_vcpus",) and mark.qemu == "4242:777"

    asyncio.run(run())
