"""kill -9 of the source agent and of the destination agent at three points each of a live
migration, between two real agents on two libvirtds (tools/testbed.py ``hosts``).

The three points on each side: two named crash points (cna_agent/failpoints.py: the agent
SIGKILLs itself there, for windows too short to hit from outside) and one SIGKILL sent from
outside while libvirt's job moves memory. After each: exactly one running copy of the guest,
on the host libvirt says; the operation, asked for again with the same request id (as a VRM
retries a call whose answer was lost), ends with the true outcome; no claims are left on the
host the VM is not on (read from the agents' SQLite files); each agent's event log has no gap.

The guest has a dedicated CPU, and the two hosts reserve different CPUs for themselves (A
keeps CPU 0, B keeps CPU 1), so where the VM lands its vCPU thread must be pinned to the CPU
*that* host's planner chose (read from /proc), never to the source's pin copied verbatim.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import grpc
import pytest

from cna_agent.api import pb
from cna_agent.host.cpulist import parse_cpulist
from support.agent import start_agent
from support.guests import guest_spec, serial_log
from support.migration import agent_config, claims, domain, make_base, qemu_pids, restart, tear_down, wait_until
from support.operations import wait

vm = pb.vm_pb2
ops_pb = pb.operations_pb2
pytestmark = [pytest.mark.skipif(os.geteuid() != 0 or (os.cpu_count() or 1) < 2,
                                 reason="needs root (two libvirtds) and 2 CPUs"), pytest.mark.slow]
FAILPOINTS = "CNA_FAILPOINTS"


class Pair:
    """Agents ``a`` and ``b`` (restartable), one per host; A reserves CPU 0, B CPU 1."""

    def __init__(self, hosts, base: Path) -> None:
        self.hosts, self.base = hosts, base
        self.cfg = {"a": agent_config(hosts.a, base / "img", '[host]\nreserved_cpus = "0"\n'),
                    "b": agent_config(hosts.b, base / "img", '[host]\nreserved_cpus = "1"\n')}
        self.agents = {n: start_agent(base / n, None, extra_config=self.cfg[n]) for n in ("a", "b")}

    def __getitem__(self, name: str):
        return self.agents[name]

    def restart(self, name: str, failpoint: str = "") -> None:
        self.agents[name] = restart(self.agents[name], env={FAILPOINTS: failpoint} if failpoint else None)

    def uri(self, name: str) -> str:
        return getattr(self.hosts, name).uri

    def vms(self, name: str):
        return pb.vm_pb2_grpc.VmServiceStub(self.agents[name].channel())


@pytest.fixture
def pair(two_hosts):
    import libvirt

    libvirt.registerErrorHandler(lambda _c, _e: None, None)
    base = make_base("mf")
    p = Pair(two_hosts, base)
    yield p
    tear_down(p.agents.values(), two_hosts, base)


def _request(p: Pair, src: str, dst: str, uuid: str, rid: str, **policy) -> vm.MigrateVmRequest:
    return vm.MigrateVmRequest(request_id=rid, vm=uuid, destination=f"127.0.0.1:{p[dst].tcp_port}",
                               policy=vm.MigrationPolicy(**policy))


def _send(p: Pair, src: str, req) -> ops_pb.Operation | None:
    """MigrateVm on ``src``; None when the agent died before it answered."""
    try:
        with p[src].channel() as ch:
            return pb.vm_pb2_grpc.VmServiceStub(ch).MigrateVm(req, timeout=60)
    except grpc.RpcError as exc:
        assert exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED), exc
        return None


def _outcome(p: Pair, src: str, req, timeout: float = 180) -> ops_pb.Operation:
    """The operation of ``req``, asked for again with its request id, once it is done."""
    with p[src].channel() as ch:
        op = pb.vm_pb2_grpc.VmServiceStub(ch).MigrateVm(req, timeout=60)
        return wait(ch, op, timeout=timeout)


def _died(agent, timeout: float = 60) -> None:
    agent.proc.wait(timeout=timeout)
    assert agent.proc.returncode == -signal.SIGKILL, agent.proc.returncode


def _moving(p: Pair, src: str, op: ops_pb.Operation) -> None:
    """Wait until the operation reports libvirt's job moving memory."""
    with p[src].channel() as ch:
        stub = pb.operations_pb2_grpc.OperationsServiceStub(ch)
        def moving() -> bool:
            cur = stub.GetOperation(ops_pb.GetOperationRequest(id=op.id), timeout=10)
            assert not cur.done, (cur.state, cur.error)
            return cur.progress.stage.startswith("migrating") and cur.progress.percent >= 10

        wait_until(moving, 90, "the job moving memory", 0.2)


