"""Host maintenance between two real agents on the two namespace hosts (the ``two_agents``
fixture, tests/e2e/conftest.py): host A with three VMs (two running busybox guests, one defined
and stopped) is put in maintenance towards B with the real ``cna-ctl``.

Judged from outside the agents: each host's libvirt (where each domain is defined and whether it
runs), the guests' serial consoles, and the refusals a VRM would meet (CreateVm, StartVm and an
incoming migration on A answer FAILED_PRECONDITION naming maintenance, also after A's agent
restarted). The stopped VM is either moved (cold migration, once compute's migrate does that) or
reported not moved and still defined, stopped, on A: never shut down, started or lost. Maintenance
off lets A take VMs again: a CreateVm, and ``cna-ctl vm migrate`` bringing a guest back from B.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from cna_agent.api import pb
from support.guests import guest_spec, serial_log
from support.hosts import domain_state
from support.migration import restart
from support.operations import ok, wait

vm, h, ops_pb = pb.vm_pb2, pb.host_pb2, pb.operations_pb2
pytestmark = [pytest.mark.skipif(os.geteuid() != 0, reason="needs root (two libvirtds)"), pytest.mark.slow]


def _ctl(agent, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("cna-ctl")
    return subprocess.run([str(exe), "--socket", str(agent.socket), *args], capture_output=True, text=True, timeout=timeout)


def _refused(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value


def test_a_host_with_three_vms_drains_to_the_other_refuses_new_vms_and_takes_them_again_when_off(two_agents) -> None:
    a, b, hosts, base = two_agents
    dest_b, dest_a = f"127.0.0.1:{b.tcp_port}", f"127.0.0.1:{a.tcp_port}"
    with a.channel() as cha, b.channel() as chb:
        vms_a, vms_b = pb.vm_pb2_grpc.VmServiceStub(cha), pb.vm_pb2_grpc.VmServiceStub(chb)
        uuids = {}
        for name, start in (("drain-1", True), ("drain-2", True), ("drain-off", False)):
            spec = guest_spec("x86_64", name, memory_mib=160 if start else 128)
            uuids[name] = ok(cha, vms_a.CreateVm(vm.CreateVmRequest(spec=spec, start=start), timeout=60), into=vm.Vm()).uuid
        for name in ("drain-1", "drain-2"):
            serial_log(a, uuids[name]).wait_for(r"CNA-GUEST-READY boot=", timeout=180)

        # -- maintenance on, through the real cna-ctl ------------------------------------------------
        out = _ctl(a, "host", "maintenance", "on", "--to", dest_b)
        print(out.stdout, out.stderr, sep="\n")
        assert "maintenance on" in out.stdout and "%" in out.stderr  # the report table, the progress lines
        status = pb.host_pb2_grpc.HostServiceStub(cha).GetMaintenance(h.GetMaintenanceRequest(), timeout=30)
        assert status.enabled and list(status.destinations) == [dest_b] and not status.evacuation_operation_id
        report = {x.vm_name: x for x in status.last_report.vms}
        assert set(report) == set(uuids)

        # the running guests: running and persistent on B, gone from A, the same boot going on
        for name in ("drain-1", "drain-2"):
            line = report[name]
            assert (line.outcome, line.destination, line.state) == (h.EVACUATION_OUTCOME_MOVED, dest_b, "running"), line
            assert domain_state(hosts.b.uri, uuids[name]) == (True, True)
            assert domain_state(hosts.a.uri, uuids[name]) is None
            moved_op = pb.operations_pb2_grpc.OperationsServiceStub(cha).GetOperation(
                ops_pb.GetOperationRequest(id=line.operation_id), timeout=30)
            assert moved_op.kind == line.operation_kind and moved_op.state == ops_pb.OPERATION_STATE_SUCCEEDED
        assert "CNA-GUEST-READY" not in serial_log(b, uuids["drain-1"]).text()  # B's log starts at the move: no boot

        # the stopped VM: moved cold, or reported with why and still defined, stopped, on A
        off = report["drain-off"]
        if off.outcome == h.EVACUATION_OUTCOME_MOVED:
            assert domain_state(hosts.b.uri, uuids["drain-off"]) == (True, False)
            assert domain_state(hosts.a.uri, uuids["drain-off"]) is None
            assert out.returncode == 0 and status.last_report.complete
        else:
            assert off.outcome == h.EVACUATION_OUTCOME_NOT_MOVED and off.error and off.state == "stopped", off
            assert domain_state(hosts.a.uri, uuids["drain-off"]) == (True, False)
            assert domain_state(hosts.b.uri, uuids["drain-off"]) is None
            assert out.returncode == 1 and "stayed on this host" in out.stderr and off.error in out.stdout.replace("\n", " ")
            assert (status.last_report.moved, status.last_report.not_moved) == (2, 1)
            err = _refused(lambda: vms_a.StartVm(vm.VmActionRequest(vm="drain-off"), timeout=30))
            assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and "maintenance" in err.details()
            assert domain_state(hosts.a.uri, uuids["drain-off"]) == (True, False)

        # -- refusals while on, also after A's agent restarted --------------------------------------
        new = guest_spec("x86_64", "drain-new", memory_mib=128)
        err = _refused(lambda: vms_a.CreateVm(vm.CreateVmRequest(spec=new), timeout=30))
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and "maintenance" in err.details()
        back = wait(chb, vms_b.MigrateVm(vm.MigrateVmRequest(vm="drain-2", destination=dest_a), timeout=60), 120)
        assert back.state == ops_pb.OPERATION_STATE_FAILED and "maintenance" in back.error.message, back
        assert domain_state(hosts.b.uri, uuids["drain-2"]) == (True, True)
    a2 = restart(a, sig=signal.SIGTERM)
    try:
        with a2.channel() as cha, b.channel() as chb:
            vms_a, vms_b = pb.vm_pb2_grpc.VmServiceStub(cha), pb.vm_pb2_grpc.VmServiceStub(chb)
            err = _refused(lambda: vms_a.CreateVm(vm.CreateVmRequest(spec=new), timeout=30))
            assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and "maintenance" in err.details()
            shown = _ctl(a2, "host", "maintenance", "status")
            assert shown.returncode == 0 and re.search(r"^Maintenance:\s+on$", shown.stdout, re.M) and "drain-1" in shown.stdout, shown

            # -- off: A takes VMs again ----------------------------------------------------------------
            out = _ctl(a2, "host", "maintenance", "off")
            assert out.returncode == 0 and "maintenance off" in out.stdout, out
            events = pb.events_pb2_grpc.EventServiceStub(cha).ListEvents(
                pb.events_pb2.ListEventsRequest(types=["host.maintenance"]), timeout=30).events
            assert [e.attributes["enabled"] for e in events] == ["true", "false"]  # the VRM hears both, across the restart
            created = ok(cha, vms_a.CreateVm(vm.CreateVmRequest(spec=new), timeout=60), into=vm.Vm())
            assert domain_state(hosts.a.uri, created.uuid) == (True, False)
            ok(cha, vms_a.DeleteVm(vm.DeleteVmRequest(vm="drain-new"), timeout=60))
            moved = _ctl(b, "vm", "migrate", "drain-1", "--to", f"127.0.0.1:{a2.tcp_port}", "--max-downtime-ms", "500")
            print(moved.stdout, moved.stderr, sep="\n")
            assert moved.returncode == 0, moved.stderr
            assert moved.stdout.startswith(f"drain-1 moved to 127.0.0.1:{a2.tcp_port} in ") and "running there" in moved.stdout
            assert "100%" in moved.stderr
            assert domain_state(hosts.a.uri, uuids["drain-1"]) == (True, True)
            assert domain_state(hosts.b.uri, uuids["drain-1"]) is None
            assert "CNA-GUEST-READY" not in serial_log(a2, uuids["drain-1"]).text()
            status = pb.host_pb2_grpc.HostServiceStub(cha).GetMaintenance(h.GetMaintenanceRequest(), timeout=30)
            assert not status.enabled and len(status.last_report.vms) == 3  # the report outlives the mode
    finally:
        a2.stop()
