"""A full datastore pauses the guest (ENOSPC, error_policy=stop); the agent resumes it once there
is room again, and the write that failed is retried, not lost.

The real daemon and the real x86_64 test guest under TCG. The datastore is a small tmpfs of its
own, so filling it cannot disturb the host; the guest writes through a thin qcow2 volume, which
needs new clusters from the full filesystem.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from cna_agent.api import pb
from support.agent import start_agent
from support.console import AgentConsole, SerialLog
from support.guests import build_guest
from support.operations import ok

vm, ev = pb.vm_pb2, pb.events_pb2
MiB = 1024**2
pytestmark = [pytest.mark.slow, pytest.mark.skipif(os.geteuid() != 0, reason="mounts a tmpfs and runs the embedded QEMU driver")]


def _free(path: Path) -> int:
    s = os.statvfs(path)
    return s.f_bavail * s.f_frsize


def _wait_state(ch, uuid: str, state: int, reason: str = "", timeout: float = 60) -> vm.VmStatus:
    stub = pb.vm_pb2_grpc.VmServiceStub(ch)
    deadline = time.monotonic() + timeout
    while True:
        s = stub.GetVm(vm.GetVmRequest(vm=uuid), timeout=30).status
        if s.state == state and (not reason or s.state_reason == reason):
            return s
        assert time.monotonic() < deadline, f"{vm.VmState.Name(s.state)}/{s.state_reason}"
        time.sleep(0.3)


def _events(ch, uuid: str, t: str) -> list[ev.Event]:
    stub = pb.events_pb2_grpc.EventServiceStub(ch)
    return list(stub.ListEvents(ev.ListEventsRequest(types=[t], resource_id=uuid, limit=1000), timeout=30).events)


@pytest.fixture
def full_datastore(libvirt_caps_cache):
    base = Path(tempfile.mkdtemp(prefix="ce", dir="/tmp"))  # short: QEMU socket paths < 108 bytes
    small = base / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96m,mode=0700", "cna-test-small", str(small)], check=True, timeout=30)
    guest_dir = str(Path(build_guest("x86_64")["kernel"]).parent)
    agent = None
    try:
        extra = (f'[compute]\nimage_dirs = "{guest_dir}"\nio_error_check_interval_s = 1.0\n'
                 f'[storage]\nprobe_interval_s = 1.0\n[storage.datastores.small]\ntype = "dir"\npath = "{small}"\n')
        agent = start_agent(base / "a", libvirt_caps_cache, extra_config=extra)
        yield agent, small
    finally:
        if agent is not None:
            agent.stop()
        subprocess.run(["pkill", "-9", "-f", str(small)], timeout=10)  # no QEMU may keep the tmpfs busy
        for _ in range(50):
            if subprocess.run(["umount", str(small)], capture_output=True, timeout=30).returncode == 0:
                break
            time.sleep(0.2)
        shutil.rmtree(base, ignore_errors=True)


def test_full_datastore_pauses_the_guest_and_the_agent_resumes_it_when_there_is_room(full_datastore):
    agent, small = full_datastore
    g = build_guest("x86_64")
    subprocess.run(["qemu-img", "create", "-f", "qcow2", str(small / "data.qcow2"), "64M"], check=True, capture_output=True, timeout=60)
    with agent.channel() as ch:
        vms = pb.vm_pb2_grpc.VmServiceStub(ch)
        spec = vm.VmSpec(name="fullds", vcpus=1, memory_mib=192, serial_console=True, arch=pb.common_pb2.ARCH_X86_64,
                         boot=vm.BootSpec(kernel=g["kernel"], initrd=g["initrd"], cmdline=f"console={g['console']}"),
                         disks=[vm.DiskSpec(volume="small/data.qcow2")])
        op = ok(ch, vms.CreateVm(vm.CreateVmRequest(spec=spec, start=True, request_id="create-fullds"), timeout=60), poll=True)
        created = vm.Vm()
        op.response.Unpack(created)
        uuid = created.uuid
        SerialLog(agent.dir / "run" / "vms" / uuid / "serial.log").wait_for(r"CNA-GUEST-READY", timeout=120)

        with AgentConsole(ch, uuid) as con:
            con.send("\n")
            con.wait_for(r"cna# ", timeout=60, partial=True)
            rc, out = con.run("dd if=/dev/urandom of=/tmp/pat bs=1M count=8 2>/dev/null && sha256sum /tmp/pat", timeout=60)
            assert rc == 0, out
            sha = out.split()[0]
            # leave ~2 MiB: the 8 MiB write needs new qcow2 clusters and runs out of space
            filler = small / "filler"
            subprocess.run(["fallocate", "-l", str(_free(small) - 2 * MiB), str(filler)], check=True, timeout=30)
            con.send("dd if=/tmp/pat of=/dev/vda bs=1M oflag=direct conv=fsync 2>&1; echo WROTE-$?\n")
            _wait_state(ch, uuid, vm.VM_STATE_PAUSED, "ioerror", timeout=60)
            errors = _events(ch, uuid, "vm.io_error")
            assert errors and errors[-1].attributes["reason"] == "enospc", errors
            time.sleep(4)  # several checks (every second) see too little free space
            assert vms.GetVm(vm.GetVmRequest(vm=uuid), timeout=30).status.state == vm.VM_STATE_PAUSED
            assert not _events(ch, uuid, "vm.io_error_resumed")

            filler.unlink()
            _wait_state(ch, uuid, vm.VM_STATE_RUNNING, timeout=60)
            resumed = _events(ch, uuid, "vm.io_error_resumed")
            assert len(resumed) == 1 and resumed[0].attributes["disks"] == "vda", resumed
            con.wait_for(r"^WROTE-0", timeout=120)
            rc, out = con.run("dd if=/dev/vda bs=1M count=8 iflag=direct 2>/dev/null | sha256sum", timeout=60)
            assert rc == 0 and out.split()[0] == sha, out
        vms.DeleteVm(vm.DeleteVmRequest(vm=uuid, force=True), timeout=60)
    # the guest's bytes are in the volume on the datastore
    raw = small.parent / "data.raw"
    subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(small / "data.qcow2"), str(raw)],
                   check=True, capture_output=True, timeout=60)
    with raw.open("rb") as f:
        assert hashlib.sha256(f.read(8 * MiB)).hexdigest() == sha
