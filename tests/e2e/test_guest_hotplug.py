"""vCPU and memory hot-plug on the real Debian guest, and changes that wait for the next start.

UpdateVm on the running guest: one more vCPU (setVcpus) and 256 MiB more memory (a DIMM) come
online inside the guest (its udev rule, as cloud images have); raising max_vcpus cannot be done
live, so without ``allow_pending`` it is refused and nothing changes, and with it the change is
written for the next start and reported in ``status.pending_changes``. A reboot of the guest keeps
the running QEMU, so the change still waits; a stop and start applies it. Judged from the guest's
own /sys and /proc and from libvirt's live and persistent definitions.
"""

from __future__ import annotations

import os
import re
from typing import Iterator

import grpc
import pytest
from google.protobuf import duration_pb2

from cna_agent.api import pb

from support.agent import AgentProcess
from support.console import AgentConsole, SerialLog, login_root
from support.debian import TEMPLATE, debian_agent, guest_sh
from support.libvirt import domain_xml
from support.operations import ok, wait
from support.waiting import wait_for

vm, st = pb.vm_pb2, pb.storage_pb2
pytestmark = [pytest.mark.slow, pytest.mark.skipif(os.geteuid() != 0, reason="the embedded QEMU driver here needs root")]


@pytest.fixture
def hotplug_env(libvirt_caps_cache) -> Iterator[tuple[AgentProcess, dict]]:
    with debian_agent(libvirt_caps_cache, "hp") as env:
        yield env


def _mem_total_mib(console: AgentConsole) -> int:
    return int(re.search(r"MemTotal:\s+(\d+) kB", guest_sh(console, "cat /proc/meminfo")).group(1)) // 1024


def _last(console: AgentConsole, command: str) -> str:
    return guest_sh(console, command).splitlines()[-1].strip()


def _vcpu_element(xml: str) -> str:
    return re.search(r"<vcpu[^>]*>\d+</vcpu>", xml).group(0)