def _job_running(uri: str, uuid: str) -> bool:
    import libvirt

    conn = libvirt.open(uri)
    try:
        return conn.lookupByUUIDString(uuid).jobInfo()[0] in (libvirt.VIR_DOMAIN_JOB_BOUNDED, libvirt.VIR_DOMAIN_JOB_UNBOUNDED)
    finally:
        conn.close()


def _speed_up(uri: str, uuid: str) -> None:
    import libvirt

    conn = libvirt.open(uri)
    try:
        conn.lookupByUUIDString(uuid).migrateSetMaxSpeed(1000, 0)
    finally:
        conn.close()


def _one_copy_on(p: Pair, where: str, uuid: str) -> None:
    """Running and persistent on ``where`` only; one QEMU process of the guest on the machine;
    its vCPU pinned to the CPU the host's planner chose; no claims left on the other host."""
    other = "b" if where == "a" else "a"
    wait_until(lambda: domain(p.uri(other), uuid) is None and len(qemu_pids(uuid)) == 1, 30,
               f"the VM only on {where}: {domain(p.uri(other), uuid)}, qemu {qemu_pids(uuid)}")
    assert domain(p.uri(where), uuid) == (True, True)
    wait_until(lambda: claims(p[other], uuid) == {"placements": 0, "prepared": 0}, 30,
               f"{other} holding nothing for the VM: {claims(p[other], uuid)}")
    assert claims(p[where], uuid) == {"placements": 1, "prepared": 0}
    (pid,) = qemu_pids(uuid)
    expected = (1,) if where == "a" else (0,)  # each host keeps its other CPU for itself
    assert _vcpu_cpus(pid) == expected, f"vCPU of the VM on {where} may run on {_vcpu_cpus(pid)}, expected {expected}"
    with p[where].channel() as ch:
        assert pb.vm_pb2_grpc.VmServiceStub(ch).GetVm(vm.GetVmRequest(vm=uuid), timeout=30).status.state == vm.VM_STATE_RUNNING


def _vcpu_cpus(pid: int) -> tuple[int, ...]:
    for task in Path(f"/proc/{pid}/task").iterdir():
        if (task / "comm").read_text().strip() == "CPU 0/TCG":
            for line in (task / "status").read_text().splitlines():
                if line.startswith("Cpus_allowed_list:"):
                    return parse_cpulist(line.split(":", 1)[1])
    raise AssertionError(f"no vCPU thread in QEMU {pid}")


def _events_gap_free(agent) -> list:
    with agent.channel() as ch:
        stub = pb.events_pb2_grpc.EventServiceStub(ch)
        events, after = [], 0
        while True:
            got = stub.ListEvents(pb.events_pb2.ListEventsRequest(after_sequence=after, limit=500), timeout=30).events
            if not got:
                break
            events += got
            after = got[-1].sequence
    seqs = [e.sequence for e in events]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), "a gap in the event log"
    return events


def _boot(p: Pair, name: str) -> str:
    with p["a"].channel() as ch:
        op = pb.vm_pb2_grpc.VmServiceStub(ch).CreateVm(vm.CreateVmRequest(
            spec=guest_spec("x86_64", name, dedicated_cpus=True, memory_mib=160), start=True), timeout=60)
        done = wait(ch, op, timeout=120)
        assert done.state == ops_pb.OPERATION_STATE_SUCCEEDED, done.error
        created = vm.Vm()
        done.response.Unpack(created)
    serial_log(p["a"], created.uuid).wait_for(r"CNA-GUEST-READY boot=", timeout=150)
    _one_copy_on(p, "a", created.uuid)
    return created.uuid


