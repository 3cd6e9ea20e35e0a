"""A dedicated-CPU VM's threads are pinned as planned, checked from /proc (not libvirt's view).

The real daemon plans the VM (host/placement.py), compute renders cputune, QEMU runs under
TCG; the test reads Cpus_allowed_list of QEMU's vCPU thread ("CPU 0/TCG", named because
libvirt starts QEMU with debug-threads=on) and of its main (emulator) thread.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest

from cna_agent.api import pb
from cna_agent.host.cpulist import parse_cpulist
from support.agent import start_agent
from support.guests import build_guest
from support.operations import ok

vm = pb.vm_pb2
pytestmark = pytest.mark.skipif(os.geteuid() != 0 or (os.cpu_count() or 1) < 2,
                                reason="needs root and at least 2 CPUs (one dedicated, one for the emulator)")


def _allowed(pid: int, tid: int) -> tuple[int, ...]:
    for line in Path(f"/proc/{pid}/task/{tid}/status").read_text().splitlines():
        if line.startswith("Cpus_allowed_list:"):
            return parse_cpulist(line.split(":", 1)[1])
    raise AssertionError("no Cpus_allowed_list")


def _threads(pid: int) -> dict[str, int]:
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        out[(task / "comm").read_text().strip()] = int(task.name)
    return out


@pytest.mark.slow
def test_dedicated_vcpu_thread_is_pinned_and_the_emulator_kept_off_it(libvirt_caps_cache):
    g = build_guest("x86_64")
    base = Path(tempfile.mkdtemp(prefix="cp", dir="/tmp"))
    agent = start_agent(base / "a", libvirt_caps_cache, extra_config=f'[compute]\nimage_dirs = "{Path(g["kernel"]).parent}"\n')
    try:
        with agent.channel() as ch:
            vms = pb.vm_pb2_grpc.VmServiceStub(ch)
            spec = vm.VmSpec(name="pinned", vcpus=1, memory_mib=160, dedicated_cpus=True, serial_console=True,
                             arch=pb.common_pb2.ARCH_X86_64,
                             boot=vm.BootSpec(kernel=g["kernel"], initrd=g["initrd"], cmdline=f"console={g['console']}"))
            created = ok(ch, vms.CreateVm(vm.CreateVmRequest(spec=spec, start=True), timeout=60), 120, poll=True, into=vm.Vm())
            got = vms.GetVm(vm.GetVmRequest(vm=created.uuid), timeout=30)
            pid = int(got.status.qemu_pid)
            deadline = time.monotonic() + 60
            while "CPU 0/TCG" not in _threads(pid):
                assert time.monotonic() < deadline, _threads(pid)
                time.sleep(0.2)
            vcpu_cpus = _allowed(pid, _threads(pid)["CPU 0/TCG"])
            emulator_cpus = _allowed(pid, pid)
            assert len(vcpu_cpus) == 1, f"vCPU 0 may run on {vcpu_cpus}, expected exactly its dedicated CPU"
            assert emulator_cpus and not set(emulator_cpus) & set(vcpu_cpus), (vcpu_cpus, emulator_cpus)
            # A second dedicated VM cannot get the same CPU: with 2 host CPUs there is none left
            # that is not the first VM's or the emulator pool's last CPU, so it is refused.
            second = vm.VmSpec(name="pinned2", vcpus=1, memory_mib=160, dedicated_cpus=True, arch=pb.common_pb2.ARCH_X86_64,
                               boot=vm.BootSpec(kernel=g["kernel"], initrd=g["initrd"]))
            if (os.cpu_count() or 0) == 2:
                import grpc

                try:
                    op2 = vms.CreateVm(vm.CreateVmRequest(spec=second), timeout=60)
                except grpc.RpcError as exc:
                    assert exc.code() == grpc.StatusCode.FAILED_PRECONDITION, exc
                else:
                    raise AssertionError(f"a second dedicated VM was placed on a 2-CPU host: {op2}")
    finally:
        agent.stop()
        shutil.rmtree(base, ignore_errors=True)
