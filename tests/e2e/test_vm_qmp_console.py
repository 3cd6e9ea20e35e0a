"""QMP side channel and serial console end to end: the real daemon, the real x86_64 test guest.

GetVmDiagnostics answers from the agent's own QMP monitor (qmp.py) while libvirt keeps its
own: QEMU's run state follows libvirt's pause, the vCPU thread ids are QEMU's real threads,
the dirty rate is measured. GUEST_PANICKED is not provoked here: the test guest's initramfs
carries no pvpanic driver (see tests/unit/test_domxml_qmp.py for the event attributes).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import grpc
import pytest

from cna_agent.api import pb

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_vm_lifecycle import guest_spec, ok, serial, vm_agent_factory  # noqa: E402,F401

vm = pb.vm_pb2
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the embedded QEMU driver here needs root")


def _running_guest(agent, ch, name: str) -> str:
    stub = pb.vm_pb2_grpc.VmServiceStub(ch)
    op = ok(ch, stub.CreateVm(vm.CreateVmRequest(spec=guest_spec("x86_64", name), start=True), timeout=60))
    created = vm.Vm()
    op.response.Unpack(created)
    serial(agent, created.uuid).wait_for(r"CNA-GUEST-READY", timeout=120)
    return created.uuid


@pytest.mark.slow
def test_diagnostics_over_the_side_channel_beside_libvirt(vm_agent_factory) -> None:
    agent = vm_agent_factory()
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
        serial(agent, uuid).wait_for(r"CNA-GUEST-READY", count=2, timeout=120)
        assert stub.GetVmDiagnostics(vm.GetVmDiagnosticsRequest(vm=uuid), timeout=30).qemu_status == "running"
