"""Live migration between two real agents, each on its own libvirtd (two "hosts" in mount
namespaces, tools/testbed.py), over the agent API as the VRM calls it (MigrateVm on the source).

Judged from outside the agents: each host's libvirt (where the domain is defined and running),
QEMU's processes, and the guest itself (its serial console answers through the destination agent
after the move: a disk hot-plugged through the destination agent is announced by the guest on
its serial console, with no boot in between).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

import grpc
import pytest

from cna_agent.api import pb
from support.guests import guest_spec, serial_log
from support.hosts import domain_state
from support.migration import qemu_pids
from support.operations import history, ok, wait

vm = pb.vm_pb2
pytestmark = [pytest.mark.skipif(os.geteuid() != 0, reason="needs root (two libvirtds)"), pytest.mark.slow]


def test_a_running_guest_moves_to_the_other_host_and_keeps_running(two_agents) -> None:
    a, b, hosts, base = two_agents
    data = base / "img" / "data.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(data), "16M"], check=True, timeout=60)
    with a.channel() as cha, b.channel() as chb:
        vms_a, vms_b = pb.vm_pb2_grpc.VmServiceStub(cha), pb.vm_pb2_grpc.VmServiceStub(chb)
        created = ok(cha, vms_a.CreateVm(vm.CreateVmRequest(spec=guest_spec("x86_64", "mover"), start=True), timeout=60),
                     into=vm.Vm())
        uuid = created.uuid
        serial_log(a, uuid).wait_for(r"CNA-GUEST-READY boot=", timeout=150)
        # bad input first: named, nothing moves
        with pytest.raises(grpc.RpcError) as err:
            vms_a.MigrateVm(vm.MigrateVmRequest(vm=uuid, destination="nowhere"), timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "destination" in err.value.details()
        with pytest.raises(grpc.RpcError) as err:
            vms_a.MigrateVm(vm.MigrateVmRequest(vm=uuid, destination=f"127.0.0.1:{b.tcp_port}",
                                                policy=vm.MigrationPolicy(completion_action="explode")), timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "policy.completion_action" in err.value.details()

        t0 = time.monotonic()
        op = vms_a.MigrateVm(vm.MigrateVmRequest(request_id="mig-1", vm=uuid, destination=f"127.0.0.1:{b.tcp_port}"), timeout=60)
        seen = history(cha, op, timeout=180)
        last = seen[-1]
        assert last.state == pb.operations_pb2.OPERATION_STATE_SUCCEEDED, last.error
        percents = [o.progress.percent for o in seen]
        assert percents == sorted(percents) and percents[-1] == 100
        moved = vm.Vm()
        last.response.Unpack(moved)
        assert moved.uuid == uuid and moved.status.state == vm.VM_STATE_RUNNING
        elapsed = time.monotonic() - t0

        # libvirt on each host: persistent and running on B, gone from A
        assert domain_state(hosts.b.uri, uuid) == (True, True)
        assert domain_state(hosts.a.uri, uuid) is None
        assert [v.uuid for v in vms_b.ListVms(vm.ListVmsRequest(), timeout=30).vms] == [uuid]
        assert not vms_a.ListVms(vm.ListVmsRequest(), timeout=30).vms
        # the same guest, still running on B: a disk plugged through B's agent is announced by the
        # guest in B's serial log, which shows no boot (the log starts at the move)
        storage_b = pb.storage_pb2_grpc.StorageServiceStub(chb)
        ok(chb, storage_b.AttachDisk(pb.storage_pb2.AttachDiskRequest(vm=uuid, disk=vm.DiskSpec(volume=str(data))), timeout=60))
        log_b = serial_log(b, uuid)
        log_b.wait_for(r"CNA-HOTPLUG add block vda", timeout=60)
        assert "CNA-GUEST-READY" not in log_b.text()
        print(f"migration over the agents: {elapsed:.2f} s")
        ok(chb, vms_b.DeleteVm(vm.DeleteVmRequest(vm=uuid, force=True), timeout=60))


def _start_slow_migration(cha, vms_a, uuid: str, b, **policy) -> object:
    """A migration held to 1 MiB/s, so it is still running when the test acts on it."""
    op = vms_a.MigrateVm(vm.MigrateVmRequest(vm=uuid, destination=f"127.0.0.1:{b.tcp_port}",
                                             policy=vm.MigrationPolicy(bandwidth_mib_s=1, **policy)), timeout=60)
    ops = pb.operations_pb2_grpc.OperationsServiceStub(cha)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        cur = ops.GetOperation(pb.operations_pb2.GetOperationRequest(id=op.id), timeout=10)
        if cur.progress.percent >= 10 and cur.progress.stage.startswith("migrating"):
            return cur
        assert cur.state == pb.operations_pb2.OPERATION_STATE_RUNNING, cur
        time.sleep(0.2)
    raise AssertionError(f"the migration did not get going: {cur}")


def _stays_on_a(hosts, vms_a, vms_b, uuid: str) -> None:
    """After a failed or cancelled move: running and persistent on A, nothing on B (libvirt,
    QEMU, the agent's list), within 30 s."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and (domain_state(hosts.b.uri, uuid) is not None or qemu_pids(uuid, incoming=True)):
        time.sleep(0.5)
    assert domain_state(hosts.a.uri, uuid) == (True, True)
    assert domain_state(hosts.b.uri, uuid) is None and not qemu_pids(uuid, incoming=True)
    assert vms_a.GetVm(vm.GetVmRequest(vm=uuid), timeout=30).status.state == vm.VM_STATE_RUNNING
    assert not vms_b.ListVms(vm.ListVmsRequest(), timeout=30).vms


def test_cancel_a_stalled_destination_and_a_destination_that_cannot_take_it_leave_the_vm_where_it_was(two_agents) -> None:
    a, b, hosts, base = two_agents
    with a.channel() as cha, b.channel() as chb:
        vms_a, vms_b = pb.vm_pb2_grpc.VmServiceStub(cha), pb.vm_pb2_grpc.VmServiceStub(chb)
        ops = pb.operations_pb2_grpc.OperationsServiceStub(cha)
        created = ok(cha, vms_a.CreateVm(vm.CreateVmRequest(spec=guest_spec("x86_64", "stayer"), start=True), timeout=60),
                     into=vm.Vm())
        uuid = created.uuid
        serial_log(a, uuid).wait_for(r"CNA-GUEST-READY boot=", timeout=150)

        # 1. CancelOperation mid-way: libvirt's job is aborted, the VM stays on A, B is clean
        cur = _start_slow_migration(cha, vms_a, uuid, b)
        ops.CancelOperation(pb.operations_pb2.CancelOperationRequest(id=cur.id), timeout=30)
        done = wait(cha, cur, timeout=90)
        assert done.error.code == grpc.StatusCode.CANCELLED.value[0], done
        _stays_on_a(hosts, vms_a, vms_b, uuid)

        # 2. The destination's QEMU stops answering (SIGSTOP): no progress for the policy's
        #    timeout aborts the job. B's libvirt cannot clean up a stopped QEMU by itself (its
        #    Finish waits on that QEMU's monitor), so A's agent tells B's agent to drop the
        #    shell as soon as A's QEMU has ended its stream, not after its 60 s wait for libvirt
        #    (the operation then took 82 s after the stop; now about 25 s)
        cur = _start_slow_migration(cha, vms_a, uuid, b, progress_timeout_s=5)
        for pid in qemu_pids(uuid, incoming=True):
            os.kill(pid, signal.SIGSTOP)
        stopped = time.monotonic()
        done = wait(cha, cur, timeout=120)
        assert done.error.code == grpc.StatusCode.DEADLINE_EXCEEDED.value[0] and "no progress" in done.error.message, done
        assert time.monotonic() - stopped < 55, "the hung destination was released only after the source's 60 s wait"
        _stays_on_a(hosts, vms_a, vms_b, uuid)

        # 3. A destination without the VM's port group refuses while preparing, naming it; the
        #    VM stays on A and B claims nothing
        wired = ok(cha, vms_a.CreateVm(vm.CreateVmRequest(spec=guest_spec("x86_64", "wired", nics=[vm.NicSpec(port_group=a.extra["pg"])]),
                                                          start=True), timeout=60), into=vm.Vm())
        op = wait(cha, vms_a.MigrateVm(vm.MigrateVmRequest(vm=wired.uuid, destination=f"127.0.0.1:{b.tcp_port}"), timeout=60),
                  timeout=60)
        assert op.error.code == grpc.StatusCode.FAILED_PRECONDITION.value[0] and a.extra["pg"] in op.error.message, op
        _stays_on_a(hosts, vms_a, vms_b, wired.uuid)
