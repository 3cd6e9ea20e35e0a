"""CPU reservations are admission checks at power-on, judged from outside the agent: the host's
capacity is read from libvirt's node info in another process, and whether a guest runs from
/proc (its QEMU process), not from the agent's answer.

Two VMs that each reserve 60 % of the host's CPU: the first starts, the second is refused
RESOURCE_EXHAUSTED naming spec.cpu_qos.reservation_mhz (no QEMU is started for it), and starts
once the first is stopped. Stopped VMs reserve nothing; a VM that reserves nothing always starts.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import grpc
import pytest

from cna_agent.api import pb
from support.migration import qemu_pids
from support.operations import ok, wait

vm = pb.vm_pb2
pytestmark = [pytest.mark.needs_root]

NODE_INFO = """
import sys, libvirt
libvirt.virEventRegisterDefaultImpl()
info = libvirt.open(sys.argv[1]).getInfo()
print(info[2], info[3])
"""


def _node_cpu_mhz(caps_cache: Path | None) -> int:
    """logical CPUs x MHz, as libvirt reports the node (a throwaway embedded root)."""
    root = Path(tempfile.mkdtemp(prefix="ni", dir="/tmp"))
    try:
        if caps_cache is not None:
            shutil.copytree(caps_cache, root / "cache" / "qemu" / "capabilities")
        out = subprocess.run([sys.executable, "-c", NODE_INFO, f"qemu:///embed?root={root}"], capture_output=True,
                             text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        cpus, mhz = (int(x) for x in out.stdout.split())
        return cpus * (mhz or 2000)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _spec(name: str, reserve_mhz: int) -> vm.VmSpec:
    return vm.VmSpec(name=name, vcpus=1, memory_mib=64, arch=pb.common_pb2.ARCH_X86_64,
                     console=vm.ConsoleSpec(type=vm.CONSOLE_TYPE_NONE), cpu_qos=vm.CpuQos(reservation_mhz=reserve_mhz))


# (a short name: the agent's state under pytest's tmp_path must leave QEMU's monitor socket path under 108 bytes)
def test_cpu_reserve(agent, libvirt_caps_cache) -> None:
    capacity = _node_cpu_mhz(libvirt_caps_cache)
    share = capacity * 6 // 10
    with agent.channel() as ch:
        vms = pb.vm_pb2_grpc.VmServiceStub(ch)
        r1 = ok(ch, vms.CreateVm(vm.CreateVmRequest(spec=_spec("resv-1", share), start=True), timeout=60), into=vm.Vm())
        assert qemu_pids(r1.uuid)
        r2 = ok(ch, vms.CreateVm(vm.CreateVmRequest(spec=_spec("resv-2", share)), timeout=60), into=vm.Vm())
        refused = wait(ch, vms.StartVm(vm.VmActionRequest(vm="resv-2"), timeout=60), 60)
        assert refused.error.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0], refused
        assert refused.error.field_violations[0].field == "spec.cpu_qos.reservation_mhz", refused.error
        assert f"of this host's {capacity} MHz" in refused.error.message and "resv-1" in refused.error.message
        assert not qemu_pids(r2.uuid)
        # a VM that reserves nothing is not held back
        free = ok(ch, vms.CreateVm(vm.CreateVmRequest(spec=_spec("resv-0", 0), start=True), timeout=60), into=vm.Vm())
        assert qemu_pids(free.uuid)
        # a stopped VM reserves nothing: now the second fits
        ok(ch, vms.ShutdownVm(vm.ShutdownVmRequest(vm="resv-1", hard=True), timeout=60))
        assert not qemu_pids(r1.uuid)
        ok(ch, vms.StartVm(vm.VmActionRequest(vm="resv-2"), timeout=60))
        assert qemu_pids(r2.uuid)
        # and the first, started again, is the one refused
        again = wait(ch, vms.StartVm(vm.VmActionRequest(vm="resv-1"), timeout=60), 60)
        assert again.error.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0] and "resv-2" in again.error.message
        for name in ("resv-0", "resv-1", "resv-2"):
            ok(ch, vms.DeleteVm(vm.DeleteVmRequest(vm=name, force=True), timeout=60))
