"""Hibernate and resume between two real agents, each on its own libvirtd (two "hosts" in mount
namespaces), both seeing datastore ``shared`` at the same path.

A guest counts on its serial console. It is hibernated on A and started again on A (the counter
goes on, no reboot), hibernated again and resumed on B through B's agent (the counter goes on
on B's serial log from where it stopped on A). Judged from outside the agents: each host's
libvirt (where the domain is defined and running), the QEMU processes on the machine, the
state files on the datastore, the guests' serial logs, and A's state database.
"""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import grpc
import pytest

from cna_agent.api import pb
from support.agent import start_agent
from support.console import AgentConsole
from support.guests import guest_spec, serial_log
from support.hosts import domain_state
from support.migration import agent_config, claims, make_base, qemu_pids, restart, tear_down, wait_until
from support.operations import ok

vm = pb.vm_pb2
ops_pb = pb.operations_pb2
pytestmark = [pytest.mark.skipif(os.geteuid() != 0, reason="needs root (two libvirtds)"), pytest.mark.slow]
MiB = 1 << 20


@pytest.fixture
def hib_agents(two_hosts, libvirt_caps_cache):
    import libvirt

    libvirt.registerErrorHandler(lambda _c, _e: None, None)
    base = make_base("hb")
    for d in ("a-local", "b-local", "shared"):
        (base / d).mkdir(mode=0o711)

    def config(host, local: Path) -> str:
        datastores = (f'[storage.datastores.local]\ntype = "dir"\npath = "{local}"\n'
                      f'[storage.datastores.shared]\ntype = "dir"\npath = "{base / "shared"}"\n')
        # A's hand-off check every second (the default is 30 s)
        text = agent_config(host, base / "img", datastores)
        return text.replace("[compute]\n", "[compute]\nhibernation_check_interval_s = 1.0\n", 1)

    a = start_agent(base / "a", None, extra_config=config(two_hosts.a, base / "a-local"))
    b = start_agent(base / "b", None, extra_config=config(two_hosts.b, base / "b-local"))
    yield a, b, two_hosts, base
    for agent in (a, b):  # what the agents said, for a failure (pytest shows it then)
        print(f"--- {agent.dir.name}'s log (last 6000 characters) ---\n{agent.log_text()[-6000:]}")
    tear_down((a, b), (two_hosts.a, two_hosts.b), base)


def _counts(text: str) -> list[int]:
    return [int(m) for m in re.findall(r"^COUNT-(\d+)\r?$", text, re.M)]


def _states(base: Path, uuid: str) -> list[Path]:
    """The token directories of the VM's hibernations on the shared datastore."""
    root = base / "shared" / ".cna-state" / "hibernate" / uuid
    return sorted(p for p in root.iterdir()) if root.is_dir() else []


