"""The test guests (tools/build-test-guest.py) and what boots them: the agent's VmSpec for e2e
tests, plain domain XML for tests on a libvirt connection.

Why here: a guest is built once (cached under .cache/guests, or $CNA_GUEST_CACHE) and its
kernel/initrd/console facts are needed by every tier that boots one; the way to read and type
into its console is in support/console.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

import pytest

from cna_agent.api import pb
from support.console import SerialLog
from support.tools import TOOLS

_BUILT: dict[tuple, dict] = {}


def build_guest(arch: str = "x86_64", *, boot_disk: bool = False, efi_boot_disk: bool = False) -> dict:
    """build-test-guest.py's JSON for ``arch``: {kernel, initrd, arch, marker, console}, with
    ``boot_disk`` also the BIOS boot disk (SYSLINUX on FAT16, x86_64) and with ``efi_boot_disk``
    the UEFI boot disk (GPT, Debian's signed GRUB on the ESP, aarch64). Built the first time,
    from the tool's cache afterwards; asked once per test process."""
    key = (arch, boot_disk, efi_boot_disk)
    if key not in _BUILT:
        args = ["--arch", arch, *(["--boot-disk"] if boot_disk else []),
                *(["--efi-boot-disk"] if efi_boot_disk else []), "--print-json"]
        p = subprocess.run([sys.executable, str(TOOLS / "build-test-guest.py"), *args], capture_output=True, text=True,
                           timeout=900)
        if p.returncode != 0:
            pytest.fail(f"build-test-guest.py {' '.join(args)} failed: {p.stderr[-2000:]}")
        _BUILT[key] = json.loads(p.stdout)
    return _BUILT[key]


def build_debian_guest(arch: str = "x86_64") -> dict:
    """tools/build-debian-guest.py's manifest (disk, kernel, initrd, cmdline, root_password, ...):
    the real Debian guest, built the first time (run-tests.sh starts that build in the
    background; this waits for it through the builder's lock), from its cache afterwards."""
    key = (f"debian-{arch}", False)
    if key not in _BUILT:
        p = subprocess.run([sys.executable, str(TOOLS / "build-debian-guest.py"), "--arch", arch, "--print-json"],
                           capture_output=True, text=True, timeout=1500)
        if p.returncode != 0:
            pytest.fail(f"build-debian-guest.py --arch {arch} failed: {p.stderr[-2000:]}")
        _BUILT[key] = json.loads(p.stdout)
    return _BUILT[key]


def build_debian_node(deb: Path, arch: str = "x86_64") -> dict:
    """The node flavour of the Debian guest (``build-debian-guest.py --node-deb``): the agent's
    .deb installed with its dependencies and QEMU, for tests of the package under the guest's own
    systemd. Cached by the .deb's content; built in the foreground (a minute, mostly downloads)."""
    key = (f"debian-node-{arch}", str(deb))
    if key not in _BUILT:
        p = subprocess.run([sys.executable, str(TOOLS / "build-debian-guest.py"), "--arch", arch, "--node-deb", str(deb),
                            "--print-json"], capture_output=True, text=True, timeout=1500)
        if p.returncode != 0:
            pytest.fail(f"build-debian-guest.py --node-deb {deb} failed: {p.stderr[-2000:]}")
        _BUILT[key] = json.loads(p.stdout)
    return _BUILT[key]


def guest_spec(arch: str, name: str, **kw) -> pb.vm_pb2.VmSpec:
    """A VmSpec (protobuf) that direct-boots the test guest of ``arch`` with a serial console and
    VNC (password ``pw123``); ``kw`` sets or replaces further fields."""
    vm = pb.vm_pb2
    g = build_guest(arch)
    spec = vm.VmSpec(
        name=name, vcpus=1, memory_mib=192, serial_console=True,
        arch=pb.common_pb2.ARCH_X86_64 if arch == "x86_64" else pb.common_pb2.ARCH_AARCH64,
        console=vm.ConsoleSpec(type=vm.CONSOLE_TYPE_VNC, password="pw123"),
        boot=vm.BootSpec(kernel=g["kernel"], initrd=g["initrd"], cmdline=f"console={g['console']} panic=-1"),
    )
    for k, v in kw.items():
        if isinstance(v, (int, str, bool)):
            setattr(spec, k, v)
        elif isinstance(v, (list, tuple)):
            getattr(spec, k).extend(v)
        else:
            getattr(spec, k).CopyFrom(v)
    return spec


def serial_log(agent, uuid: str) -> SerialLog:
    """The serial log the agent keeps for VM ``uuid`` (<run_dir>/vms/<uuid>/serial.log)."""
    return SerialLog(agent.dir / "run" / "vms" / uuid / "serial.log")


def domain_xml(
    name: str,
    guest: dict,
    *,
    serial_log: Path,
    serial_socket: Path | None = None,
    memory_mib: int = 256,
    vcpus: int = 1,
    numa_cells: int = 0,
    cmdline_extra: str = "",
    virt_type: str = "qemu",
    devices_extra: str = "",
) -> str:
    """Domain XML that direct-boots a test guest (``guest`` = build-test-guest.py's JSON).

    TCG by default: on these hosts /dev/kvm exists but a Linux guest hung under it. The serial
    port logs to serial_log and, if serial_socket is given, is also a unix socket for the shell.
    """
    arch = guest["arch"]
    if arch == "aarch64":
        os_type = "<type arch='aarch64' machine='virt'>hvm</type>"
        features = "<features><gic version='3'/></features>"
        cpu_model = "<model fallback='forbid'>cortex-a57</model>"
        cpu_mode = "custom"
    else:
        os_type = "<type arch='x86_64' machine='q35'>hvm</type>"
        features = "<features><acpi/><apic/></features>"
        cpu_model = "<model fallback='allow'>qemu64</model>"
        cpu_mode = "custom"
    numa = ""
    if numa_cells:
        per_cpu = vcpus // numa_cells
        per_mem = memory_mib * 1024 // numa_cells
        cells = "".join(
            f"<cell id='{i}' cpus='{i * per_cpu}-{(i + 1) * per_cpu - 1}' memory='{per_mem}' unit='KiB'/>"
            for i in range(numa_cells))
        numa = f"<numa>{cells}</numa>"
    cmdline = f"console={guest['console']} {cmdline_extra}".strip()
    if serial_socket:
        source = f"<source mode='bind' path={quoteattr(str(serial_socket))}/>"
        serial_type = "unix"
    else:
        source = ""
        serial_type = "null"
    return f"""<domain type='{virt_type}'>
  <name>{escape(name)}</name>
  <memory unit='MiB'>{memory_mib}</memory>
  <vcpu>{vcpus}</vcpu>
  <os>
    {os_type}
    <kernel>{escape(guest['kernel'])}</kernel>
    <initrd>{escape(guest['initrd'])}</initrd>
    <cmdline>{escape(cmdline)}</cmdline>
  </os>
  {features}
  <cpu mode='{cpu_mode}' match='exact' check='none'>{cpu_model}{numa}</cpu>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <serial type='{serial_type}'>
      {source}
      <log file={quoteattr(str(serial_log))} append='on'/>
      <target port='0'/>
    </serial>
    <console type='{serial_type}'>{source}<target type='serial' port='0'/></console>
    <memballoon model='none'/>
    {devices_extra}
  </devices>
</domain>
"""
