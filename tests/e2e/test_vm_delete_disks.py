"""DeleteVm with delete_disks on a VM that took a live (external) snapshot: the overlay libvirt
made on its disk is deleted with it, judged from the datastore directory. Before, the overlay
made the disk a "template": the delete failed after the VM was already undefined, leaving both
files and a retry that answered NOT_FOUND (found by benchmarks.soak)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

from cna_agent.api import pb
from support.guests import guest_spec
from support.operations import ok

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