def test_a_counting_guest_hibernates_resumes_here_then_on_the_other_host_where_it_stopped(hib_agents) -> None:
    a, b, hosts, base = hib_agents
    disk = base / "shared" / "hib1" / "data.raw"
    disk.parent.mkdir(mode=0o711)
    with open(disk, "wb") as f:
        f.truncate(8 * MiB)
    with a.channel() as cha, b.channel() as chb:
        vms_a, vms_b = pb.vm_pb2_grpc.VmServiceStub(cha), pb.vm_pb2_grpc.VmServiceStub(chb)
        spec = guest_spec("x86_64", "hib1", memory_mib=128, dedicated_cpus=True,
                          disks=[vm.DiskSpec(volume="shared/hib1/data.raw")])
        uuid = ok(cha, vms_a.CreateVm(vm.CreateVmRequest(spec=spec, start=True), timeout=60), into=vm.Vm()).uuid
        assert claims(a, uuid)["placements"] == 1
        log_a = serial_log(a, uuid)
        log_a.wait_for(r"CNA-GUEST-READY", timeout=150)
        with AgentConsole(cha, uuid) as con:
            con.send("\n")
            con.wait_for(r"cna# ", timeout=60, partial=True)
            con.send("(i=0; while :; do echo COUNT-$i; i=$((i+1)); sleep 1; done) &\n")
            con.wait_for(r"COUNT-3\r?$", timeout=60)

        # bad requests change nothing: an unknown datastore, resume of a VM that is not
        # hibernated, a resume on B that does not say where the state is
        with pytest.raises(grpc.RpcError) as err:
            vms_a.HibernateVm(vm.HibernateVmRequest(vm=uuid, datastore="nope"), timeout=30)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND and "nope" in err.value.details()
        with pytest.raises(grpc.RpcError) as err:
            vms_a.UnhibernateVm(vm.UnhibernateVmRequest(vm=uuid), timeout=30)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "not hibernated" in err.value.details()
        with pytest.raises(grpc.RpcError) as err:
            vms_b.UnhibernateVm(vm.UnhibernateVmRequest(vm=uuid), timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "datastore" in err.value.details()
        assert domain_state(hosts.a.uri, uuid) == (True, True) and _states(base, uuid) == []

        # 1. hibernate on A: shut off in libvirt (still defined), no QEMU, the RAM on the datastore
        before = max(_counts(log_a.text()))
        hib = ok(cha, vms_a.HibernateVm(vm.HibernateVmRequest(vm=uuid), timeout=60), into=vm.Vm())
        assert hib.status.state == vm.VM_STATE_HIBERNATED and hib.status.hibernation.datastore == "shared", hib.status
        assert domain_state(hosts.a.uri, uuid) == (True, False) and not qemu_pids(uuid)
        assert claims(a, uuid)["placements"] == 0  # its dedicated CPU is free again
        (state,) = _states(base, uuid)
        assert (state / "memory.save").stat().st_size > 1 * MiB and (state / "state.json").is_file()
        assert (state.stat().st_mode & 0o777) == 0o700  # the guest's RAM: root only
        saved_at = max(_counts(log_a.text()))
        assert saved_at >= before
        listed = {v.uuid: v for v in vms_a.ListVms(vm.ListVmsRequest(), timeout=30).vms}
        assert listed[uuid].status.state == vm.VM_STATE_HIBERNATED
        with pytest.raises(grpc.RpcError) as err:
            vms_a.PauseVm(vm.VmActionRequest(vm=uuid), timeout=30)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "hibernated" in err.value.details()

        # 2. StartVm on A resumes it here: counting on from where it stopped, no new boot
        time.sleep(2)  # the guest's clock stood still: no count while hibernated
        assert max(_counts(log_a.text())) == saved_at
        boots = log_a.text().count("CNA-GUEST-READY")
        back = ok(cha, vms_a.StartVm(vm.VmActionRequest(vm=uuid), timeout=60), into=vm.Vm())
        assert back.status.state == vm.VM_STATE_RUNNING and not back.status.HasField("hibernation")
        assert claims(a, uuid)["placements"] == 1  # planned anew
        wait_until(lambda: max(_counts(log_a.text())) >= saved_at + 3, 60, "the guest counting again on A")
        counts = _counts(log_a.text())
        assert counts == list(range(counts[0], counts[0] + len(counts))), counts[-20:]  # no gap, no restart at 0
        assert log_a.text().count("CNA-GUEST-READY") == boots
        assert _states(base, uuid) == []  # resumed where it was saved: nothing left

        # 3. hibernate again, resume on B (by UUID, naming the datastore)
        ok(cha, vms_a.HibernateVm(vm.HibernateVmRequest(vm=uuid, datastore="shared"), timeout=60))
        last_a = max(_counts(log_a.text()))
        with pytest.raises(grpc.RpcError) as err:  # B looking on its own datastore finds nothing
            vms_b.UnhibernateVm(vm.UnhibernateVmRequest(vm=uuid, datastore="local"), timeout=30)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND, err.value.details()
        t0 = time.monotonic()
        moved = ok(chb, vms_b.UnhibernateVm(vm.UnhibernateVmRequest(vm=uuid, datastore="shared"), timeout=60), into=vm.Vm())
        resume_s = time.monotonic() - t0
        assert moved.uuid == uuid and moved.status.state == vm.VM_STATE_RUNNING
        assert domain_state(hosts.b.uri, uuid) == (True, True) and claims(b, uuid)["placements"] == 1
        log_b = serial_log(b, uuid)
        wait_until(lambda: len(_counts(log_b.text())) >= 3, 60, "the guest counting on B")
        on_b = _counts(log_b.text())
        assert on_b[0] == last_a + 1 and on_b == list(range(on_b[0], on_b[0] + len(on_b))), (last_a, on_b)
        assert "CNA-GUEST-READY" not in log_b.text()  # no reboot on B
        (pid,) = qemu_pids(uuid)  # one QEMU on the machine: B's
        assert pid in hosts.b.qemu_pids().values()

        # 4. A lets go: its hand-off check undefines its copy; nothing of the VM is left on A
        wait_until(lambda: domain_state(hosts.a.uri, uuid) is None, 30, "A's definition removed")
        assert not vms_a.ListVms(vm.ListVmsRequest(), timeout=30).vms
        assert claims(a, uuid) == {"placements": 0, "prepared": 0}
        wait_until(lambda: _states(base, uuid) == [], 10, "the claim removed from the datastore")
        assert disk.is_file()  # the disk is the resumed VM's
        print(f"resume on the other host: {resume_s:.2f} s")
        ok(chb, vms_b.DeleteVm(vm.DeleteVmRequest(vm=uuid, force=True), timeout=60))


def _finished(agent, kind: str, request_id: str):
    """The operation of ``kind`` that request ``request_id`` opened, as the (restarted) agent reports it."""
    with agent.channel() as ch:
        listed = pb.operations_pb2_grpc.OperationsServiceStub(ch).ListOperations(
            ops_pb.ListOperationsRequest(kinds=[kind]), timeout=30).operations
    return next(o for o in listed if o.request_id == request_id)


def _killed_during(agent, env_point: str, call) -> object:
    """Restart ``agent`` armed at crash point ``env_point``, make ``call(channel)``, and wait
    for the agent to die there; returns the agent restarted unarmed (its recovery has run)."""
    armed = restart(agent, env={"CNA_FAILPOINTS": env_point})
    with armed.channel() as ch:
        try:
            call(ch)
        except grpc.RpcError:
            pass  # the agent died before it answered
    assert armed.proc.wait(timeout=120) == -signal.SIGKILL
    return restart(armed)


def test_agents_killed_mid_hibernate_and_mid_resume_finish_both_from_what_libvirt_and_the_datastore_show(hib_agents) -> None:
    """SIGKILL of A's agent right after libvirt saved the VM (before the mark): the restarted
    agent finds the domain shut off with a complete image and completes the hibernation. SIGKILL
    of B's agent right after libvirt restored it there: the restarted B finds it running and
    completes the resume; A then lets go of its copy."""
    a, b, hosts, base = hib_agents
    current = {"a": a, "b": b}
    try:
        with a.channel() as cha:
            spec = guest_spec("x86_64", "hib2", memory_mib=128)
            uuid = ok(cha, pb.vm_pb2_grpc.VmServiceStub(cha).CreateVm(vm.CreateVmRequest(spec=spec, start=True), timeout=60),
                      into=vm.Vm()).uuid
        log_a = serial_log(a, uuid)
        log_a.wait_for(r"CNA-GUEST-READY", timeout=150)

        current["a"] = _killed_during(a, "vm.hibernate.saved", lambda ch: pb.vm_pb2_grpc.VmServiceStub(ch).HibernateVm(
            vm.HibernateVmRequest(vm=uuid, datastore="shared", request_id="hib-kill-1"), timeout=60))
        done = _finished(current["a"], "vm.hibernate", "hib-kill-1")
        assert done.state == ops_pb.OPERATION_STATE_SUCCEEDED, done
        with current["a"].channel() as cha:
            got = pb.vm_pb2_grpc.VmServiceStub(cha).GetVm(vm.GetVmRequest(vm=uuid), timeout=30)
        assert got.status.state == vm.VM_STATE_HIBERNATED and got.status.hibernation.datastore == "shared"
        assert domain_state(hosts.a.uri, uuid) == (True, False) and not qemu_pids(uuid)
        (state,) = _states(base, uuid)
        assert (state / "memory.save").is_file()

        current["b"] = _killed_during(b, "vm.unhibernate.restored", lambda ch: pb.vm_pb2_grpc.VmServiceStub(ch).UnhibernateVm(
            vm.UnhibernateVmRequest(vm=uuid, datastore="shared", request_id="hib-kill-2"), timeout=60))
        done = _finished(current["b"], "vm.unhibernate", "hib-kill-2")
        assert done.state == ops_pb.OPERATION_STATE_SUCCEEDED, done
        assert domain_state(hosts.b.uri, uuid) == (True, True)
        assert not (state / "memory.save").exists()  # the used image is removed; A's claim file is what is left
        wait_until(lambda: domain_state(hosts.a.uri, uuid) is None, 30, "A's definition removed")
        wait_until(lambda: _states(base, uuid) == [], 10, "the claim removed from the datastore")
        log_b = serial_log(current["b"], uuid)
        with current["b"].channel() as chb:  # the guest answers on B without having rebooted
            with AgentConsole(chb, uuid) as con:
                con.send("\n")
                con.wait_for(r"cna# ", timeout=60, partial=True)
            assert "CNA-GUEST-READY" not in log_b.text()
            ok(chb, pb.vm_pb2_grpc.VmServiceStub(chb).DeleteVm(vm.DeleteVmRequest(vm=uuid, force=True), timeout=60))
    finally:
        for name, agent in current.items():
            if agent is not (a if name == "a" else b):
                agent.stop()
