"""Disks on a running VM through StorageService: hot-plug, live grow, I/O QoS, unplug.

The real daemon, the real x86_64 test guest under TCG; the guest's own view comes from its
serial log (it prints CNA-HOTPLUG lines when block devices appear or go).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import grpc
import pytest

from cna_agent.api import pb
from support.agent import start_agent
from support.console import SerialLog
from support.guests import build_guest
from support.operations import ok, wait

vm, st, ops_pb = pb.vm_pb2, pb.storage_pb2, pb.operations_pb2
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the embedded QEMU driver here needs root")


def _disks(ch, uuid: str) -> list[str]:
    got = pb.vm_pb2_grpc.VmServiceStub(ch).GetVm(vm.GetVmRequest(vm=uuid), timeout=30)
    return [d.target for d in got.spec.disks]


@pytest.fixture
def disk_agent(libvirt_caps_cache, system_mode):
    libvirt_mode = system_mode  # embedded hot-plug: test_vm_disk_faults, the migration tests
    """Once on the embedded driver, once on the host's libvirtd (QEMU unprivileged)."""
    # Short path: QEMU's socket paths under the embedded root must stay below 108 bytes.
    base = Path(tempfile.mkdtemp(prefix="cd", dir="/tmp"))
    images = base / "img"
    images.mkdir()
    guest_dir = str(Path(build_guest("x86_64")["kernel"]).parent)
    agent = start_agent(base / "a", libvirt_caps_cache, extra_config=f'[compute]\nimage_dirs = "{guest_dir},{images}"\n',
                        mode=libvirt_mode)
    yield agent, images
    agent.stop()
    shutil.rmtree(base, ignore_errors=True)


@pytest.mark.slow
def test_hotplug_grow_qos_and_unplug_a_disk_on_a_running_guest(disk_agent):
    agent, images = disk_agent
    g = build_guest("x86_64")
    data = images / "data.qcow2"
    subprocess.run(["qemu-img", "create", "-f", "qcow2", str(data), "64M"], check=True, capture_output=True, timeout=60)
    outside = Path(tempfile.mkdtemp(prefix="co", dir="/tmp")) / "x.qcow2"
    with agent.channel() as ch:
        vms = pb.vm_pb2_grpc.VmServiceStub(ch)
        storage = pb.storage_pb2_grpc.StorageServiceStub(ch)
        spec = vm.VmSpec(name="disky", vcpus=1, memory_mib=192, serial_console=True, arch=pb.common_pb2.ARCH_X86_64,
                         boot=vm.BootSpec(kernel=g["kernel"], initrd=g["initrd"], cmdline=f"console={g['console']} panic=-1"))
        op = ok(ch, vms.CreateVm(vm.CreateVmRequest(spec=spec, start=True, request_id="create-disky"), timeout=60), poll=True)
        created = vm.Vm()
        op.response.Unpack(created)
        uuid = created.uuid
        log = SerialLog(agent.dir / "run" / "vms" / uuid / "serial.log")
        log.wait_for(r"CNA-GUEST-READY", timeout=120)

        # Bad input is refused naming the request's field, and changes nothing.
        with pytest.raises(grpc.RpcError) as info:
            storage.AttachDisk(st.AttachDiskRequest(vm=uuid, disk=vm.DiskSpec(volume=str(outside))), timeout=30)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "disk.volume" in info.value.details()
        with pytest.raises(grpc.RpcError) as info:
            storage.DetachDisk(st.DetachDiskRequest(vm=uuid, target="vdz"), timeout=30)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND and "vdz" in info.value.details()
        assert _disks(ch, uuid) == []

        ok(ch, storage.AttachDisk(st.AttachDiskRequest(vm=uuid, request_id="att-1", disk=vm.DiskSpec(volume=str(data))), timeout=60), poll=True)
        log.wait_for(r"CNA-HOTPLUG add block vda", timeout=60)
        assert _disks(ch, uuid) == ["vda"]

        ok(ch, storage.ResizeDisk(st.ResizeDiskRequest(vm=uuid, target="vda", new_size_bytes=128 << 20), timeout=60), poll=True)
        info_json = subprocess.run(["qemu-img", "info", "-U", "--output=json", str(data)], capture_output=True, text=True, timeout=60)
        assert json.loads(info_json.stdout)["virtual-size"] == 128 << 20
        shrink = wait(ch, storage.ResizeDisk(st.ResizeDiskRequest(vm=uuid, target="vda", new_size_bytes=1 << 20), timeout=60), poll=True)
        assert shrink.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and "shrinking is refused" in shrink.error.message
        assert shrink.error.field_violations[0].field == "new_size_bytes"

        ok(ch, storage.SetDiskQos(st.SetDiskQosRequest(vm=uuid, target="vda", qos=vm.IoQos(total_bytes_sec=10 << 20, total_iops_sec=500)), timeout=60), poll=True)
        got = vms.GetVm(vm.GetVmRequest(vm=uuid), timeout=30)
        assert got.spec.disks[0].qos.total_bytes_sec == 10 << 20 and got.spec.disks[0].qos.total_iops_sec == 500

        ok(ch, storage.DetachDisk(st.DetachDiskRequest(vm=uuid, target="vda", request_id="det-1"), timeout=60), poll=True)
        log.wait_for(r"CNA-HOTPLUG remove block vda", timeout=60)
        assert _disks(ch, uuid) == []
        ok(ch, vms.DeleteVm(vm.DeleteVmRequest(vm=uuid, force=True), timeout=60), poll=True)