def test_the_source_agent_killed_at_three_points(pair) -> None:
    p = pair
    uuid = _boot(p, "srckill")

    # 1. Crash right after the destination prepared, before libvirt's job started: the VM
    #    did not move; the restarted source says so and has B drop its preparation.
    p.restart("a", "migration.source.prepared")
    req = _request(p, "a", "b", uuid, "fs-1")
    _send(p, "a", req)
    _died(p["a"])
    p.restart("a")
    done = _outcome(p, "a", req)
    assert done.error.code == grpc.StatusCode.ABORTED.value[0] and "did not move" in done.error.message, done
    _one_copy_on(p, "a", uuid)

    # 2. Crash right after libvirt's job completed, before B was told: the VM is on B; the
    #    restarted source finishes with B and frees its own claims.
    p.restart("a", "migration.source.completed")
    req = _request(p, "a", "b", uuid, "fs-2")
    _send(p, "a", req)
    _died(p["a"])
    assert domain(p.uri("b"), uuid) == (True, True)
    p.restart("a")
    done = _outcome(p, "a", req)
    assert done.state == ops_pb.OPERATION_STATE_SUCCEEDED, done.error
    moved = vm.Vm()
    done.response.Unpack(moved)
    assert moved.uuid == uuid and moved.status.state == vm.VM_STATE_RUNNING
    _one_copy_on(p, "b", uuid)

    # 3. SIGKILL from outside while memory moves (now B is the source): libvirtd carries the
    #    job on; the restarted agent re-attaches to it and ends with its outcome.
    req = _request(p, "b", "a", uuid, "fs-3", bandwidth_mib_s=1)
    op = _send(p, "b", req)
    _moving(p, "b", op)
    p["b"].stop(signal.SIGKILL)
    assert _job_running(p.uri("b"), uuid), "libvirt's job should outlive the agent"
    p.restart("b")
    _speed_up(p.uri("b"), uuid)
    done = _outcome(p, "b", req)
    assert done.state == ops_pb.OPERATION_STATE_SUCCEEDED, done.error
    _one_copy_on(p, "a", uuid)
    serial = serial_log(p["a"], uuid)
    assert "CNA-GUEST-READY" not in serial.text()  # the same guest, not a new boot

    for name in ("a", "b"):
        types = [e.type for e in _events_gap_free(p[name])]
        assert "operation.done" in types
    assert "vm.migrated" in [e.type for e in _events_gap_free(p["a"])]


def test_the_destination_agent_killed_at_three_points(pair) -> None:
    p = pair
    uuid = _boot(p, "dstkill")

    # 1. B crashes after it prepared (claims and preparation saved), before it answered: A's
    #    operation fails UNAVAILABLE and the VM stays; A keeps telling B to drop it, and the
    #    restarted B, which restored the preparation, releases it.
    p.restart("b", "migration.incoming.prepared")
    req = _request(p, "a", "b", uuid, "fd-1")
    _send(p, "a", req)
    _died(p["b"])
    done = _outcome(p, "a", req)
    assert done.error.code == grpc.StatusCode.UNAVAILABLE.value[0], done
    p.restart("b")
    _one_copy_on(p, "a", uuid)

    # 2. B crashes after claiming CPUs, before its preparation was saved: the restarted B
    #    finds a placement for a VM it neither has nor expects, and releases it.
    p.restart("b", "migration.incoming.claimed")
    req = _request(p, "a", "b", uuid, "fd-2")
    _send(p, "a", req)
    _died(p["b"])
    assert claims(p["b"], uuid)["placements"] == 1  # the leak a crash leaves
    done = _outcome(p, "a", req)
    assert done.error.code == grpc.StatusCode.UNAVAILABLE.value[0], done
    p.restart("b")
    _one_copy_on(p, "a", uuid)

    # 3. SIGKILL of B from outside while memory moves: the job (libvirtd to libvirtd) goes on;
    #    A's FinishIncoming is retried until the restarted B answers, from libvirt's state.
    req = _request(p, "a", "b", uuid, "fd-3", bandwidth_mib_s=1)
    op = _send(p, "a", req)
    _moving(p, "a", op)
    p["b"].stop(signal.SIGKILL)
    assert _job_running(p.uri("a"), uuid)
    _speed_up(p.uri("a"), uuid)
    wait_until(lambda: domain(p.uri("b"), uuid) == (True, True), 90, "the job completing while B's agent is down")
    p.restart("b")
    done = _outcome(p, "a", req)
    assert done.state == ops_pb.OPERATION_STATE_SUCCEEDED, done.error
    _one_copy_on(p, "b", uuid)
    with p["b"].channel() as ch:
        assert uuid in [v.uuid for v in pb.vm_pb2_grpc.VmServiceStub(ch).ListVms(vm.ListVmsRequest(), timeout=30).vms]
    for name in ("a", "b"):
        _events_gap_free(p[name])
