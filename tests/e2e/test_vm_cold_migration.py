"""Cold migration between two real agents, each on its own libvirtd (two "hosts" in mount
namespaces), over the agent API as the VRM calls it: MigrateVm on the source for a shut-off VM.

Each agent has a datastore ``local`` of its own (a different directory per host: its volumes must
be copied) and a datastore ``shared`` that both see at the same path (not copied). Judged from
outside the agents: each host's libvirt (where the domain is defined), the files (``qemu-img
compare`` against a copy taken before the move, the source's copy gone, the shared file the same
inode), and the guest booted on B through B's agent reading the moved disk on its console.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import time
from pathlib import Path

import grpc
import pytest

from cna_agent.api import pb
from support.console import AgentConsole, facts
from support.guests import guest_spec, serial_log
from support.agent import start_agent
from support.hosts import domain_state
from support.migration import agent_config, make_base, restart, tear_down
from support.operations import history, ok, wait

vm = pb.vm_pb2
ops_pb = pb.operations_pb2
pytestmark = [pytest.mark.skipif(os.geteuid() != 0, reason="needs root (two libvirtds)"), pytest.mark.slow]
MiB = 1 << 20


@pytest.fixture
def cold_agents(two_hosts, libvirt_caps_cache):
    """One agent per host; datastore ``local`` is a different directory on each host, ``shared``
    the same directory on both."""
    import libvirt

    libvirt.registerErrorHandler(lambda _c, _e: None, None)
    base = make_base("cm")
    for d in ("a-local", "b-local", "shared"):
        (base / d).mkdir(mode=0o711)

    def extra(local: Path) -> str:
        return (f'[storage.datastores.local]\ntype = "dir"\npath = "{local}"\n'
                f'[storage.datastores.shared]\ntype = "dir"\npath = "{base / "shared"}"\n')

    a = start_agent(base / "a", None, extra_config=agent_config(two_hosts.a, base / "img", extra(base / "a-local")))
    b = start_agent(base / "b", None, extra_config=agent_config(two_hosts.b, base / "img", extra(base / "b-local")))
    yield a, b, two_hosts, base
    tear_down((a, b), (two_hosts.a, two_hosts.b), base)


def _files(root: Path) -> list[str]:
    """Every file under a datastore root but the datastore monitor's probe file."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.name != ".cna-probe")


