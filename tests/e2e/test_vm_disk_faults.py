"""The agent killed (SIGKILL) between libvirt plugging a disk into a running guest and the spec
recording it: the window in which, before recovery knew disk operations, the disk stayed
attached while the agent's spec lacked it, DetachDisk answered NOT_FOUND and a retry with the
same request id returned ABORTED, so a manager could not converge without virsh.

Now, after the restart, the same AttachDisk (same request id, as a VRM retries a call whose
answer was lost) returns the operation, completed from libvirt's state; the guest saw the disk
arrive once (its serial log), and DetachDisk removes it again (the guest sees it go). The crash
is a named crash point (cna_agent/failpoints.py): the window is one libvirt call wide.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import grpc
import pytest

from cna_agent.api import pb
from support.agent import start_agent
from support.console import SerialLog
from support.guests import build_guest, guest_spec
from support.migration import restart
from support.operations import ok, wait

vm, st = pb.vm_pb2, pb.storage_pb2
pytestmark = [pytest.mark.needs_root, pytest.mark.slow]


def _disks(ch, uuid: str) -> list[str]:
    return [d.target for d in pb.vm_pb2_grpc.VmServiceStub(ch).GetVm(vm.GetVmRequest(vm=uuid), timeout=30).spec.disks]


def test_an_attach_cut_short_by_a_kill_converges_on_retry(libvirt_caps_cache) -> None:
    base = Path(tempfile.mkdtemp(prefix="cf", dir="/tmp"))
    images = base / "img"
    images.mkdir()
    data = images / "data.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(data), "32M"], check=True, timeout=60)
    guest_dir = str(Path(build_guest("x86_64")["kernel"]).parent)
    agent = start_agent(base / "a", libvirt_caps_cache, extra_config=f'[compute]\nimage_dirs = "{guest_dir},{images}"\n',
                        env={"CNA_FAILPOINTS": "vm.disk.attach.plugged"})
    try:
        with agent.channel() as ch:
            uuid = ok(ch, pb.vm_pb2_grpc.VmServiceStub(ch).CreateVm(
                vm.CreateVmRequest(spec=guest_spec("x86_64", "plugkill"), start=True), timeout=60), into=vm.Vm()).uuid
        log = SerialLog(agent.dir / "run" / "vms" / uuid / "serial.log")
        log.wait_for(r"CNA-GUEST-READY", timeout=150)
        req = st.AttachDiskRequest(vm=uuid, request_id="att-kill", disk=vm.DiskSpec(volume=str(data)))
        with agent.channel() as ch:
            with pytest.raises(grpc.RpcError) as err:
                pb.storage_pb2_grpc.StorageServiceStub(ch).AttachDisk(req, timeout=60)
        assert err.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
        agent.proc.wait(timeout=30)
        log.wait_for(r"CNA-HOTPLUG add block vda", timeout=60)  # libvirt did plug it: the guest has it

        agent = restart(agent)  # no crash point now; the guest outlived the agent
        with agent.channel() as ch:
            storage = pb.storage_pb2_grpc.StorageServiceStub(ch)
            done = wait(ch, storage.AttachDisk(req, timeout=60), timeout=60)
            assert done.state == pb.operations_pb2.OPERATION_STATE_SUCCEEDED, done.error
            assert _disks(ch, uuid) == ["vda"]
            assert log.count(r"CNA-HOTPLUG add block vda") == 1  # completed, not plugged a second time
            ok(ch, storage.DetachDisk(st.DetachDiskRequest(vm=uuid, target="vda", request_id="det-after"), timeout=60),
               timeout=90)
            log.wait_for(r"CNA-HOTPLUG remove block vda", timeout=60)
            assert _disks(ch, uuid) == []
            ok(ch, pb.vm_pb2_grpc.VmServiceStub(ch).DeleteVm(vm.DeleteVmRequest(vm=uuid, force=True), timeout=60))
    finally:
        agent.stop()
        shutil.rmtree(base, ignore_errors=True)
