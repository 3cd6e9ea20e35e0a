"""A real dedicated-CPU test guest under the real agent (embedded libvirt QEMU driver, TCG):
its vCPU thread is pinned as planned, a live re-pin through the native batch call moves it,
GetPlacement and `cna-ctl host placement --check` report the drift, and re-pinning back
clears it. Every affinity is checked from /proc/<qemu pid>/task/*/status, not from libvirt's
or the agent's own view. The vCPU thread is found by its name "CPU 0/TCG" (libvirt starts
QEMU with debug-threads=on)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from cna_agent.api import pb
from cna_agent.host import affinity
from cna_agent.host.cpulist import parse_cpulist
from support.agent import start_agent
from support.operations import ok

vm = pb.vm_pb2
pytestmark = pytest.mark.skipif(os.geteuid() != 0 or len(os.sched_getaffinity(0)) < 2 or not affinity.native_available(),
                                reason="needs root, 2 usable CPUs (one dedicated, one for the emulator) and the native extension")


def _allowed(pid: int, tid: int) -> tuple[int, ...]:
    for line in Path(f"/proc/{pid}/task/{tid}/status").read_text().splitlines():
        if line.startswith("Cpus_allowed_list:"):
            return parse_cpulist(line.split(":", 1)[1])
    raise AssertionError("no Cpus_allowed_list")


def _threads(pid: int) -> dict[str, int]:
    return {(t / "comm").read_text().strip(): int(t.name) for t in Path(f"/proc/{pid}/task").iterdir()}


def _report(host, uuid: str) -> pb.host_pb2.VmPlacement:
    report = host.GetPlacement(pb.host_pb2.GetPlacementRequest(vm=uuid), timeout=30)
    (placed,) = report.vms
    assert report.native
    return placed


@pytest.mark.slow
def test_dedicated_guest_pinned_as_planned_then_live_repinned_and_drift_reported(libvirt_caps_cache, test_guest):
    g = test_guest("x86_64")
    base = Path(tempfile.mkdtemp(prefix="pl", dir="/tmp"))  # short: unix socket paths
    agent = start_agent(base / "a", libvirt_caps_cache, extra_config=f'[compute]\nimage_dirs = "{Path(g["kernel"]).parent}"\n')
    try:
        with agent.channel() as ch:
            vms = pb.vm_pb2_grpc.VmServiceStub(ch)
            host = pb.host_pb2_grpc.HostServiceStub(ch)
            spec = vm.VmSpec(name="live-pin", vcpus=1, memory_mib=128, dedicated_cpus=True, arch=pb.common_pb2.ARCH_X86_64,
                             console=vm.ConsoleSpec(type=vm.CONSOLE_TYPE_NONE),  # no VNC port race with other guests
                             boot=vm.BootSpec(kernel=g["kernel"], initrd=g["initrd"], cmdline=f"console={g['console']}"))
            created = ok(ch, vms.CreateVm(vm.CreateVmRequest(spec=spec, start=True), timeout=60), 120, poll=True, into=vm.Vm())
            pid = int(vms.GetVm(vm.GetVmRequest(vm=created.uuid), timeout=30).status.qemu_pid)
            deadline = time.monotonic() + 60
            while "CPU 0/TCG" not in _threads(pid):
                assert time.monotonic() < deadline, _threads(pid)
                time.sleep(0.2)
            vcpu_tid = _threads(pid)["CPU 0/TCG"]

            # 1. As planned: the plan (GetPlacement) and the kernel (/proc) agree.
            placed = _report(host, created.uuid)
            assert (placed.state, placed.qemu_pid, placed.dedicated) == ("running", pid, True)
            threads = {t.tid: t for t in placed.threads}
            assert vcpu_tid in threads and pid in threads
            vcpu = threads[vcpu_tid]
            assert (vcpu.role, vcpu.index, vcpu.name) == ("vcpu", 0, "CPU 0/TCG")
            (dedicated,) = vcpu.planned_cpus
            assert _allowed(pid, vcpu_tid) == (dedicated,) == tuple(vcpu.allowed_cpus)
            assert dedicated not in placed.emulator_cpus
            assert _allowed(pid, pid) == tuple(placed.emulator_cpus) == tuple(threads[pid].planned_cpus)
            assert not vcpu.drifted and not any("CPU 0/TCG" in d for d in placed.drift), placed.drift

            # 2. A live re-pin through the native batch call moves the running guest's threads.
            # libvirt confines each vCPU thread to its own cpuset cgroup: a bare
            # sched_setaffinity outside it is refused, repin_threads widens the cgroup first.
            other = placed.emulator_cpus[0]
            assert affinity.set_affinity({vcpu_tid: (other,)}, use_native=True) in ({}, {vcpu_tid: 22})
            assert affinity.repin_threads(pid, {vcpu_tid: (other,), pid: (dedicated,)}, use_native=True) == {}
            assert _allowed(pid, vcpu_tid) == (other,)
            assert _allowed(pid, pid) == (dedicated,)
            # It really ran there: CPU time is counted in clock ticks, so a vCPU that was only
            # just scheduled may still show 0; it must show some within seconds.
            deadline = time.monotonic() + 30
            while True:
                stats = {s.tid: s for s in affinity.thread_stats(pid, use_native=True)}
                if stats[vcpu_tid].cpu_seconds > 0 or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            assert stats[vcpu_tid].comm == "CPU 0/TCG" and stats[vcpu_tid].cpu_seconds > 0
            assert _allowed(pid, vcpu_tid) == (other,)

            # 3. The agent sees the kernel's view: drift on both threads, through gRPC and cna-ctl.
            placed = _report(host, created.uuid)
            threads = {t.tid: t for t in placed.threads}
            assert threads[vcpu_tid].drifted and tuple(threads[vcpu_tid].allowed_cpus) == (other,)
            assert threads[pid].drifted
            assert any("CPU 0/TCG" in d for d in placed.drift), placed.drift
            cli = subprocess.run([sys.executable, "-m", "cna_agent.cli.main", "--socket", str(agent.socket),
                                  "host", "placement", "--check"], capture_output=True, text=True, timeout=60)
            assert cli.returncode == 1, cli.stderr
            assert "live-pin" in cli.stdout and "DRIFT" in cli.stdout and "drift found" in cli.stderr

            # 4. Re-pin back as planned (the repair path's call): drift gone, seen in /proc too.
            assert affinity.repin_threads(pid, {vcpu_tid: (dedicated,), pid: tuple(placed.emulator_cpus)}, use_native=True) == {}
            assert _allowed(pid, vcpu_tid) == (dedicated,)
            placed = _report(host, created.uuid)
            assert not {t.tid: t for t in placed.threads}[vcpu_tid].drifted
            assert not any("CPU 0/TCG" in d for d in placed.drift)
    finally:
        agent.stop()
        shutil.rmtree(base, ignore_errors=True)