def _run(*argv: str) -> str:
    p = subprocess.run(list(argv), capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, f"{argv}: {p.stderr}"
    return p.stdout


def _copying(ops, op_id: str):
    """The move's operation once it has copied 2 MiB (it must still be running then)."""
    deadline = time.monotonic() + 60
    while True:
        cur = ops.GetOperation(ops_pb.GetOperationRequest(id=op_id), timeout=10)
        assert cur.state == ops_pb.OPERATION_STATE_RUNNING and time.monotonic() < deadline, cur
        if cur.progress.stage.startswith("copying") and cur.progress.bytes_done >= 2 * MiB:
            return cur
        time.sleep(0.1)


def _migrate(vms, uuid: str, b, **kw):
    return vms.MigrateVm(vm.MigrateVmRequest(vm=uuid, destination=f"127.0.0.1:{b.tcp_port}", **kw), timeout=60)


def test_a_stopped_vm_moves_with_its_local_disk_copied_and_boots_on_the_other_host(cold_agents) -> None:
    a, b, hosts, base = cold_agents
    # a local qcow2 data disk with known patterns (and holes between them), a shared raw disk
    data = base / "a-local" / "cold1" / "data.qcow2"
    data.parent.mkdir(mode=0o711)
    _run("qemu-img", "create", "-q", "-f", "qcow2", str(data), "64M")
    _run("qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 4M", "-c", "write -P 0xa5 40M 1M", str(data))
    size = data.stat().st_size
    reference = base / "reference.qcow2"
    _run("cp", "--sparse=always", str(data), str(reference))
    shared = base / "shared" / "cold1" / "extra.raw"
    shared.parent.mkdir(mode=0o711)
    with open(shared, "wb") as f:
        f.truncate(8 * MiB)
        f.write(b"shared-disk")
    shared_inode = shared.stat().st_ino

    with a.channel() as cha, b.channel() as chb:
        vms_a, vms_b = pb.vm_pb2_grpc.VmServiceStub(cha), pb.vm_pb2_grpc.VmServiceStub(chb)
        spec = guest_spec("x86_64", "cold1", disks=[vm.DiskSpec(volume="local/cold1/data.qcow2"),
                                                    vm.DiskSpec(volume="shared/cold1/extra.raw")])
        uuid = ok(cha, vms_a.CreateVm(vm.CreateVmRequest(spec=spec), timeout=60), into=vm.Vm()).uuid
        assert domain_state(hosts.a.uri, uuid) == (True, False)

        # 1. refused by the destination while preparing (B has a VM of that name): nothing moves,
        #    B holds nothing, A's VM and file are as they were
        other = ok(chb, vms_b.CreateVm(vm.CreateVmRequest(spec=guest_spec("x86_64", "cold1")), timeout=60), into=vm.Vm())
        failed = wait(cha, _migrate(vms_a, uuid, b), timeout=120)
        assert failed.kind == "vm.migrate_cold" and failed.error.code == grpc.StatusCode.FAILED_PRECONDITION.value[0], failed
        assert "already exists" in failed.error.message and "cold1" in failed.error.message
        assert domain_state(hosts.a.uri, uuid) == (True, False)
        assert _files(base / "b-local") == []
        _run("qemu-img", "compare", "-q", str(reference), str(data))
        ok(chb, vms_b.DeleteVm(vm.DeleteVmRequest(vm=other.uuid), timeout=60))

        # 2. the move: progress in bytes, the operation ends with the VM as B reports it
        t0 = time.monotonic()
        seen = history(cha, _migrate(vms_a, uuid, b, request_id="cold-1"), timeout=300)
        elapsed = time.monotonic() - t0
        last = seen[-1]
        assert last.state == ops_pb.OPERATION_STATE_SUCCEEDED, last.error
        percents = [o.progress.percent for o in seen]
        assert percents == sorted(percents) and percents[-1] == 100
        totals = {o.progress.bytes_total for o in seen if o.progress.bytes_total}
        assert totals == {size}, seen  # only the local disk is copied
        moved = vm.Vm()
        last.response.Unpack(moved)
        assert moved.uuid == uuid and moved.status.state == vm.VM_STATE_STOPPED

        # libvirt: persistent (and stopped) on B, gone from A
        assert domain_state(hosts.b.uri, uuid) == (True, False)
        assert domain_state(hosts.a.uri, uuid) is None
        assert not vms_a.ListVms(vm.ListVmsRequest(), timeout=30).vms
        # the files: B's copy has the same content (and is a standalone qcow2 under B's root),
        # A's copy is gone, the shared disk was used in place
        copy = base / "b-local" / "cold1" / "data.qcow2"
        _run("qemu-img", "compare", "-q", "-f", "qcow2", "-F", "qcow2", str(reference), str(copy))
        out = _run("qemu-io", "-r", "-f", "qcow2", "-c", "read -P 0x5a 0 4M", "-c", "read -P 0xa5 40M 1M",
                   "-c", "read -P 0 4M 36M", str(copy))
        assert "Pattern verification failed" not in out, out
        assert "backing-filename" not in _run("qemu-img", "info", "--output=json", "-f", "qcow2", str(copy))
        assert _files(base / "b-local") == ["cold1/data.qcow2"] and _files(base / "a-local") == []
        assert shared.stat().st_ino == shared_inode and _files(base / "shared") == ["cold1/extra.raw"]
        xml_b = _run("virsh", "-c", hosts.b.uri, "dumpxml", uuid)
        assert str(copy) in xml_b and str(shared) in xml_b and str(base / "a-local") not in xml_b

        # 3. B's agent starts it: the guest boots on B, sees both disks and reads the pattern
        ok(chb, vms_b.StartVm(vm.VmActionRequest(vm=uuid), timeout=60))
        log_b = serial_log(b, uuid)
        log_b.wait_for(r"CNA-GUEST-READY boot=", timeout=150)
        found = facts(log_b.text())
        assert found["block"] == "vda,vdb" and found["block.vda.sectors"] == str(64 * MiB // 512), found
        assert found["block.vdb.sectors"] == str(8 * MiB // 512)
        with AgentConsole(chb, uuid) as con:  # and reads the moved disk's pattern
            con.send("\n")
            con.wait_for(r"cna# ", timeout=60, partial=True)
            rc, out = con.run("dd if=/dev/vda bs=1M count=4 iflag=direct 2>/dev/null | sha256sum", timeout=60)
        assert rc == 0 and hashlib.sha256(b"\x5a" * 4 * MiB).hexdigest() in out, out
        print(f"cold migration over the agents: {elapsed:.2f} s for a {size >> 20} MiB qcow2")
        ok(chb, vms_b.DeleteVm(vm.DeleteVmRequest(vm=uuid, force=True), timeout=60))


def test_a_cancel_mid_copy_leaves_the_vm_on_the_source_and_no_partial_file_on_the_destination(cold_agents) -> None:
    a, b, hosts, base = cold_agents
    disk = base / "a-local" / "cold2" / "root.raw"
    disk.parent.mkdir(mode=0o711)
    disk.write_bytes(os.urandom(24 * MiB))
    before = hashlib.sha256(disk.read_bytes()).hexdigest()
    with a.channel() as cha, b.channel() as chb:
        vms_a, vms_b = pb.vm_pb2_grpc.VmServiceStub(cha), pb.vm_pb2_grpc.VmServiceStub(chb)
        ops = pb.operations_pb2_grpc.OperationsServiceStub(cha)
        spec = guest_spec("x86_64", "cold2", disks=[vm.DiskSpec(volume="local/cold2/root.raw")])
        uuid = ok(cha, vms_a.CreateVm(vm.CreateVmRequest(spec=spec), timeout=60), into=vm.Vm()).uuid
        # held to 2 MiB/s, so the copy is still running when the cancel comes
        op = _migrate(vms_a, uuid, b, policy=vm.MigrationPolicy(bandwidth_mib_s=2))
        cur = _copying(ops, op.id)
        assert any(".cna-tmp-" in f for f in _files(base / "b-local")), _files(base / "b-local")  # mid-copy
        ops.CancelOperation(ops_pb.CancelOperationRequest(id=op.id), timeout=30)
        done = wait(cha, cur, timeout=90)
        assert done.error.code == grpc.StatusCode.CANCELLED.value[0], done
        # A: as before; B: no definition, no partial or finished file, no VM in its list
        deadline = time.monotonic() + 30
        while _files(base / "b-local") and time.monotonic() < deadline:
            time.sleep(0.3)
        assert _files(base / "b-local") == []
        assert domain_state(hosts.a.uri, uuid) == (True, False) and domain_state(hosts.b.uri, uuid) is None
        assert hashlib.sha256(disk.read_bytes()).hexdigest() == before
        assert vms_a.GetVm(vm.GetVmRequest(vm=uuid), timeout=30).status.state == vm.VM_STATE_STOPPED
        assert not vms_b.ListVms(vm.ListVmsRequest(), timeout=30).vms


def test_a_source_agent_killed_mid_move_is_decided_from_both_hosts_after_its_restart(cold_agents) -> None:
    """SIGKILL of A's agent (1) mid-copy: after its restart the move ends ABORTED, the VM is still
    defined on A only, B drops what it received; (2) at the crash point right after B defined the
    VM: the commit point had passed, so the restarted agent completes the move (A undefined, A's
    copied volume deleted) and the operation SUCCEEDED. Judged from each host's libvirt and files."""
    a, b, hosts, base = cold_agents
    disk = base / "a-local" / "cold3" / "root.raw"
    disk.parent.mkdir(mode=0o711)
    disk.write_bytes(os.urandom(24 * MiB))
    before = hashlib.sha256(disk.read_bytes()).hexdigest()
    current = a
    try:
        with current.channel() as cha:
            vms_a = pb.vm_pb2_grpc.VmServiceStub(cha)
            spec = guest_spec("x86_64", "cold3", disks=[vm.DiskSpec(volume="local/cold3/root.raw")])
            uuid = ok(cha, vms_a.CreateVm(vm.CreateVmRequest(spec=spec), timeout=60), into=vm.Vm()).uuid
            ops = pb.operations_pb2_grpc.OperationsServiceStub(cha)
            op = _migrate(vms_a, uuid, b, request_id="cold-kill-1", policy=vm.MigrationPolicy(bandwidth_mib_s=2))
            _copying(ops, op.id)
        current = restart(current)  # SIGKILL mid-copy
        with current.channel() as cha:
            done = wait(cha, pb.operations_pb2_grpc.OperationsServiceStub(cha).GetOperation(
                ops_pb.GetOperationRequest(id=op.id), timeout=10), timeout=60)
            assert done.error.code == grpc.StatusCode.ABORTED.value[0], done
            assert "still defined here" in done.error.message and "nothing was redone" in done.error.message
        deadline = time.monotonic() + 60  # B drops its partial copy once told (or once it lapses)
        while _files(base / "b-local") and time.monotonic() < deadline:
            time.sleep(0.3)
        assert _files(base / "b-local") == []
        assert domain_state(hosts.a.uri, uuid) == (True, False) and domain_state(hosts.b.uri, uuid) is None
        assert hashlib.sha256(disk.read_bytes()).hexdigest() == before

        # (2) armed at the point right after B defined it
        current = restart(current, env={"CNA_FAILPOINTS": "vm.migrate_cold.defined"})
        with current.channel() as cha:
            try:
                op = _migrate(pb.vm_pb2_grpc.VmServiceStub(cha), uuid, b, request_id="cold-kill-2")
            except grpc.RpcError:
                op = None  # the agent died before it answered
        assert current.proc.wait(timeout=120) == -signal.SIGKILL
        assert domain_state(hosts.b.uri, uuid) == (True, False) and domain_state(hosts.a.uri, uuid) == (True, False)
        current = restart(current)
        with current.channel() as cha:
            listed = pb.operations_pb2_grpc.OperationsServiceStub(cha).ListOperations(
                ops_pb.ListOperationsRequest(kinds=["vm.migrate_cold"]), timeout=30).operations
            done = next(o for o in listed if o.request_id == "cold-kill-2")
            assert done.state == ops_pb.OPERATION_STATE_SUCCEEDED, done
            assert not pb.vm_pb2_grpc.VmServiceStub(cha).ListVms(vm.ListVmsRequest(), timeout=30).vms
        assert domain_state(hosts.a.uri, uuid) is None and domain_state(hosts.b.uri, uuid) == (True, False)
        assert _files(base / "a-local") == [] and _files(base / "b-local") == ["cold3/root.raw"]
        copy = base / "b-local" / "cold3" / "root.raw"
        assert hashlib.sha256(copy.read_bytes()).hexdigest() == before
        with b.channel() as chb:
            ok(chb, pb.vm_pb2_grpc.VmServiceStub(chb).DeleteVm(vm.DeleteVmRequest(vm=uuid, force=True), timeout=60))
    finally:
        if current is not a:
            current.stop()
