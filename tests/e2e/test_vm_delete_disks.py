"""DeleteVm with delete_disks on a VM that took a live (external) snapshot: the overlay libvirt
made on its disk is deleted with it, judged from the datastore directory. Before, the overlay
made the disk a "template": the delete failed after the VM was already undefined, leaving both
files and a retry that answered NOT_FOUND (found by benchmarks.soak)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import grpc
import pytest

from cna_agent.api import pb
from support.guests import guest_spec
from support.operations import ok, wait

vm, S = pb.vm_pb2, pb.storage_pb2
pytestmark = [pytest.mark.slow]


def test_delete_disks_takes_the_snapshot_overlays(vm_agent_factory) -> None:
    ds = Path(tempfile.mkdtemp(prefix="cd", dir="/tmp"))
    agent = vm_agent_factory(extra_config=f'[storage.datastores.ds]\ntype = "dir"\npath = "{ds}"\n')
    with agent.channel() as ch:
        vms, storage = pb.vm_pb2_grpc.VmServiceStub(ch), pb.storage_pb2_grpc.StorageServiceStub(ch)
        vol = ok(ch, storage.CreateVolume(S.CreateVolumeRequest(datastore="ds", path="dd/root.qcow2", size_bytes=16 << 20,
                                                                format=pb.storage_pb2.VOLUME_FORMAT_QCOW2), timeout=60),
                 into=S.Volume())
        spec = guest_spec("x86_64", "deldisks", memory_mib=128, disks=[vm.DiskSpec(volume=vol.id)])
        uuid = ok(ch, vms.CreateVm(vm.CreateVmRequest(spec=spec, start=True), timeout=60), into=vm.Vm()).uuid
        snap = ok(ch, vms.CreateSnapshot(vm.CreateSnapshotRequest(vm=uuid, name="s1"), timeout=60), into=vm.Snapshot())
        assert snap.kind == "external"
        assert sorted(p.name for p in (ds / "dd").iterdir()) == ["root.qcow2", "root.s1.qcow2"]
        ok(ch, vms.DeleteVm(vm.DeleteVmRequest(vm=uuid, force=True, delete_disks=True), timeout=60))
        assert sorted(p.name for p in (ds / "dd").iterdir()) == []
        assert not storage.ListVolumes(S.ListVolumesRequest(datastore="ds"), timeout=30).volumes


def _refused(ch, vms, uuid: str) -> str:
    """DeleteVm with delete_disks, which must end FAILED_PRECONDITION: its message."""
    done = wait(ch, vms.DeleteVm(vm.DeleteVmRequest(vm=uuid, delete_disks=True), timeout=60))
    assert done.error.code == grpc.StatusCode.FAILED_PRECONDITION.value[0], done
    return done.error.message


def test_delete_disks_refused_by_a_linked_clone_or_another_vm_changes_nothing(vm_agent_factory) -> None:
    """A disk DeleteVm may not delete (a linked clone of another name stands on it; another VM
    has it too) is refused before anything changes: FAILED_PRECONDITION naming the disk, the VM
    still defined in libvirt (its definition file) and every file in place; without
    delete_disks the same delete goes through and leaves the disks."""
    ds = Path(tempfile.mkdtemp(prefix="cd", dir="/tmp"))
    agent = vm_agent_factory(extra_config=f'[storage.datastores.ds]\ntype = "dir"\npath = "{ds}"\n')
    etc = agent.dir / "state" / "libvirt" / "etc" / "qemu"
    with agent.channel() as ch:
        vms, storage = pb.vm_pb2_grpc.VmServiceStub(ch), pb.storage_pb2_grpc.StorageServiceStub(ch)

        def volume(path: str) -> str:
            return ok(ch, storage.CreateVolume(S.CreateVolumeRequest(datastore="ds", path=path, size_bytes=16 << 20,
                                                                     format=pb.storage_pb2.VOLUME_FORMAT_QCOW2), timeout=60),
                      into=S.Volume()).id

        root, data = volume("dk/root.qcow2"), volume("dk/data.qcow2")
        ok(ch, storage.CloneVolume(S.CloneVolumeRequest(source=root, datastore="ds", path="other/clone.qcow2", linked=True),
                                   timeout=60))
        spec = guest_spec("x86_64", "delkept", memory_mib=128, disks=[vm.DiskSpec(volume=root), vm.DiskSpec(volume=data)])
        uuid = ok(ch, vms.CreateVm(vm.CreateVmRequest(spec=spec), timeout=60), into=vm.Vm()).uuid
        files = sorted(str(p.relative_to(ds)) for p in ds.rglob("*.qcow2"))
        refused = _refused(ch, vms, uuid)
        assert "spec.disks[0].volume" in refused and "linked clone" in refused and "other/clone.qcow2" in refused
        assert (etc / "delkept.xml").exists()
        assert sorted(str(p.relative_to(ds)) for p in ds.rglob("*.qcow2")) == files

        # the data disk in another VM too: refused naming that VM
        other = guest_spec("x86_64", "delother", memory_mib=128, disks=[vm.DiskSpec(volume=data)])
        other_uuid = ok(ch, vms.CreateVm(vm.CreateVmRequest(spec=other), timeout=60), into=vm.Vm()).uuid
        ok(ch, storage.DeleteVolume(S.DeleteVolumeRequest(id="ds/other/clone.qcow2"), timeout=60))
        refused = _refused(ch, vms, uuid)
        assert "spec.disks[1].volume" in refused and "delother" in refused
        assert (etc / "delkept.xml").exists() and (ds / "dk" / "root.qcow2").exists()

        ok(ch, vms.DeleteVm(vm.DeleteVmRequest(vm=other_uuid), timeout=60))
        ok(ch, vms.DeleteVm(vm.DeleteVmRequest(vm=uuid, delete_disks=True), timeout=60))
        assert not (etc / "delkept.xml").exists()
        assert sorted(str(p.relative_to(ds)) for p in ds.rglob("*.qcow2")) == []
