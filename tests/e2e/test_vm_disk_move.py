"""Live storage migration: a running guest's qcow2 disk moves to a raw volume on another
datastore while the guest writes to it, through the real agent (embedded libvirt, TCG).

Judged from outside the agent: libvirt's live (status) and persistent definitions on disk, the
files on both datastores, ``qemu-img compare`` of source and destination (the source is kept and
frozen at the switch, and the guest stopped writing before it), and the guest's own sha256 of
its disk against the host's of the destination. A cancel mid-copy leaves the VM on its source
and no destination file; bad requests change nothing.
"""

from __future__ import annotations

import hashlib
import re
import subprocess
import tempfile
import time
from pathlib import Path
from xml.etree import ElementTree as ET

import grpc
import pytest

from cna_agent.api import pb
from support.console import AgentConsole
from support.guests import guest_spec, serial_log
from support.operations import ok, wait
from support.tools import REPO

vm, S, ops_pb = pb.vm_pb2, pb.storage_pb2, pb.operations_pb2
MiB = 1 << 20
pytestmark = pytest.mark.slow


def _run(*argv: str) -> str:
    p = subprocess.run(list(argv), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, f"{argv}: {p.stderr}"
    return p.stdout


def _source(xml_path: Path, target: str = "vda") -> str:
    for disk in ET.parse(xml_path).getroot().iter("disk"):
        t = disk.find("target")
        if t is not None and t.get("dev") == target:
            return disk.find("source").get("file")
    raise AssertionError(f"no {target} in {xml_path}")


def test_a_writing_guests_disk_moves_to_another_datastore_and_a_cancel_leaves_it_in_place(vm_agent_factory) -> None:
    ds1, ds2 = Path(tempfile.mkdtemp(prefix="mv1", dir="/tmp")), Path(tempfile.mkdtemp(prefix="mv2", dir="/tmp"))
    agent = vm_agent_factory(image_dirs=(str(REPO / ".cache" / "guests"),),
                             extra_config=f'[storage.datastores.ds1]\ntype = "dir"\npath = "{ds1}"\n'
                                          f'[storage.datastores.ds2]\ntype = "dir"\npath = "{ds2}"\n')
    src = ds1 / "mv" / "data.qcow2"
    src.parent.mkdir()
    _run("qemu-img", "create", "-q", "-f", "qcow2", str(src), "16M")
    _run("qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 16M", str(src))
    (ds2 / "mv").mkdir()
    (ds2 / "mv" / "taken.qcow2").write_bytes(b"")
    live, persistent = (agent.dir / "state" / "libvirt" / "run" / "qemu" / "mvvm.xml",
                        agent.dir / "state" / "libvirt" / "etc" / "qemu" / "mvvm.xml")
    with agent.channel() as ch:
        vms, storage = pb.vm_pb2_grpc.VmServiceStub(ch), pb.storage_pb2_grpc.StorageServiceStub(ch)
        ops = pb.operations_pb2_grpc.OperationsServiceStub(ch)
        spec = guest_spec("x86_64", "mvvm", memory_mib=128, disks=[vm.DiskSpec(volume="ds1/mv/data.qcow2")])
        uuid = ok(ch, vms.CreateVm(vm.CreateVmRequest(spec=spec, start=True), timeout=60), into=vm.Vm()).uuid
        log = serial_log(agent, uuid)
        log.wait_for(r"CNA-GUEST-READY", timeout=120)

        # refused, changing nothing: no such disk, no such datastore, a destination that exists
        with pytest.raises(grpc.RpcError) as err:
            storage.MoveDisk(S.MoveDiskRequest(vm=uuid, target="vdz", destination="ds2/mv/x.qcow2"), timeout=30)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND and "vdz" in err.value.details()
        done = wait(ch, storage.MoveDisk(S.MoveDiskRequest(vm=uuid, target="vda", destination="nope/x.qcow2"), timeout=30))
        assert done.error.code in (grpc.StatusCode.NOT_FOUND.value[0], grpc.StatusCode.INVALID_ARGUMENT.value[0]), done.error
        done = wait(ch, storage.MoveDisk(S.MoveDiskRequest(vm=uuid, target="vda", destination="ds2/mv/taken.qcow2"), timeout=30))
        assert done.error.code == grpc.StatusCode.ALREADY_EXISTS.value[0], done.error
        assert sorted(p.name for p in (ds2 / "mv").iterdir()) == ["taken.qcow2"] and _source(live) == str(src)

        # a cancel mid-copy (held to 1 MiB/s): the VM stays on its source, the copy is removed
        op = storage.MoveDisk(S.MoveDiskRequest(vm=uuid, target="vda", destination="ds2/mv/cancel.qcow2", bandwidth_mib_s=1),
                              timeout=30)
        deadline = time.monotonic() + 60
        while (cur := ops.GetOperation(ops_pb.GetOperationRequest(id=op.id), timeout=10)).progress.bytes_done < 2 * MiB:
            assert not cur.done and time.monotonic() < deadline, cur
            time.sleep(0.2)
        assert (ds2 / "mv" / "cancel.qcow2").exists()
        ops.CancelOperation(ops_pb.CancelOperationRequest(id=op.id), timeout=30)
        done = wait(ch, op, timeout=60)
        assert done.error.code == grpc.StatusCode.CANCELLED.value[0], done
        assert not (ds2 / "mv" / "cancel.qcow2").exists() and _source(live) == str(src) and _source(persistent) == str(src)

        # the move, qcow2 -> raw, while the guest writes for its first 2 s (the copy is held to
        # 4 MiB/s: about 4 s for the 16 MiB, so the writes land while QEMU mirrors)
        with AgentConsole(ch, uuid) as con:
            con.send("\n")
            con.wait_for(r"cna# ", timeout=60, partial=True)
            con.send("(e=$(($(date +%s)+2)); i=0; while [ $(date +%s) -lt $e ]; do dd if=/dev/urandom of=/dev/vda bs=64k "
                     "seek=$((i%256)) count=1 oflag=direct conv=notrunc 2>/dev/null; i=$((i+1)); done; echo WRITER-DONE-$i) &\n")
            op = storage.MoveDisk(S.MoveDiskRequest(vm=uuid, target="vda", destination="ds2/mv/data.raw", bandwidth_mib_s=4,
                                                    keep_source=True), timeout=30)
            moved = ok(ch, op, into=vm.Vm())
            writes = int(re.search(r"WRITER-DONE-(\d+)", log.text()).group(1))
            assert writes >= 1, writes  # under TCG on a loaded machine one dd can take a second
            rc, out = con.run("dd if=/dev/vda bs=1M count=16 2>/dev/null | sha256sum", timeout=120)
            assert rc == 0
            guest_sum = out.split()[0]
        dst = ds2 / "mv" / "data.raw"
        assert moved.spec.disks[0].volume == "ds2/mv/data.raw"
        assert _source(live) == str(dst) and _source(persistent) == str(dst)
        ok(ch, vms.ShutdownVm(vm.ShutdownVmRequest(vm=uuid, hard=True), timeout=60))
        _run("qemu-img", "compare", "-q", "-f", "qcow2", "-F", "raw", str(src), str(dst))  # the source: frozen at the switch
        assert hashlib.sha256(dst.read_bytes()[:16 * MiB]).hexdigest() == guest_sum
        assert "raw" in _run("qemu-img", "info", str(dst))
        ok(ch, vms.DeleteVm(vm.DeleteVmRequest(vm=uuid, force=True), timeout=60))
