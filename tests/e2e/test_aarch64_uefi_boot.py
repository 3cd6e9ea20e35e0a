"""An aarch64 guest boots through AAVMF (UEFI, per-VM NVRAM) from its disk, as TaiShan hosts
boot their guests, not only by direct kernel boot.

The real daemon over gRPC, the real aarch64 test guest's UEFI boot disk (GPT, Debian's signed
GRUB on the ESP: tools/build-test-guest.py --efi-boot-disk) in a dir datastore, firmware UEFI
and no ``boot.kernel``, under TCG. The guest prints ``CNA-FACT bootsrc=efi-disk`` only when
GRUB on the disk started its kernel, so the boot path is observed on the serial log; the
firmware and its NVRAM are read from libvirt's own domain XML and from the disk, outside the
agent.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator
from xml.etree import ElementTree as ET

import pytest

from cna_agent.api import pb

from support.agent import AgentProcess
from support.guests import build_guest, serial_log
from support.libvirt import domain_xml
from support.operations import ok

vm = pb.vm_pb2
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the embedded QEMU driver here needs root")

#: What libvirt copies into each UEFI VM's own NVRAM (qemu's firmware descriptor
#: 60-edk2-aarch64.json names it for AAVMF_CODE.fd).
AAVMF_VARS = Path("/usr/share/AAVMF/AAVMF_VARS.fd")


@pytest.fixture
def efi_env(vm_agent_factory) -> Iterator[AgentProcess]:
    """An agent (embedded libvirt, conftest's factory: a short /tmp path, stopped afterwards and
    its guests killed by the autouse fixture) with a dir datastore "ds" holding a copy of the
    UEFI boot disk; the cached disk stays untouched."""
    disk = Path(build_guest("aarch64", efi_boot_disk=True)["efi_boot_disk"])
    ds = Path(tempfile.mkdtemp(prefix="ue", dir="/tmp"))
    try:
        (ds / "arm").mkdir()
        shutil.copyfile(disk, ds / "arm" / "root.raw")
        yield vm_agent_factory(extra_config=f'[storage.datastores.ds]\ntype = "dir"\npath = "{ds}"\n')
    finally:
        shutil.rmtree(ds, ignore_errors=True)


@pytest.mark.slow
def test_aarch64_guest_boots_through_aavmf_and_grub_from_its_disk_with_per_vm_nvram(efi_env) -> None:
    agent = efi_env
    spec = vm.VmSpec(name="arm-efi", vcpus=1, memory_mib=256, serial_console=True, arch=pb.common_pb2.ARCH_AARCH64,
                     firmware=vm.FIRMWARE_UEFI, console=vm.ConsoleSpec(type=vm.CONSOLE_TYPE_NONE),
                     disks=[vm.DiskSpec(volume="ds/arm/root.raw", boot_order=1)])
    with agent.channel() as ch:
        vms = pb.vm_pb2_grpc.VmServiceStub(ch)
        created = ok(ch, vms.CreateVm(vm.CreateVmRequest(spec=spec, start=True), timeout=60), into=vm.Vm())
        uuid = created.uuid
        got = vms.GetVm(vm.GetVmRequest(vm=uuid), timeout=30)
        assert got.spec.firmware == vm.FIRMWARE_UEFI and not got.spec.boot.kernel
        qemu_argv = Path(f"/proc/{got.status.qemu_pid}/cmdline").read_bytes().split(b"\0")
        assert b"-kernel" not in qemu_argv and b"-initrd" not in qemu_argv, qemu_argv

        # booted from the disk through GRUB: its grub.cfg alone puts cna.bootsrc=efi-disk there
        log = serial_log(agent, uuid)
        log.wait_for(r"^CNA-GUEST-READY boot=", timeout=120)
        text = log.text()
        assert "CNA-FACT bootsrc=efi-disk" in text and "CNA-FACT arch=aarch64" in text, text[-3000:]
        assert text.index("CNA-FACT bootsrc=efi-disk") < text.index("CNA-GUEST-READY")

        # libvirt's own XML: the definition asks for UEFI firmware with the per-VM NVRAM in the
        # agent's state dir; the running domain has it resolved to AAVMF (libvirt 9.0 drops the
        # firmware attribute from the live XML once it picked the firmware). The status file
        # wraps the domain in <domstatus>: hence iter.
        nvram = agent.dir / "state" / "nvram" / f"{uuid}_VARS.fd"
        defined = next(ET.fromstring(domain_xml(agent, "embedded", "arm-efi", live=False)).iter("os"))
        assert defined.get("firmware") == "efi", ET.tostring(defined).decode()
        assert defined.find("nvram").text == str(nvram)
        live = next(ET.fromstring(domain_xml(agent, "embedded", "arm-efi")).iter("os"))
        assert live.find("type").get("machine").startswith("virt")
        loader = live.find("loader")
        assert loader is not None and loader.text.startswith("/usr/share/AAVMF/"), ET.tostring(live).decode()
        assert loader.get("type") == "pflash" and loader.get("readonly") == "yes"
        assert live.find("nvram").text == str(nvram) and live.find("nvram").get("template") == str(AAVMF_VARS)
        assert nvram.is_file() and nvram.stat().st_size == AAVMF_VARS.stat().st_size

        # a reboot comes back through the same path: firmware, GRUB, kernel
        ok(ch, vms.RebootVm(vm.RebootVmRequest(vm=uuid), timeout=30))
        log.wait_for(r"^CNA-GUEST-READY boot=", count=2, timeout=120)
        assert log.count(r"^CNA-FACT bootsrc=efi-disk$") == 2 and log.count(r"^CNA-FACT bootsrc=") == 2
        assert nvram.is_file()

        # the VM's NVRAM goes with it
        ok(ch, vms.DeleteVm(vm.DeleteVmRequest(vm=uuid, force=True), timeout=60))
        assert not vms.ListVms(vm.ListVmsRequest(include_unmanaged=True), timeout=10).vms
        assert not nvram.exists()
