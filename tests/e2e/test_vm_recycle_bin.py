"""The recycle bin end to end: DeleteVm with a hold keeps the VM restorable, then deletes it.

Judged from outside the agent: the embedded libvirt's definition file (still there, carrying
the recycle mark; gone after expiry), the VM's QEMU process in /proc (powered off), its disk
file in the datastore (kept; deleted with the VM at expiry when the delete asked for it), the
placement row in the agent's SQLite file (released while in the bin), and the guest booting
again after the restore. Through the API: hidden from ListVms, listed in the bin with its
expiry, refused by StartVm and by a DeleteVolume of its disk, kept across an agent restart.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import grpc
import pytest

from cna_agent.api import pb
from support.guests import guest_spec, serial_log
from support.migration import claims, qemu_pids, restart
from support.operations import ok, wait

vm, S = pb.vm_pb2, pb.storage_pb2
pytestmark = [pytest.mark.slow, pytest.mark.skipif(os.geteuid() != 0, reason="the embedded QEMU driver here needs root")]
RECYCLE_NS = "https://cna-agent.org/xmlns/recycle/1.0"


def _refused(ch, call) -> str:
    """The refusal's message, whether it came as the RPC's error or as its operation's."""
    try:
        done = wait(ch, call(), 60)
    except grpc.RpcError as exc:
        assert exc.code() == grpc.StatusCode.FAILED_PRECONDITION, exc
        return exc.details()
    assert done.error.code == grpc.StatusCode.FAILED_PRECONDITION.value[0], done
    return done.error.message


def test_a_vm_deleted_with_a_hold_is_hidden_restorable_and_deleted_when_the_hold_is_up(vm_agent_factory) -> None:
    ds = Path(tempfile.mkdtemp(prefix="rb", dir="/tmp"))
    agent = vm_agent_factory(extra_config=f'recycle_sweep_interval_s = 1.0\n[storage.datastores.ds]\ntype = "dir"\npath = "{ds}"\n')
    definition = agent.dir / "state" / "libvirt" / "etc" / "qemu" / "rbin.xml"
    current = agent
    try:
        with current.channel() as ch:
            vms, storage = pb.vm_pb2_grpc.VmServiceStub(ch), pb.storage_pb2_grpc.StorageServiceStub(ch)
            vol = ok(ch, storage.CreateVolume(S.CreateVolumeRequest(datastore="ds", path="rbin/root.qcow2", size_bytes=16 << 20,
                                                                    format=pb.storage_pb2.VOLUME_FORMAT_QCOW2), timeout=60),
                     into=S.Volume())
            spec = guest_spec("x86_64", "rbin", memory_mib=128, dedicated_cpus=True, disks=[vm.DiskSpec(volume=vol.id)])
            uuid = ok(ch, vms.CreateVm(vm.CreateVmRequest(spec=spec, start=True), timeout=60), into=vm.Vm()).uuid
            serial_log(current, uuid).wait_for(r"CNA-GUEST-READY", timeout=120)
            held = claims(current, uuid)["placements"]
            assert held == 1  # a dedicated CPU is claimed while it exists

            # a hold beyond 90 days is refused naming the field, nothing changes
            with pytest.raises(grpc.RpcError) as err:
                vms.DeleteVm(vm.DeleteVmRequest(vm=uuid, force=True, hold_time_s=91 * 86400), timeout=30)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "hold_time_s" in err.value.details()
            assert qemu_pids(uuid)

            t0 = time.time()
            ok(ch, vms.DeleteVm(vm.DeleteVmRequest(vm=uuid, force=True, delete_disks=True, hold_time_s=3600), timeout=60))
            assert qemu_pids(uuid) == []  # powered off
            assert definition.exists() and RECYCLE_NS in definition.read_text()
            assert (ds / "rbin" / "root.qcow2").exists()
            assert claims(current, uuid)["placements"] == 0  # its CPU is free for others
            assert uuid not in [v.uuid for v in vms.ListVms(vm.ListVmsRequest(), timeout=30).vms]
            binned = vms.ListVms(vm.ListVmsRequest(recycled=True), timeout=30).vms
            assert [v.uuid for v in binned] == [uuid]
            assert abs(binned[0].status.recycle_expire_time.seconds - (t0 + 3600)) < 60
            assert "recycle bin" in _refused(ch, lambda: vms.StartVm(vm.VmActionRequest(vm=uuid), timeout=30))
            assert uuid in _refused(ch, lambda: storage.DeleteVolume(S.DeleteVolumeRequest(id="ds/rbin/root.qcow2"),
                                                                         timeout=30))
            assert (ds / "rbin" / "root.qcow2").exists()  # still the binned VM's disk
            again = wait(ch, vms.CreateVm(vm.CreateVmRequest(spec=guest_spec("x86_64", "rbin", memory_mib=128)), timeout=30))
            assert again.error.code == grpc.StatusCode.ALREADY_EXISTS.value[0] and "recycle bin" in again.error.message, again

        # an agent restart keeps it in the bin (the mark is in libvirt's definition)
        current = restart(current)
        with current.channel() as ch:
            vms = pb.vm_pb2_grpc.VmServiceStub(ch)
            assert [v.uuid for v in vms.ListVms(vm.ListVmsRequest(recycled=True), timeout=30).vms] == [uuid]
            restored = ok(ch, vms.RestoreVm(vm.VmActionRequest(vm="rbin"), timeout=60), into=vm.Vm())
            assert restored.status.state == vm.VM_STATE_STOPPED and not restored.status.HasField("recycle_expire_time")
            assert claims(current, uuid)["placements"] == 1  # its dedicated CPU is planned (and held) again
            assert RECYCLE_NS not in definition.read_text()
            assert "rbin" in [v.name for v in vms.ListVms(vm.ListVmsRequest(), timeout=30).vms]
            log = serial_log(current, uuid)
            boots = log.text().count("CNA-GUEST-READY")
            ok(ch, vms.StartVm(vm.VmActionRequest(vm=uuid), timeout=60))
            log.wait_for(r"CNA-GUEST-READY", timeout=120, count=boots + 1)

            # into the bin for 2 s: the sweep deletes it, disk included, as the delete asked
            ok(ch, vms.DeleteVm(vm.DeleteVmRequest(vm=uuid, force=True, delete_disks=True, hold_time_s=2), timeout=60))
            deadline = time.monotonic() + 30
            while definition.exists() and time.monotonic() < deadline:
                time.sleep(0.3)
            assert not definition.exists()
            assert not (ds / "rbin" / "root.qcow2").exists()
            assert not vms.ListVms(vm.ListVmsRequest(recycled=True), timeout=30).vms
            events = pb.events_pb2_grpc.EventServiceStub(ch).ListEvents(
                pb.events_pb2.ListEventsRequest(types=["vm.recycled", "vm.restored", "vm.deleted"], limit=100), timeout=30)
            kinds = [e.type for e in events.events if e.resource_id == uuid]
            assert kinds == ["vm.recycled", "vm.restored", "vm.recycled", "vm.deleted"], kinds
    finally:
        if current is not agent:
            current.stop()