def test_vcpu_and_dimm_hotplug_come_online_in_debian_and_a_max_vcpus_change_waits_for_the_next_start(hotplug_env) -> None:
    agent, guest = hotplug_env
    with agent.channel() as ch:
        vms = pb.vm_pb2_grpc.VmServiceStub(ch)
        storage = pb.storage_pb2_grpc.StorageServiceStub(ch)
        ok(ch, storage.CloneVolume(st.CloneVolumeRequest(request_id="hp-clone", source=TEMPLATE, datastore="ds",
                                                         path="hp/root.qcow2", linked=True), timeout=30))
        spec = vm.VmSpec(
            name="deb-hp", vcpus=1, max_vcpus=2, memory_mib=768, max_memory_mib=1280, serial_console=True,
            arch=pb.common_pb2.ARCH_X86_64, console=vm.ConsoleSpec(type=vm.CONSOLE_TYPE_NONE),
            boot=vm.BootSpec(kernel=guest["kernel"], initrd=guest["initrd"], cmdline=guest["cmdline_without_seed"]),
            disks=[vm.DiskSpec(volume="ds/hp/root.qcow2")])
        uuid = ok(ch, vms.CreateVm(vm.CreateVmRequest(spec=spec, start=True), timeout=60), into=vm.Vm()).uuid
        log = SerialLog(agent.dir / "run" / "vms" / uuid / "serial.log")
        log.wait_for(r"CNA-GUEST-READY boot=1 os=debian", timeout=240)

        with AgentConsole(ch, uuid) as console:
            login_root(console, guest["root_password"])
            assert _last(console, "nproc") == "1" and _last(console, "cat /sys/devices/system/cpu/possible") == "0-1"
            mem_before = _mem_total_mib(console)

            # -- live: one vCPU and one 256 MiB DIMM, both online in the guest -------------------
            done = ok(ch, vms.UpdateVm(vm.UpdateVmRequest(vm=uuid, spec=vm.VmSpec(vcpus=2, memory_mib=1024),
                                                          update_mask=["vcpus", "memory_mib"]), timeout=30), into=vm.Vm())
            assert (done.spec.vcpus, done.spec.memory_mib) == (2, 1024) and not done.status.pending_changes
            wait_for(lambda: _last(console, "cat /sys/devices/system/cpu/cpu1/online") == "1", 30, "cpu1 online")
            assert _last(console, "nproc") == "2"
            wait_for(lambda: _mem_total_mib(console) >= mem_before + 240, 30, "the DIMM's memory online")
            offline = guest_sh(console, "grep -l offline /sys/devices/system/memory/memory*/state || true")
            assert "memory" not in offline, offline
            live = domain_xml(agent, "embedded", "deb-hp")
            assert re.search(r"<memory model=.dimm.", live), live
            assert re.fullmatch(r"<vcpu[^>]*>2</vcpu>", _vcpu_element(live)) and "current='1'" not in _vcpu_element(live)

            # -- max_vcpus cannot change live: refused and nothing changes ... -------------------
            before = domain_xml(agent, "embedded", "deb-hp", live=False)
            with pytest.raises(grpc.RpcError) as err:
                vms.UpdateVm(vm.UpdateVmRequest(vm=uuid, spec=vm.VmSpec(max_vcpus=4), update_mask=["max_vcpus"]), timeout=30)
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "allow_pending" in err.value.details()
            assert domain_xml(agent, "embedded", "deb-hp", live=False) == before
            assert vms.GetVm(vm.GetVmRequest(vm=uuid), timeout=10).spec.max_vcpus == 2

            # -- ... or, with allow_pending, written for the next start and reported ------------
            op = vms.UpdateVm(vm.UpdateVmRequest(vm=uuid, spec=vm.VmSpec(max_vcpus=4), update_mask=["max_vcpus"],
                                                 allow_pending=True), timeout=30)
            done = ok(ch, op, into=vm.Vm())
            assert list(done.status.pending_changes) == ["max_vcpus"] and done.spec.max_vcpus == 4
            assert wait(ch, op).metadata["pending"] == "max_vcpus"
            assert re.search(r">4</vcpu>", _vcpu_element(domain_xml(agent, "embedded", "deb-hp", live=False)))
            assert re.search(r">2</vcpu>", _vcpu_element(domain_xml(agent, "embedded", "deb-hp")))
            assert _last(console, "cat /sys/devices/system/cpu/possible") == "0-1"
            # what would carry the running guest elsewhere is refused while the change waits
            with pytest.raises(grpc.RpcError) as err:
                vms.MigrateVm(vm.MigrateVmRequest(vm=uuid, destination="192.0.2.9:7443"), timeout=30)
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "max_vcpus" in err.value.details()
            hib = wait(ch, vms.HibernateVm(vm.HibernateVmRequest(vm=uuid), timeout=30))
            assert hib.error.code == grpc.StatusCode.FAILED_PRECONDITION.value[0] and "next start" in hib.error.message

        # -- a reboot inside the same QEMU does not apply it ----------------------------------------
        ok(ch, vms.RebootVm(vm.RebootVmRequest(vm=uuid), timeout=30))
        log.wait_for(r"CNA-GUEST-READY boot=2 os=debian", timeout=240)
        assert list(vms.GetVm(vm.GetVmRequest(vm=uuid), timeout=10).status.pending_changes) == ["max_vcpus"]

        # -- a stop and a start does ------------------------------------------------------------------
        ok(ch, vms.ShutdownVm(vm.ShutdownVmRequest(vm=uuid, timeout=duration_pb2.Duration(seconds=90)), timeout=30),
           timeout=120)
        ok(ch, vms.StartVm(vm.VmActionRequest(vm=uuid), timeout=60))
        log.wait_for(r"CNA-GUEST-READY boot=3 os=debian", timeout=240)
        got = vms.GetVm(vm.GetVmRequest(vm=uuid), timeout=10)
        assert not got.status.pending_changes and got.spec.max_vcpus == 4
        with AgentConsole(ch, uuid) as console:
            login_root(console, guest["root_password"])
            assert _last(console, "cat /sys/devices/system/cpu/possible") == "0-3"
            assert _last(console, "nproc") == "2"
            assert _mem_total_mib(console) >= mem_before + 240  # 1024 MiB now, from the start
