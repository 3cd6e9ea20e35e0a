"""What failed only outside the embedded driver as root (issue 20), booted or hot-plugged on real
guests under the host's libvirtd with QEMU as its unprivileged user (the Windows-family boot also
under the embedded driver, ``libvirt_mode``; the others run embedded in every other test):

* a Windows-family VM under TCG: QEMU refuses Hyper-V VP_INDEX without KVM, so the domain gets
  what the hypervisor offers and GetVm says what was left out (compute/hyperv.py);
* a q35 VM with 2 disks and 2 NICs still hot-plugs 2 more disks and a NIC (libvirt used to fill
  every spare root port with the VM's own devices), and a VM that asked for no spare slots
  gets libvirt's own "no more PCI slots" as the operation's error, nothing half-attached.

Judged from outside the agent: QEMU's own command line (/proc/PID/cmdline), the guest's serial
console (it prints CNA-HOTPLUG when a disk or NIC appears), the volume files on the datastore.
Volumes in datastore subdirectories booting under an unprivileged QEMU: test_storage_boot.py.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import uuid as uuidlib
from pathlib import Path

import grpc
import pytest

from cna_agent.api import pb
from support.guests import guest_spec, serial_log
from support.operations import ok, wait

vm, st, npb = pb.vm_pb2, pb.storage_pb2, pb.network_pb2
pytestmark = [pytest.mark.skipif(os.geteuid() != 0, reason="needs root (QEMU, libvirtd, bridges)"), pytest.mark.slow]


def _qemu_argv(pid: str) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")


def test_a_windows_family_vm_boots_under_tcg_with_what_qemu_offers(vm_agent_factory, libvirt_mode) -> None:
    agent = vm_agent_factory(mode=libvirt_mode)
    with agent.channel() as ch:
        vms = pb.vm_pb2_grpc.VmServiceStub(ch)
        spec = guest_spec("x86_64", "win-tcg", os_family=vm.OS_FAMILY_WINDOWS, panic_device=True)
        created = ok(ch, vms.CreateVm(vm.CreateVmRequest(spec=spec, start=True), timeout=60), into=vm.Vm())
        serial_log(agent, created.uuid).wait_for(r"CNA-GUEST-READY boot=", timeout=150)
        got = vms.GetVm(vm.GetVmRequest(vm=created.uuid), timeout=30)
        assert got.status.state == vm.VM_STATE_RUNNING
        argv = _qemu_argv(got.status.qemu_pid)
        cpu = argv[argv.index("-cpu") + 1]
        # Only the enlightenments QEMU takes without KVM; the ones it refused (vpindex) or would
        # advertise without emulating (synic, stimer, the reference clock) are not there.
        assert "hv-spinlocks=0x1fff" in cpu, cpu
        for refused in ("hv-vpindex", "hv-synic", "hv-stimer", "hv-time", "hv-vapic"):
            assert refused not in cpu, cpu
        assert "pvpanic" in " ".join(argv)  # ISA pvpanic instead of the Hyper-V crash MSRs
        lim = list(got.status.host_limitations)
        assert any(line.startswith("hyperv: ") and "vpindex" in line and "virt type qemu" in line for line in lim), lim
        assert any("hypervclock" in line for line in lim) and any("pvpanic" in line for line in lim), lim
        # ... and a Linux VM on the same host has nothing to report
        linux = ok(ch, vms.CreateVm(vm.CreateVmRequest(spec=guest_spec("x86_64", "lin-tcg")), timeout=60), into=vm.Vm())
        assert not vms.GetVm(vm.GetVmRequest(vm=linux.uuid), timeout=30).status.host_limitations
        for u in (created.uuid, linux.uuid):
            ok(ch, vms.DeleteVm(vm.DeleteVmRequest(vm=u, force=True), timeout=60))


@pytest.fixture
def hotplug_agent(vm_agent_factory, system_mode):
    libvirt_mode = system_mode
    """An agent with a dir datastore and a Linux bridge with one port group."""
    s = uuidlib.uuid4().hex[:5]
    ds = Path(tempfile.mkdtemp(prefix="hp", dir="/tmp"))
    ds.chmod(0o755)
    extra = (f'[storage.datastores.ds]\ntype = "dir"\npath = "{ds}"\n'
             f'[network]\nreconcile_interval_s = 0\n[network.bridges.hb{s}]\ntype = "linux"\n'
             f'[network.port_groups.hp{s}]\nbridge = "hb{s}"\n')
    agent = vm_agent_factory(mode=libvirt_mode, extra_config=extra)
    yield agent, ds, f"hp{s}"
    agent.stop()
    subprocess.run(["ip", "link", "del", f"hb{s}"], capture_output=True, timeout=30)
    shutil.rmtree(ds, ignore_errors=True)


def _volume(ch, path: str) -> str:
    storage = pb.storage_pb2_grpc.StorageServiceStub(ch)
    v = ok(ch, storage.CreateVolume(st.CreateVolumeRequest(datastore="ds", path=path, size_bytes=16 << 20,
                                                           format=st.VOLUME_FORMAT_QCOW2), timeout=60), into=st.Volume())
    return v.id


def test_two_disks_and_two_nics_leave_room_to_hot_plug_and_no_spare_slots_fails_cleanly(hotplug_agent) -> None:
    agent, ds, pg = hotplug_agent
    with agent.channel() as ch:
        vms = pb.vm_pb2_grpc.VmServiceStub(ch)
        storage = pb.storage_pb2_grpc.StorageServiceStub(ch)
        nets = pb.network_pb2_grpc.NetworkServiceStub(ch)
        disks = [vm.DiskSpec(volume=_volume(ch, f"busy/d{i}.qcow2")) for i in range(2)]
        nics = [vm.NicSpec(port_group=pg) for _ in range(2)]
        created = ok(ch, vms.CreateVm(vm.CreateVmRequest(spec=guest_spec("x86_64", "busy", disks=disks, nics=nics), start=True),
                                      timeout=60), into=vm.Vm())
        log = serial_log(agent, created.uuid)
        log.wait_for(r"CNA-GUEST-READY boot=", timeout=150)
        for i in range(2):
            ok(ch, storage.AttachDisk(st.AttachDiskRequest(vm=created.uuid, disk=vm.DiskSpec(volume=_volume(ch, f"busy/h{i}.qcow2"))),
                                      timeout=60))
        ok(ch, nets.AttachNic(npb.AttachNicRequest(vm=created.uuid, nic=vm.NicSpec(port_group=pg)), timeout=60))
        for dev in ("vdc", "vdd"):
            log.wait_for(rf"CNA-HOTPLUG add block {dev}", timeout=60)
        log.wait_for(r"CNA-HOTPLUG add net eth2", timeout=60)
        got = vms.GetVm(vm.GetVmRequest(vm=created.uuid), timeout=30)
        assert [d.target for d in got.spec.disks] == ["vda", "vdb", "vdc", "vdd"] and len(got.spec.nics) == 3

        # A VM that asked for no spare slots: libvirt's refusal is the operation's error, and the
        # disk is neither in the spec nor in the guest.
        tight = guest_spec("x86_64", "tight", disks=[vm.DiskSpec(volume=_volume(ch, "tight/d0.qcow2"))], hotplug_slots=0)
        t = ok(ch, vms.CreateVm(vm.CreateVmRequest(spec=tight, start=True), timeout=60), into=vm.Vm())
        tlog = serial_log(agent, t.uuid)
        tlog.wait_for(r"CNA-GUEST-READY boot=", timeout=150)
        assert vms.GetVm(vm.GetVmRequest(vm=t.uuid), timeout=30).spec.hotplug_slots == 0
        op = wait(ch, storage.AttachDisk(st.AttachDiskRequest(vm=t.uuid, disk=vm.DiskSpec(volume=_volume(ch, "tight/h0.qcow2"))),
                                         timeout=60))
        assert op.HasField("error") and "PCI" in op.error.message, op
        assert [d.target for d in vms.GetVm(vm.GetVmRequest(vm=t.uuid), timeout=30).spec.disks] == ["vda"]
        assert "CNA-HOTPLUG add block vdb" not in tlog.text()
        for u in (created.uuid, t.uuid):
            ok(ch, vms.DeleteVm(vm.DeleteVmRequest(vm=u, force=True), timeout=60))


def test_a_spec_asking_for_too_many_slots_is_refused_naming_the_field(vm_agent_factory) -> None:
    agent = vm_agent_factory()
    with agent.channel() as ch:
        vms = pb.vm_pb2_grpc.VmServiceStub(ch)
        with pytest.raises(grpc.RpcError) as err:
            vms.CreateVm(vm.CreateVmRequest(spec=guest_spec("x86_64", "many", hotplug_slots=33)), timeout=60)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "spec.hotplug_slots" in err.value.details()
        assert not vms.ListVms(vm.ListVmsRequest(), timeout=30).vms


def test_a_uefi_vm_boots_with_its_variable_store_in_the_agents_state_directory(vm_agent_factory, system_mode) -> None:
    libvirt_mode = system_mode  # QEMU's own user must reach the store: the case that matters
    """OVMF's per-VM variable store lives under <state_dir>/nvram, which libvirt fills from the
    template and relabels; an unprivileged QEMU must still pass the directories above it."""
    agent = vm_agent_factory(mode=libvirt_mode)
    with agent.channel() as ch:
        vms = pb.vm_pb2_grpc.VmServiceStub(ch)
        spec = guest_spec("x86_64", "uefi", firmware=vm.FIRMWARE_UEFI, memory_mib=256)
        created = ok(ch, vms.CreateVm(vm.CreateVmRequest(spec=spec, start=True), timeout=60), into=vm.Vm())
        serial_log(agent, created.uuid).wait_for(r"CNA-GUEST-READY boot=", timeout=240)
        nvram = agent.dir / "state" / "nvram" / f"{created.uuid}_VARS.fd"
        assert nvram.is_file() and nvram.stat().st_size > 0
        pid = vms.GetVm(vm.GetVmRequest(vm=created.uuid), timeout=30).status.qemu_pid
        assert str(nvram) in " ".join(_qemu_argv(pid))
        ok(ch, vms.DeleteVm(vm.DeleteVmRequest(vm=created.uuid, force=True), timeout=60))
