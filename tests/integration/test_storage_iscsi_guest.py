"""Guests on iSCSI LUNs through QEMU's libiscsi, served by a real tgtd on 127.0.0.1.

The real ``cna-agent serve`` with a libiscsi SAN datastore; the real x86_64 test guest, booted by
SeaBIOS from a LUN that holds tools/build-test-guest.py's boot disk (no direct kernel boot: the
guest says ``CNA-FACT bootsrc=disk``). What the guest writes is checked in tgtd's backing files,
i.e. on the "array".

Storage failures, as QEMU's libiscsi really behaves (seen on this testbed, libvirt 9.0 / QEMU
7.2): libvirt exposes no iSCSI request timeout, so when tgtd stops answering (SIGSTOP, or killed)
guest I/O simply waits and resumes when tgtd does: no error, no pause. When the array answers
but refuses I/O (the LUN unmapped), QEMU gets SCSI errors, and error_policy=stop pauses the VM
with an I/O error; the agent keeps it paused while the LUN is missing and resumes it once the LUN
answers again (``[compute] io_error_resume = "auto"``). Both paths must lose no write.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import tempfile
import time
from pathlib import Path

import pytest

from cna_agent.api import pb
from support.agent import start_agent
from support.console import AgentConsole, SerialLog
from support.guests import build_guest
from support.operations import ok

pytestmark = [pytest.mark.needs_root, pytest.mark.slow]
vm, st, ops_pb, ev = pb.vm_pb2, pb.storage_pb2, pb.operations_pb2, pb.events_pb2
IQN = "iqn.2024-01.test.cna:guest-luns"
MiB = 1024**2
#: Where the guest writes on the data LUN: 1 MiB in, 1 MiB long.
DATA_OFFSET, DATA_LEN = 1 * MiB, 1 * MiB


def _boot_disk() -> Path:
    return Path(build_guest("x86_64", boot_disk=True)["boot_disk"])


def _status(ch, uuid: str) -> vm.VmStatus:
    return pb.vm_pb2_grpc.VmServiceStub(ch).GetVm(vm.GetVmRequest(vm=uuid), timeout=30).status


def _wait_status(ch, uuid: str, state: int, reason: str = "", timeout: float = 60) -> vm.VmStatus:
    deadline = time.monotonic() + timeout
    while True:
        s = _status(ch, uuid)
        if s.state == state and (not reason or s.state_reason == reason):
            return s
        assert time.monotonic() < deadline, f"vm {uuid} is {vm.VmState.Name(s.state)}/{s.state_reason}, " \
                                            f"wanted {vm.VmState.Name(state)}/{reason}"
        time.sleep(0.3)


def _events(ch, uuid: str, types: list[str]) -> list[ev.Event]:
    stub = pb.events_pb2_grpc.EventServiceStub(ch)
    return list(stub.ListEvents(ev.ListEventsRequest(types=types, resource_id=uuid, limit=1000), timeout=30).events)


def _sha_at(path: Path, offset: int, length: int) -> str:
    with path.open("rb") as f:
        f.seek(offset)
        return hashlib.sha256(f.read(length)).hexdigest()


def _write_pattern(con: AgentConsole, dev: str, timeout: float = 120) -> str:
    """Fill DATA_LEN of random bytes at DATA_OFFSET of /dev/<dev> (O_DIRECT + fsync); return their sha256."""
    rc, out = con.run("dd if=/dev/urandom of=/tmp/pat bs=64k count=16 2>/dev/null && sha256sum /tmp/pat", timeout=60)
    assert rc == 0, out
    sha = out.split()[0]
    rc, out = con.run(f"dd if=/tmp/pat of=/dev/{dev} bs=64k seek=16 oflag=direct conv=fsync 2>&1", timeout=timeout)
    assert rc == 0 and "16+0 records out" in out, out
    return sha


@pytest.fixture
def san(testbed):
    """tgtd target with LUN 1 = a copy of the boot disk and LUN 2 = an empty 32 MiB data disk."""
    d = Path(tempfile.mkdtemp(prefix="cl", dir="/tmp"))
    boot, data = d / "boot.raw", d / "data.raw"
    shutil.copyfile(_boot_disk(), boot)
    with data.open("wb") as f:
        f.truncate(32 * MiB)
    testbed.iscsi_create_target(IQN, [boot, data])
    yield testbed, boot, data
    testbed.iscsi_delete_target(IQN)
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def san_agent(san, libvirt_caps_cache):
    tb, boot, data = san
    base = Path(tempfile.mkdtemp(prefix="ci", dir="/tmp"))  # short: QEMU socket paths < 108 bytes
    extra = (f'[compute]\nio_error_check_interval_s = 2.0\n'
             f'[storage]\nprobe_interval_s = 2.0\nprobe_timeout_s = 3.0\n'
             f'[storage.datastores.san]\ntype = "iscsi"\nportals = ["{tb.iscsi_portal}"]\n'
             f'target_iqn = "{IQN}"\ninitiator = "libiscsi"\nscan_timeout_s = 10.0\n')
    agent = start_agent(base / "a", libvirt_caps_cache, extra_config=extra)
    yield agent, tb, boot, data
    agent.stop()
    shutil.rmtree(base, ignore_errors=True)


def _boot_from_lun(ch, agent, name: str) -> tuple[str, SerialLog]:
    vms = pb.vm_pb2_grpc.VmServiceStub(ch)
    spec = vm.VmSpec(name=name, vcpus=1, memory_mib=192, serial_console=True, arch=pb.common_pb2.ARCH_X86_64,
                     firmware=vm.FIRMWARE_BIOS,
                     disks=[vm.DiskSpec(lun=vm.LunSource(datastore="san", lun_id=f"{IQN}/1"), boot_order=1)])
    op = ok(ch, vms.CreateVm(vm.CreateVmRequest(spec=spec, start=True, request_id=f"create-{name}"), timeout=60), poll=True)
    created = vm.Vm()
    op.response.Unpack(created)
    log = SerialLog(agent.dir / "run" / "vms" / created.uuid / "serial.log")
    log.wait_for(r"CNA-FACT bootsrc=disk", timeout=180)
    log.wait_for(r"CNA-GUEST-READY", timeout=60)
    return created.uuid, log


def test_guest_boots_from_a_lun_and_a_hotplugged_lun_keeps_what_it_wrote(san_agent):
    agent, tb, boot, data = san_agent
    boot_sha = hashlib.sha256(boot.read_bytes()[: 1 * MiB]).hexdigest()
    with agent.channel() as ch:
        storage = pb.storage_pb2_grpc.StorageServiceStub(ch)
        uuid, log = _boot_from_lun(ch, agent, "lunboot")
        got = pb.vm_pb2_grpc.VmServiceStub(ch).GetVm(vm.GetVmRequest(vm=uuid), timeout=30)
        assert got.spec.disks[0].lun.lun_id == f"{IQN}/1" and got.spec.disks[0].target == "vda"
        facts = log.text()
        assert "CNA-FACT block=vda\n" in facts  # the LUN is the guest's only disk

        ok(ch, storage.AttachDisk(st.AttachDiskRequest(
            vm=uuid, request_id="att-lun2", disk=vm.DiskSpec(lun=vm.LunSource(datastore="san", lun_id=f"{IQN}/2"))), timeout=60), poll=True)
        log.wait_for(r"CNA-HOTPLUG add block vdb", timeout=60)
        with AgentConsole(ch, uuid) as con:
            con.send("\n")
            con.wait_for(r"cna# ", timeout=60, partial=True)
            sha = _write_pattern(con, "vdb")
        ok(ch, storage.DetachDisk(st.DetachDiskRequest(vm=uuid, target="vdb", request_id="det-lun2"), timeout=60), poll=True)
        log.wait_for(r"CNA-HOTPLUG remove block vdb", timeout=60)
        # after the detach the bytes are on the array ...
        assert _sha_at(data, DATA_OFFSET, DATA_LEN) == sha
        # ... and the guest reads the same bytes back when the LUN comes back
        ok(ch, storage.AttachDisk(st.AttachDiskRequest(
            vm=uuid, request_id="att-lun2-again", disk=vm.DiskSpec(lun=vm.LunSource(datastore="san", lun_id=f"{IQN}/2"))), timeout=60), poll=True)
        log.wait_for(r"CNA-HOTPLUG add block vdb", count=2, timeout=60)
        with AgentConsole(ch, uuid) as con:
            rc, out = con.run("dd if=/dev/vdb bs=64k skip=16 count=16 iflag=direct 2>/dev/null | sha256sum", timeout=60)
        assert rc == 0 and out.split()[0] == sha, out
        pb.vm_pb2_grpc.VmServiceStub(ch).DeleteVm(vm.DeleteVmRequest(vm=uuid, force=True), timeout=60)
    # the boot LUN's boot code and partition table are as the image had them
    assert hashlib.sha256(boot.read_bytes()[: 1 * MiB]).hexdigest() == boot_sha


def test_target_failures_pause_or_stall_the_guest_and_lose_no_write(san_agent):
    agent, tb, boot, data = san_agent
    pids = tb.status()["tgtd"]["started_pids"]
    if not pids:
        pytest.skip("tgtd was not started by this testbed; refusing to SIGSTOP a foreign daemon")
    with agent.channel() as ch:
        vms = pb.vm_pb2_grpc.VmServiceStub(ch)
        storage = pb.storage_pb2_grpc.StorageServiceStub(ch)
        uuid, log = _boot_from_lun(ch, agent, "lunfail")
        ok(ch, storage.AttachDisk(st.AttachDiskRequest(
            vm=uuid, request_id="att-data", disk=vm.DiskSpec(lun=vm.LunSource(datastore="san", lun_id=f"{IQN}/2"))), timeout=60), poll=True)
        log.wait_for(r"CNA-HOTPLUG add block vdb", timeout=60)
        con = AgentConsole(ch, uuid)
        try:
            con.send("\n")
            con.wait_for(r"cna# ", timeout=60, partial=True)
            rc, out = con.run("dd if=/dev/urandom of=/tmp/pat bs=64k count=16 2>/dev/null && sha256sum /tmp/pat", timeout=60)
            assert rc == 0, out
            sha = out.split()[0]

            # 1. tgtd stops answering: the write waits (libiscsi has no request timeout here),
            #    the agent reports the datastore unreachable and keeps answering the VRM.
            os.kill(pids[0], signal.SIGSTOP)
            try:
                con.send("dd if=/tmp/pat of=/dev/vdb bs=64k seek=16 oflag=direct conv=fsync 2>&1; echo WROTE-$?\n")
                deadline = time.monotonic() + 30
                while storage.GetDatastore(st.GetDatastoreRequest(name="san"), timeout=10).health != pb.common_pb2.HEALTH_UNREACHABLE:
                    assert time.monotonic() < deadline, "the hung target was not reported unreachable"
                    time.sleep(0.5)
                t0 = time.monotonic()
                listed = vms.ListVms(vm.ListVmsRequest(status_only=True), timeout=10).vms
                assert time.monotonic() - t0 < 2.0 and uuid in [v.uuid for v in listed]
                assert "WROTE-" not in con.text().split("echo WROTE-$?")[-1]  # still waiting
            finally:
                os.kill(pids[0], signal.SIGCONT)
            con.wait_for(r"^WROTE-0", timeout=120)
            assert _sha_at(data, DATA_OFFSET, DATA_LEN) == sha
            assert _status(ch, uuid).state == vm.VM_STATE_RUNNING

            # 2. The array unmaps the LUN: QEMU gets SCSI errors and pauses the guest (error
            #    policy stop); the agent keeps it paused while the LUN is gone ...
            after = max([e.sequence for e in _events(ch, uuid, ["vm."])] or [0])
            rc, out = con.run("dd if=/dev/urandom of=/tmp/pat2 bs=64k count=16 2>/dev/null && sha256sum /tmp/pat2", timeout=60)
            assert rc == 0, out
            sha2 = out.split()[0]
            tb.iscsi_remove_lun(IQN, 2)
            con.send("dd if=/tmp/pat2 of=/dev/vdb bs=64k seek=16 oflag=direct conv=fsync 2>&1; echo WROTE2-$?\n")
            _wait_status(ch, uuid, vm.VM_STATE_PAUSED, "ioerror", timeout=60)
            errors = [e for e in _events(ch, uuid, ["vm.io_error"]) if e.sequence > after]
            assert errors and errors[0].attributes["device"], errors
            time.sleep(8)  # several resume checks (every 2 s) find the LUN missing
            assert _status(ch, uuid).state == vm.VM_STATE_PAUSED
            assert not [e for e in _events(ch, uuid, ["vm.io_error_resumed"]) if e.sequence > after]
            # ... and resumes it once the LUN is back; the failed write is retried, not lost.
            tb.iscsi_add_lun(IQN, 2, data)
            _wait_status(ch, uuid, vm.VM_STATE_RUNNING, timeout=60)
            resumed = [e for e in _events(ch, uuid, ["vm.io_error_resumed"]) if e.sequence > after]
            assert len(resumed) == 1 and "vdb" in resumed[0].attributes["disks"], resumed
            con.wait_for(r"^WROTE2-0", timeout=120)
            assert _sha_at(data, DATA_OFFSET, DATA_LEN) == sha2
            rc, out = con.run("dd if=/dev/vdb bs=64k skip=16 count=16 iflag=direct 2>/dev/null | sha256sum", timeout=60)
            assert rc == 0 and out.split()[0] == sha2, out
        finally:
            con.close()
        vms.DeleteVm(vm.DeleteVmRequest(vm=uuid, force=True), timeout=60)
