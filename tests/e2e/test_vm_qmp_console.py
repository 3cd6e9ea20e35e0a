"""QMP side channel and serial console end to end: the real daemon, the real x86_64 test guest.

GetVmDiagnostics answers from the agent's own QMP monitor (qmp.py) while libvirt keeps its
own: QEMU's run state follows libvirt's pause, the vCPU thread ids are QEMU's real threads,
the dirty rate is measured. A guest with a panic device panics for real (sysrq 'c'); the
pvpanic driver in the test guest's initramfs tells QEMU, and the agent reports it.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import grpc
import pytest

from cna_agent.api import pb
from support.console import Console
from support.guests import guest_spec, serial_log
from support.operations import ok

vm = pb.vm_pb2
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the embedded QEMU driver here needs root")


def _running_guest(agent, ch, name: str) -> str:
    stub = pb.vm_pb2_grpc.VmServiceStub(ch)
    op = ok(ch, stub.CreateVm(vm.CreateVmRequest(spec=guest_spec("x86_64", name), start=True), timeout=60))
    created = vm.Vm()
    op.response.Unpack(created)
    serial_log(agent, created.uuid).wait_for(r"CNA-GUEST-READY", timeout=120)
    return created.uuid


@pytest.mark.slow
def test_diagnostics_over_the_side_channel_beside_libvirt(vm_agent_factory, system_mode) -> None:
    libvirt_mode = system_mode  # the embedded side channel serves every other embedded test
    agent = vm_agent_factory(mode=libvirt_mode)
    with agent.channel() as ch:
        stub = pb.vm_pb2_grpc.VmServiceStub(ch)
        uuid = _running_guest(agent, ch, "diag")
        pid = int(stub.GetVm(vm.GetVmRequest(vm=uuid), timeout=10).status.qemu_pid)
        d = stub.GetVmDiagnostics(vm.GetVmDiagnosticsRequest(vm="diag", dirty_rate_seconds=1), timeout=60)
        assert d.qemu_status == "running" and d.qemu_running
        assert d.dirty_rate_measured and d.dirty_rate_mib_s >= 0
        assert d.side_channel_socket.endswith(f"{uuid}.sock") and os.path.exists(d.side_channel_socket)
        # the monitor is on QEMU's command line, and the vCPU threads are QEMU's own threads
        assert d.side_channel_socket in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        threads = {int(t) for t in os.listdir(f"/proc/{pid}/task")}
        assert [t.cpu_index for t in d.vcpu_threads] == [0]
        assert all(t.thread_id in threads for t in d.vcpu_threads)
        assert not d.panic_info
        # libvirt's pause is seen on the side channel; libvirt still owns the guest
        ok(ch, stub.PauseVm(vm.VmActionRequest(vm=uuid), timeout=30))
        assert stub.GetVmDiagnostics(vm.GetVmDiagnosticsRequest(vm=uuid), timeout=30).qemu_status == "paused"
        ok(ch, stub.ResumeVm(vm.VmActionRequest(vm=uuid), timeout=30))
        assert stub.GetVmDiagnostics(vm.GetVmDiagnosticsRequest(vm=uuid), timeout=30).qemu_status == "running"
        with pytest.raises(grpc.RpcError) as err:
            stub.GetVmDiagnostics(vm.GetVmDiagnosticsRequest(vm=uuid, dirty_rate_seconds=61), timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "dirty_rate_seconds" in err.value.details()
        ok(ch, stub.ShutdownVm(vm.ShutdownVmRequest(vm=uuid, hard=True), timeout=30))
        with pytest.raises(grpc.RpcError) as err:
            stub.GetVmDiagnostics(vm.GetVmDiagnosticsRequest(vm=uuid), timeout=10)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        # after a restart of the guest the agent re-attaches to the new QEMU's monitor
        ok(ch, stub.StartVm(vm.VmActionRequest(vm=uuid), timeout=60))
        serial_log(agent, uuid).wait_for(r"CNA-GUEST-READY", count=2, timeout=120)
        assert stub.GetVmDiagnostics(vm.GetVmDiagnosticsRequest(vm=uuid), timeout=30).qemu_status == "running"


@pytest.mark.slow
def test_a_guest_panic_is_reported_from_libvirt_and_the_side_channel(vm_agent_factory) -> None:
    agent = vm_agent_factory()
    with agent.channel() as ch:
        stub = pb.vm_pb2_grpc.VmServiceStub(ch)
        op = ok(ch, stub.CreateVm(vm.CreateVmRequest(spec=guest_spec("x86_64", "panicky", panic_device=True), start=True), timeout=60))
        created = vm.Vm()
        op.response.Unpack(created)
        uuid = created.uuid
        log = serial_log(agent, uuid)
        log.wait_for(r"CNA-GUEST-READY", timeout=120)
        con = Console(stub, uuid, force=True)
        con.send("\n")
        con.wait_for(r"cna# ", timeout=60)
        con.send("echo c > /proc/sysrq-trigger\n")
        events = pb.events_pb2_grpc.EventServiceStub(ch)
        deadline = time.monotonic() + 60
        while True:
            got = events.ListEvents(pb.events_pb2.ListEventsRequest(types=["vm.panic"], resource_id=uuid), timeout=10).events
            sources = {e.attributes.get("source") for e in got}
            if {"libvirt", "qmp"} <= sources or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        con.close()
        assert {"libvirt", "qmp"} <= sources, [(e.message, dict(e.attributes)) for e in got]
        assert "Kernel panic" in log.text() or "sysrq" in log.text().lower()
        # on_crash=destroy: the VM is stopped and reported crashed, not left half-alive
        deadline = time.monotonic() + 60
        while stub.GetVm(vm.GetVmRequest(vm=uuid), timeout=10).status.state != vm.VM_STATE_CRASHED:
            assert time.monotonic() < deadline, stub.GetVm(vm.GetVmRequest(vm=uuid), timeout=10).status
            time.sleep(0.5)


@pytest.mark.slow
def test_serial_console_types_into_the_guest_and_reads_back(vm_agent_factory, system_libvirtd) -> None:
    """Under the host's libvirtd only (the production way): the embedded driver's console is
    driven line by line by tests/e2e/test_guest_agent.py's logins and commands on Debian."""
    import secrets
    import subprocess

    agent = vm_agent_factory(mode="system")
    token = secrets.token_hex(6)
    with agent.channel() as ch:
        stub = pb.vm_pb2_grpc.VmServiceStub(ch)
        uuid = _running_guest(agent, ch, "cons")
        con = Console(stub, "cons")
        con.send("\n")
        con.wait_for(r"cna# ", timeout=60)
        con.send(f"echo hello-{token}\n")
        # the command's output on a line of its own (the echoed command line has "echo " before it)
        assert con.wait_for(rf"^hello-{token}\r?$", timeout=60) .startswith(f"hello-{token}")

        # one reader at a time: a second session is refused, naming force
        second = Console(stub, uuid)
        assert second.ended.wait(30) and second.error is not None
        assert second.error.code() == grpc.StatusCode.FAILED_PRECONDITION and "force" in second.error.details()
        # force takes it over: the first session ends, the new one works
        third = Console(stub, uuid, force=True)
        assert con.ended.wait(30)
        third.send(f"echo again-{token}\n")
        third.wait_for(rf"^again-{token}\r?$", timeout=60)
        third.close()

        # a cancelled session releases the console: the next one needs no force
        fourth = Console(stub, uuid)
        fourth.send(f"echo fourth-{token}\n")
        fourth.wait_for(rf"^fourth-{token}\r?$", timeout=60)
        fourth.close()

        # cna-ctl with a non-tty stdin (script use), again without --force
        exe = Path(sys.executable).with_name("cna-ctl")
        p = subprocess.run([str(exe), "--socket", str(agent.socket), "vm", "console", "cons", "--linger", "3"],
                           input=f"echo ctl-{token}\n".encode(), capture_output=True, timeout=60)
        assert p.returncode == 0, p.stderr.decode()
        assert f"\nctl-{token}" in p.stdout.decode(errors="replace").replace("\r", ""), p.stdout[-500:]

        # a stopped VM has no console
        ok(ch, stub.ShutdownVm(vm.ShutdownVmRequest(vm=uuid, hard=True), timeout=30))
        stopped = Console(stub, uuid)
        assert stopped.ended.wait(30) and stopped.error.code() == grpc.StatusCode.FAILED_PRECONDITION
