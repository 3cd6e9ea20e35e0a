"""Snapshots end to end through the real daemon: internal (qcow2) on a stopped VM with revert
really restoring the disk's data (patterns written and checked with qemu-io), external
disk-only overlays on a running VM (guest writes land in the overlay, the base stays as it
was), the tree (parent/children/current), name validation and cna-ctl."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import pytest

from cna_agent.api import pb
from support.console import Console
from support.guests import guest_spec, serial_log
from support.operations import ok, wait
from support.tools import REPO

vm = pb.vm_pb2
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the embedded QEMU driver here needs root")


def qemu_io(img: Path, cmd: str, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(["qemu-io", *extra, "-f", "qcow2", "-c", cmd, str(img)], capture_output=True, text=True, timeout=60)


def pattern_ok(img: Path, pattern: int, *extra: str) -> bool:
    p = qemu_io(img, f"read -P {pattern:#x} 0 64k", *extra)
    assert p.returncode == 0, p.stderr
    return "Pattern verification failed" not in p.stdout + p.stderr


@pytest.mark.slow
def test_internal_and_external_snapshots_tree_revert_delete(vm_agent_factory, system_mode) -> None:
    libvirt_mode = system_mode  # embedded snapshots: the memory-snapshot and Debian quiesce tests
    images = Path(tempfile.mkdtemp(prefix="cs", dir="/tmp"))
    images.chmod(0o755)  # an image directory QEMU's own user may pass (system mode)
    img = images / "data.qcow2"
    subprocess.run(["qemu-img", "create", "-f", "qcow2", str(img), "16M"], check=True, capture_output=True, timeout=60)
    assert qemu_io(img, "write -P 0x11 0 64k").returncode == 0
    agent = vm_agent_factory(image_dirs=(str(REPO / ".cache" / "guests"), str(images)), mode=libvirt_mode)
    with agent.channel() as ch:
        stub = pb.vm_pb2_grpc.VmServiceStub(ch)
        spec = guest_spec("x86_64", "snappy")
        spec.disks.add(volume=str(img), format="qcow2")
        op = ok(ch, stub.CreateVm(vm.CreateVmRequest(spec=spec), timeout=60))
        created = vm.Vm()
        op.response.Unpack(created)
        uuid = created.uuid

        # bad names refused, naming the field, nothing created
        for bad in ("a/b", "a<b", "", "../x"):
            with pytest.raises(grpc.RpcError) as err:
                stub.CreateSnapshot(vm.CreateSnapshotRequest(vm=uuid, name=bad), timeout=10)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "name" in err.value.details()
        assert not stub.ListSnapshots(vm.ListSnapshotsRequest(vm=uuid), timeout=10).snapshots

        # stopped: internal snapshots s1 -> s2
        op = ok(ch, stub.CreateSnapshot(vm.CreateSnapshotRequest(vm=uuid, name="s1", description="first"), timeout=60))
        s1 = vm.Snapshot()
        op.response.Unpack(s1)
        assert s1.kind == "internal" and s1.current and s1.vm_state == vm.VM_STATE_STOPPED
        assert qemu_io(img, "write -P 0x22 0 64k").returncode == 0
        ok(ch, stub.CreateSnapshot(vm.CreateSnapshotRequest(vm=uuid, name="s2"), timeout=60))
        tree = stub.ListSnapshots(vm.ListSnapshotsRequest(vm=uuid), timeout=10).snapshots
        assert [(s.name, s.parent, list(s.children), s.current) for s in tree] == [("s1", "", ["s2"], False), ("s2", "s1", [], True)]
        assert "s1" in subprocess.run(["qemu-img", "snapshot", "-l", str(img)], capture_output=True, text=True, timeout=30).stdout

        # revert to s1 really restores the data written before it
        assert qemu_io(img, "write -P 0x33 0 64k").returncode == 0
        ok(ch, stub.RevertSnapshot(vm.SnapshotActionRequest(vm=uuid, snapshot="s1"), timeout=60))
        assert pattern_ok(img, 0x11)
        assert [s.name for s in stub.ListSnapshots(vm.ListSnapshotsRequest(vm=uuid), timeout=10).snapshots if s.current] == ["s1"]
        ok(ch, stub.RevertSnapshot(vm.SnapshotActionRequest(vm=uuid, snapshot="s2"), timeout=60))
        assert pattern_ok(img, 0x22)
        op = wait(ch, stub.RevertSnapshot(vm.SnapshotActionRequest(vm=uuid, snapshot="nope"), timeout=60))
        assert op.error.code == grpc.StatusCode.NOT_FOUND.value[0]

        # running: external disk-only snapshot; the guest's writes go to the overlay
        ok(ch, stub.StartVm(vm.VmActionRequest(vm=uuid), timeout=60))
        serial_log(agent, uuid).wait_for(r"CNA-GUEST-READY", timeout=120)
        op = ok(ch, stub.CreateSnapshot(vm.CreateSnapshotRequest(vm=uuid, name="live1"), timeout=60))
        live = vm.Snapshot()
        op.response.Unpack(live)
        assert live.kind == "external" and live.parent == "s2"
        overlay = images / "data.live1.qcow2"
        assert overlay.exists()
        con = Console(stub, uuid)
        con.send("\n")
        con.wait_for(r"cna# ")
        con.send("printf 'DATA-AFTER-SNAPSHOT' > /dev/vda; sync; echo wrote-$((6*7))\n")
        con.wait_for(r"^wrote-42\r?$")
        con.close()
        # quiesce without a guest agent channel is refused, not silently skipped
        op = wait(ch, stub.CreateSnapshot(vm.CreateSnapshotRequest(vm=uuid, name="q", quiesce=True), timeout=10))
        assert op.error.code == grpc.StatusCode.FAILED_PRECONDITION.value[0] and "guest agent" in op.error.message
        ok(ch, stub.ShutdownVm(vm.ShutdownVmRequest(vm=uuid, hard=True), timeout=30))
        info = json.loads(subprocess.run(["qemu-img", "info", "-U", "--output=json", str(overlay)], capture_output=True,
                                         text=True, timeout=30).stdout)
        assert Path(info["backing-filename"]).name == "data.qcow2"
        assert pattern_ok(img, 0x22, "-r")  # the base image kept the snapshot-time data
        head = subprocess.run(["qemu-io", "-r", "-f", "qcow2", "-c", "read -v 0 32", str(overlay)], capture_output=True,
                              text=True, timeout=30).stdout
        assert b"DATA-AFTER-SNAPS".hex(" ") in head, head  # the hex column (qemu-io prints "-" as ".")

        # cna-ctl lists the tree and deletes the live snapshot
        exe = Path(sys.executable).with_name("cna-ctl")
        p = subprocess.run([str(exe), "--socket", str(agent.socket), "vm", "snapshot", "list", uuid, "--json"],
                           capture_output=True, text=True, timeout=60)
        assert p.returncode == 0, p.stderr
        assert [s["name"] for s in json.loads(p.stdout)["snapshots"]] == ["s1", "s2", "live1"]
        p = subprocess.run([str(exe), "--socket", str(agent.socket), "vm", "snapshot", "delete", uuid, "live1"],
                           capture_output=True, text=True, timeout=60)
        assert p.returncode == 0, p.stderr
        names = [s.name for s in stub.ListSnapshots(vm.ListSnapshotsRequest(vm=uuid), timeout=10).snapshots]
        assert names == ["s1", "s2"]


def _counts(text: str) -> list[int]:
    return [int(n) for n in re.findall(r"^COUNT-(\d+)\r?$", text, re.M)]


@pytest.mark.slow
def test_a_memory_snapshot_resumes_the_counting_guest_and_drops_later_writes(vm_agent_factory) -> None:
    """A running guest counts on its serial console; a memory snapshot is taken mid-count; the
    guest counts on and overwrites its disk; after the revert its counter goes on from the
    snapshot's value (no reboot: no new boot marker, the numbers repeat) and the disk holds what
    it held at the snapshot (qemu-io on the image once the VM is off). The snapshot is inside the
    qcow2 with the guest's RAM (qemu-img snapshot -l: a VM SIZE)."""
    images = Path(tempfile.mkdtemp(prefix="cm", dir="/tmp"))
    img = images / "data.qcow2"
    subprocess.run(["qemu-img", "create", "-f", "qcow2", str(img), "16M"], check=True, capture_output=True, timeout=60)
    assert qemu_io(img, "write -P 0x11 0 64k").returncode == 0
    agent = vm_agent_factory(image_dirs=(str(REPO / ".cache" / "guests"), str(images)))
    with agent.channel() as ch:
        stub = pb.vm_pb2_grpc.VmServiceStub(ch)
        spec = guest_spec("x86_64", "memsnap", memory_mib=128)
        spec.disks.add(volume=str(img), format="qcow2")
        uuid = ok(ch, stub.CreateVm(vm.CreateVmRequest(spec=spec, start=True), timeout=60), into=vm.Vm()).uuid
        log = serial_log(agent, uuid)
        log.wait_for(r"CNA-GUEST-READY", timeout=120)
        con = Console(stub, uuid)
        con.send("\n")
        con.wait_for(r"cna# ")
        con.send("(i=0; while :; do echo COUNT-$i; i=$((i+1)); sleep 1; done) &\n")
        con.wait_for(r"COUNT-3\r?$", timeout=60)

        # quiesce makes no sense with RAM saved; a stopped VM has none: both refused naming the field
        op = wait(ch, stub.CreateSnapshot(vm.CreateSnapshotRequest(vm=uuid, name="mq", memory=True, quiesce=True), timeout=10))
        assert op.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and "quiesce" in op.error.message
        before = max(_counts(log.text()))
        op = ok(ch, stub.CreateSnapshot(vm.CreateSnapshotRequest(vm=uuid, name="m1", memory=True), timeout=120))
        after = max(_counts(log.text()))
        snap = vm.Snapshot()
        op.response.Unpack(snap)
        assert snap.memory and snap.kind == "internal" and snap.vm_state == vm.VM_STATE_RUNNING
        listing = subprocess.run(["qemu-img", "snapshot", "-U", "-l", str(img)], capture_output=True, text=True, timeout=30).stdout
        row = next(line for line in listing.splitlines() if " m1 " in f" {line} ")
        assert re.search(r"\d+(\.\d+)? [KMG]iB", row), listing  # the RAM is in the image

        # the guest goes on counting and overwrites the start of its disk
        con.wait_for(rf"COUNT-{after + 8}\r?$", timeout=60)
        con.send("printf 'DATA-AFTER-SNAPSHOT' > /dev/vda; sync; echo wrote-$((6*7))\n")
        con.wait_for(r"^wrote-42\r?$")
        con.close()
        highest = max(_counts(log.text()))
        boots = log.text().count("CNA-GUEST-READY")

        ok(ch, stub.RevertSnapshot(vm.SnapshotActionRequest(vm=uuid, snapshot="m1"), timeout=120))
        assert stub.GetVm(vm.GetVmRequest(vm=uuid), timeout=30).status.state == vm.VM_STATE_RUNNING
        mark = len(log.text())
        deadline = time.monotonic() + 60
        while len(_counts(log.text()[mark:])) < 3:
            assert time.monotonic() < deadline, log.text()[mark:][-500:]
            time.sleep(0.5)
        resumed = _counts(log.text()[mark:])
        # counting on from the snapshot's value, not from 0 and not from where it was before the revert
        assert before <= resumed[0] <= after + 4 < highest, (before, after, resumed, highest)
        assert resumed == list(range(resumed[0], resumed[0] + len(resumed)))
        assert log.text().count("CNA-GUEST-READY") == boots  # not rebooted

        ok(ch, stub.ShutdownVm(vm.ShutdownVmRequest(vm=uuid, hard=True), timeout=30))
        assert pattern_ok(img, 0x11, "-r")  # what the guest wrote after the snapshot is gone
        ok(ch, stub.DeleteVm(vm.DeleteVmRequest(vm=uuid), timeout=60))
