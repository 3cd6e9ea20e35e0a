"""Full and incremental pull backups of a running guest through the real agent and cna-ctl.

A guest runs on a 64 MiB qcow2 disk filled from the host; ``cna-ctl vm backup --to DIR`` makes a
full backup, the guest overwrites 1 MiB of its disk, ``--incremental`` backs up the change.
Then libvirt loses its checkpoint metadata and a third, incremental backup redefines the
checkpoint from the bitmaps QEMU still holds. Judged from outside the agent: the chain's files (qemu-img info: the incremental's backing file
is the full one; its allocation is about the change, not the disk), libvirt's checkpoints, that
no export socket or scratch file is left, and ``cna-ctl vm restore --from DIR`` giving an image
that ``qemu-img compare`` finds identical to the guest's disk at the incremental point.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import grpc
import pytest

from cna_agent.api import pb
from support.console import AgentConsole
from support.guests import guest_spec, serial_log
from support.migration import restart
from support.operations import ok, wait
from support.tools import REPO

vm = pb.vm_pb2
bk = pb.backup_pb2
MiB = 1 << 20
pytestmark = pytest.mark.slow
CTL = [sys.executable, "-m", "cna_agent.cli.main"]


def _run(*argv: str) -> str:
    p = subprocess.run(list(argv), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, f"{argv}: {p.stderr}"
    return p.stdout


def _ctl(agent, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CTL, "--socket", str(agent.socket), *args], capture_output=True, text=True, timeout=300)


def _allocated(path: Path) -> int:
    """Bytes of guest data the qcow2 file itself holds (not its backing chain)."""
    out = json.loads(_run("qemu-img", "map", "--output=json", "-f", "qcow2", str(path)))
    return sum(e["length"] for e in out if e["data"] and e["depth"] == 0)


def test_full_then_incremental_backup_restores_to_the_guests_disk_byte_for_byte(vm_agent_factory) -> None:
    ds = Path(tempfile.mkdtemp(prefix="bk", dir="/tmp"))
    agent = vm_agent_factory(image_dirs=(str(REPO / ".cache" / "guests"),),
                             extra_config=f'[storage.datastores.ds]\ntype = "dir"\npath = "{ds}"\n')
    disk = ds / "bk1" / "data.qcow2"
    disk.parent.mkdir()
    _run("qemu-img", "create", "-q", "-f", "qcow2", str(disk), "64M")
    _run("qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 64M", str(disk))
    out = Path(tempfile.mkdtemp(prefix="bko", dir="/tmp"))
    chain_dir = out / "chain"
    with agent.channel() as ch:
        vms, backups = pb.vm_pb2_grpc.VmServiceStub(ch), pb.backup_pb2_grpc.BackupServiceStub(ch)
        spec = guest_spec("x86_64", "bk1", memory_mib=128, disks=[vm.DiskSpec(volume="ds/bk1/data.qcow2")])
        uuid = ok(ch, vms.CreateVm(vm.CreateVmRequest(spec=spec, start=True), timeout=60), into=vm.Vm()).uuid
        serial_log(agent, uuid).wait_for(r"CNA-GUEST-READY", timeout=120)

        # refused, naming the field, nothing started: an unknown disk, an unknown checkpoint
        with pytest.raises(grpc.RpcError) as err:
            backups.StartBackup(bk.StartBackupRequest(vm=uuid, disks=["vdz"]), timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "disks[0]" in err.value.details()
        refused = wait(ch, backups.StartBackup(bk.StartBackupRequest(vm=uuid, incremental_from="nope"), timeout=30))
        assert refused.error.code == grpc.StatusCode.FAILED_PRECONDITION.value[0] and "nope" in refused.error.message
        with pytest.raises(grpc.RpcError) as err:  # no guest agent to freeze the file systems
            backups.StartBackup(bk.StartBackupRequest(vm=uuid, quiesce=True), timeout=30)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "quiesce" in err.value.details()
        with pytest.raises(grpc.RpcError) as err:
            backups.GetBackup(bk.GetBackupRequest(vm=uuid), timeout=30)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        no_chain = _ctl(agent, "vm", "backup", "bk1", "--to", str(chain_dir), "--incremental")
        assert no_chain.returncode != 0 and "no full backup" in no_chain.stderr

        full = _ctl(agent, "vm", "backup", "bk1", "--to", str(chain_dir))
        assert full.returncode == 0, full.stderr
        assert "full backup 1 of bk1" in full.stdout

        # the guest overwrites 1 MiB at 10 MiB with its own random data, past its page cache
        with AgentConsole(ch, uuid) as con:
            con.send("\n")
            con.wait_for(r"cna# ", timeout=60, partial=True)
            rc, text = con.run("dd if=/dev/urandom of=/dev/vda bs=64k seek=160 count=16 oflag=direct conv=notrunc "
                               "2>/dev/null; sync; echo wrote-$((6*7))", timeout=60)
            assert rc == 0 and "wrote-42" in text, text

        inc = _ctl(agent, "vm", "backup", "bk1", "--to", str(chain_dir), "--incremental")
        assert inc.returncode == 0, inc.stderr
        chain = json.loads((chain_dir / "chain.json").read_text())
        first, second = chain["backups"]
        assert second["incremental_from"] == first["checkpoint"] and chain["vm_uuid"] == uuid
        full_file, inc_file = chain_dir / first["files"]["vda"], chain_dir / second["files"]["vda"]
        info = json.loads(_run("qemu-img", "info", "--output=json", str(inc_file)))
        assert info["backing-filename"] == full_file.name
        assert _allocated(full_file) == 64 * MiB
        assert 1 * MiB <= _allocated(inc_file) <= 2 * MiB  # the change (and the bitmap's granularity), not the disk
        assert first["bytes"] == 64 * MiB and 1 * MiB <= second["bytes"] <= 2 * MiB, chain

        # libvirt has both checkpoints; the job is over: no export socket, no scratch files
        listed = backups.ListCheckpoints(bk.ListCheckpointsRequest(vm=uuid), timeout=30).checkpoints
        assert [c.name for c in listed] == [first["checkpoint"], second["checkpoint"]]
        assert listed[1].parent == listed[0].name and list(listed[1].disks) == ["vda"]
        assert not list((agent.dir / "state" / "backup").glob("*/*"))
        assert not list(agent.dir.rglob(f"{uuid}.nbd"))

    # libvirt loses its checkpoint metadata (here: its files removed while the agent is down,
    # as a migration or a lost libvirt state directory would); QEMU still holds the bitmaps, so
    # the next incremental redefines the checkpoint and goes on with the chain
    agent.stop(signal.SIGKILL)
    files = list((agent.dir / "state" / "libvirt").rglob("checkpoint/*/*.xml"))
    assert len(files) == 2, files
    for f in files:
        f.unlink()
    agent = restart(agent)
    try:
        with agent.channel() as ch:
            vms, backups = pb.vm_pb2_grpc.VmServiceStub(ch), pb.backup_pb2_grpc.BackupServiceStub(ch)
            assert not backups.ListCheckpoints(bk.ListCheckpointsRequest(vm=uuid), timeout=30).checkpoints
            with AgentConsole(ch, uuid) as con:
                con.send("\n")
                con.wait_for(r"cna# ", timeout=60, partial=True)
                rc, text = con.run("dd if=/dev/urandom of=/dev/vda bs=64k seek=600 count=4 oflag=direct conv=notrunc "
                                   "2>/dev/null; sync; echo wrote-$((6*7))", timeout=60)
                assert rc == 0 and "wrote-42" in text, text
            again = _ctl(agent, "vm", "backup", "bk1", "--to", str(chain_dir), "--incremental")
            assert again.returncode == 0, again.stderr + agent.log_text()[-3000:]
            assert "event=vm.checkpoint_redefined" in agent.log_text()
            third = json.loads((chain_dir / "chain.json").read_text())["backups"][2]
            assert third["incremental_from"] == second["checkpoint"] and 256 * 1024 <= third["bytes"] <= 1 * MiB, third

            # the guest's disk as it is now (it wrote nothing since) equals the restored chain
            _restore_and_compare(ch, vms, agent, uuid, chain_dir, out, disk, full_file)
    finally:
        agent.stop()


def _restore_and_compare(ch, vms, agent, uuid: str, chain_dir: Path, out: Path, disk: Path, full_file: Path) -> None:
    """Stop the guest; the chain restored by cna-ctl equals its disk, byte for byte, and the
    full backup alone is the disk before the guest's writes."""
    ok(ch, vms.ShutdownVm(vm.ShutdownVmRequest(vm=uuid, hard=True), timeout=60))
    restored = out / "restored.qcow2"
    done = _ctl(agent, "vm", "restore", "bk1", "--from", str(chain_dir), "--to", str(restored))
    assert done.returncode == 0, done.stderr
    _run("qemu-img", "compare", "-q", "-f", "qcow2", "-F", "qcow2", str(restored), str(disk))
    before = subprocess.run(["qemu-img", "compare", "-q", str(full_file), str(disk)], capture_output=True, timeout=60)
    assert before.returncode == 1  # differs: what the guest wrote after it
    untouched = _run("qemu-io", "-r", "-f", "qcow2", "-c", "read -P 0x5a 0 10M", "-c", "read -P 0x5a 11M 27136k",
                     "-c", "read -P 0x5a 38656k 26880k", str(restored))
    assert "Pattern verification failed" not in untouched, untouched
    ok(ch, vms.DeleteVm(vm.DeleteVmRequest(vm=uuid), timeout=60))
