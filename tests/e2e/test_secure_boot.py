"""UEFI Secure Boot with Microsoft's keys enrolled, on the real Debian guest booted from its disk:
OVMF (the enrolled-keys build libvirt picks from its firmware descriptors) -> Debian's shim,
signed by Microsoft's UEFI CA -> Debian's signed GRUB -> Debian's signed cloud kernel, all from
the distribution's packages (tools/build-debian-guest.py builds the ESP). The same VM has a vTPM,
so the boot is also measured: the firmware's and shim's measurements into PCRs 0, 4 and 7 read
the same after a restart (the chain and the enrolled variable store are the same), while the
TPM's own state persists across the restart.

Judged from outside the agent: the guest kernel's console lines, ``mokutil --sb-state`` and the
SecureBoot EFI variable read in the guest's shell, libvirt's live XML (the secure loader, SMM,
the per-VM NVRAM) and the NVRAM file on the host.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path
from typing import Iterator

import pytest
from google.protobuf import duration_pb2

from cna_agent.api import pb

from support.agent import AgentProcess
from support.console import AgentConsole, SerialLog, login_root
from support.debian import TEMPLATE, debian_agent, guest_sh
from support.libvirt import domain_xml
from support.operations import ok

vm, st = pb.vm_pb2, pb.storage_pb2
pytestmark = [pytest.mark.slow, pytest.mark.skipif(os.geteuid() != 0, reason="the embedded QEMU driver here needs root")]

#: The SecureBoot variable of the EFI global namespace: 4 bytes of attributes, then 1 = enabled.
SECURE_BOOT_VAR = "/sys/firmware/efi/efivars/SecureBoot-8be4df61-93ca-11d2-aa0d-00e098032b8c"
#: Firmware code (0), boot applications: shim, GRUB, the kernel (4), Secure Boot policy and the
#: authorities that verified each image (7). PCR 1 is left out: OVMF adds its boot options to the
#: variable store on the first boot, so that measurement may differ on the second.
MEASURED_PCRS = "0,4,7"


@pytest.fixture
def secure_boot_env(libvirt_caps_cache) -> Iterator[tuple[AgentProcess, dict]]:
    with debian_agent(libvirt_caps_cache, "sb") as env:
        yield env


def _pcrs(console: AgentConsole) -> dict[str, str]:
    """``tpm2_pcrread``'s sha256 bank, as {index: hex digest}."""
    out = guest_sh(console, f"tpm2_pcrread sha256:{MEASURED_PCRS}")
    return dict(re.findall(r"^\s*(\d+)\s*:\s*0x([0-9A-Fa-f]{64})\s*$", out, re.M))


def test_secure_boot_with_enrolled_keys_boots_the_signed_debian_chain_and_measures_it_the_same_after_restart(
        secure_boot_env) -> None:
    agent, guest = secure_boot_env
    with agent.channel() as ch:
        vms = pb.vm_pb2_grpc.VmServiceStub(ch)
        storage = pb.storage_pb2_grpc.StorageServiceStub(ch)
        ok(ch, storage.CloneVolume(st.CloneVolumeRequest(request_id="sb-clone", source=TEMPLATE, datastore="ds",
                                                         path="sb/root.qcow2", linked=True), timeout=30))
        # no kernel: the firmware boots the disk's removable-media loader (shim)
        spec = vm.VmSpec(
            name="deb-sb", vcpus=2, memory_mib=768, serial_console=True, tpm=True, machine_type="q35",
            arch=pb.common_pb2.ARCH_X86_64, firmware=vm.FIRMWARE_UEFI, secure_boot=True,
            console=vm.ConsoleSpec(type=vm.CONSOLE_TYPE_NONE), disks=[vm.DiskSpec(volume="ds/sb/root.qcow2")])
        uuid = ok(ch, vms.CreateVm(vm.CreateVmRequest(spec=spec, start=True), timeout=60), into=vm.Vm()).uuid
        log = SerialLog(agent.dir / "run" / "vms" / uuid / "serial.log")
        log.wait_for(r"CNA-GUEST-READY boot=1 os=debian", timeout=240)

        # -- what libvirt runs: the Secure Boot loader with Microsoft's keys, SMM, per-VM NVRAM -----
        live = domain_xml(agent, "embedded", "deb-sb")
        loader = re.search(r"<loader ([^>]*)>([^<]+)</loader>", live)
        assert loader and "secure='yes'" in loader.group(1) and loader.group(2).endswith(".ms.fd"), live
        assert "<smm state='on'/>" in live
        nvram = re.search(r"<nvram[^>]*>([^<]+)</nvram>", live).group(1)
        assert nvram == str(agent.dir / "state" / "nvram" / f"{uuid}_VARS.fd") and Path(nvram).is_file()

        # -- what the guest saw: the kernel's own lines, then mokutil and the EFI variable ---------
        text = log.text()
        assert "EFI stub: UEFI Secure Boot is enabled" in text and "secureboot: Secure boot enabled" in text, text[-3000:]
        assert "Kernel is locked down from EFI Secure Boot" in text
        assert "Debian Secure Boot CA" in text  # the key shim handed to the kernel
        with AgentConsole(ch, uuid) as console:
            login_root(console, guest["root_password"])
            assert "SecureBoot enabled" in guest_sh(console, "mokutil --sb-state")
            # od prints the variable's 4 attribute bytes, then the value
            assert guest_sh(console, f"od -An -tu1 {SECURE_BOOT_VAR}").split()[-1] == "1"
            assert "lockdown" in guest_sh(console, "dmesg | grep -i lockdown || true").lower()
            guest_sh(console, "test -c /dev/tpm0")
            before = _pcrs(console)
            assert sorted(before) == ["0", "4", "7"] and all(set(v) != {"0"} for v in before.values()), before

        # -- a restart through systemd (ACPI), then the same chain again -----------------------------
        stopped = ok(ch, vms.ShutdownVm(vm.ShutdownVmRequest(vm=uuid, timeout=duration_pb2.Duration(seconds=90)), timeout=30),
                     into=vm.Vm(), timeout=120)
        assert stopped.status.state == vm.VM_STATE_STOPPED
        assert Path(nvram).is_file()  # the variable store outlives the QEMU process
        ok(ch, vms.StartVm(vm.VmActionRequest(vm=uuid), timeout=60))
        log.wait_for(r"CNA-GUEST-READY boot=2 os=debian", timeout=240)
        with AgentConsole(ch, uuid) as console:
            login_root(console, guest["root_password"])
            assert "SecureBoot enabled" in guest_sh(console, "mokutil --sb-state")
            assert _pcrs(console) == before

        ok(ch, vms.DeleteVm(vm.DeleteVmRequest(vm=uuid, force=True), timeout=60), timeout=120)
        assert not Path(nvram).exists()
        assert not subprocess.run(["pgrep", "-f", "guest=deb-sb"], capture_output=True, timeout=10).stdout
