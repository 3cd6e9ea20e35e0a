"""What each guest OS family gets from its virtual hardware, per architecture: one frozen
:class:`GuestProfile` per (os_family, arch), which render.py asks instead of testing the family
inline.

Why a table of its own: the family's choices (clock, Hyper-V, the buses a guest without virtio
drivers can boot from, the panic device, the default firmware) used to be ``os_family ==
"windows"`` tests spread over the builder, where what a family gets could only be learnt by
reading all of it; here each family is one entry, compared and tested side by side
(tests/unit/test_guest_profiles.py), and GetVm's host limitations read the same entry as the
builder. The default machine type and firmware are here too, since a family may change the
firmware (Euler does); what depends on the architecture alone (video, inputs, TPM model, GIC,
CPU model) stays in render.py.

What differs (each entry's comments say why, with the source):

* linux: virtio everything; the RTC in UTC; on x86_64 the timer policy virt-install gives
  every x86 guest.
* windows (x86_64 only; spec.py refuses it on aarch64): Hyper-V enlightenments, the RTC in
  local time plus the Hyper-V reference clock, the Hyper-V crash MSRs as panic device, vmport
  off; without ``virtio_drivers``: SATA disks, an e1000e NIC and no balloon.
* euler (EulerOS / openEuler): Linux's, except that on aarch64 a direct kernel boot still goes
  through UEFI (openEuler documents UEFI as the only boot mode of its AArch64 VMs).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from cna_agent.compute import domxml as dx
from cna_agent.compute import hyperv


@dataclass(frozen=True)
class GuestProfile:
    """The choices that differ per OS family on one architecture."""

    family: str  # "linux", "windows" or "euler"
    arch: str  # "x86_64" or "aarch64"
    #: Machine type when the spec names none.
    machine: str
    #: Firmware when the spec names none, for a disk boot and for a direct kernel boot
    #: ("bios", "uefi"; "" = none, the kernel boots with a device tree).
    firmware: str
    firmware_direct_kernel: str
    #: ``<clock offset>``.
    clock_offset: str = "utc"
    #: The x86 timer policy: a late RTC tick is caught up, a late PIT tick delayed, no HPET
    #: (unneeded, and it costs): virt-install's default for every x86 QEMU guest, Windows
    #: included (virt-manager, virtinst/domain/clock.py).
    pc_timers: bool = False
    #: Hyper-V enlightenments, the reference clock (hypervclock) and the crash MSRs, each where
    #: this hypervisor offers it (hyperv.py decides; GetVm names what was left out).
    hyperv: bool = False
    #: ``<vmport state='off'/>``: the VMware backdoor port (only Hyper-V guests turn it off).
    vmport_off: bool = False
    #: Whether virtio devices need drivers the guest may not have; then ``spec.virtio_drivers``
    #: says it has them, and without them it gets the devices below.
    virtio_needs_drivers: bool = False
    driverless_disk_bus: str = "virtio"
    driverless_nic_model: str = "virtio"

    def driverless(self, virtio_drivers: bool) -> bool:
        """The guest cannot drive virtio devices (a Windows install without virtio-win)."""
        return self.virtio_needs_drivers and not virtio_drivers

    def disk_bus(self, virtio_drivers: bool) -> str:
        return self.driverless_disk_bus if self.driverless(virtio_drivers) else "virtio"

    def nic_model(self, virtio_drivers: bool) -> str:
        return self.driverless_nic_model if self.driverless(virtio_drivers) else "virtio"

    def balloon(self, virtio_drivers: bool) -> bool:
        """A virtio balloon is only given to a guest that drives it (one without the driver would
        show an unknown PCI device and never return memory)."""
        return not self.driverless(virtio_drivers)

    def default_firmware(self, direct_kernel: bool) -> str:
        return self.firmware_direct_kernel if direct_kernel else self.firmware

    def clock(self, domain_type: str) -> dx.Clock:
        timers = []
        if self.pc_timers:
            timers = [dx.Timer(name="rtc", tickpolicy="catchup"), dx.Timer(name="pit", tickpolicy="delay"),
                      dx.Timer(name="hpet", present=False)]
        if self.hyperv and hyperv.clock_offered(domain_type):
            timers.append(dx.Timer(name="hypervclock", present=True))
        return dx.Clock(offset=self.clock_offset, timers=timers)

    def panic_model(self, domain_type: str) -> str:
        """The Hyper-V crash MSRs where offered (Windows reports its bugcheck through them),
        else the ISA pvpanic device."""
        return "hyperv" if self.hyperv and hyperv.crash_msrs_offered(domain_type) else "isa"


_LINUX = {
    "x86_64": GuestProfile("linux", "x86_64", machine="q35", firmware="bios", firmware_direct_kernel="bios",
                           pc_timers=True),
    # aarch64 virt has no BIOS: UEFI (AAVMF) for a disk boot; a direct kernel boot needs no
    # firmware and boots with QEMU's device tree (render.py: then without ACPI).
    "aarch64": GuestProfile("linux", "aarch64", machine="virt", firmware="uefi", firmware_direct_kernel=""),
}

_WINDOWS = {
    # Windows reads the RTC as local time (unless its RealTimeIsUniversal registry value says
    # otherwise), hence offset='localtime' (libosinfo's clock for Windows, which virt-install
    # applies: virtinst/domain/clock.py). Hyper-V: what Windows runs fast and keeps time with
    # under KVM (QEMU docs/system/i386/hyperv.rst; hyperv.py). Windows Setup has drivers for
    # AHCI (SATA) and the Intel e1000e, not for virtio (virtio-win is a separate install).
    "x86_64": replace(_LINUX["x86_64"], family="windows", clock_offset="localtime", hyperv=True, vmport_off=True,
                      virtio_needs_drivers=True, driverless_disk_bus="sata", driverless_nic_model="e1000e"),
    # Refused by spec_validation.validate (Hyper-V is x86 only); kept so profile_for never fails on a
    # stored spec, with nothing x86 in it.
    "aarch64": replace(_LINUX["aarch64"], family="windows", clock_offset="localtime",
                       virtio_needs_drivers=True, driverless_nic_model="e1000e"),
}

_EULER = {
    # openEuler's x86_64 VMs: what Linux gets (the openEuler Virtualization guide's x86_64
    # example: <clock offset='utc'/>, virtio disk and NIC, BIOS or UEFI).
    "x86_64": replace(_LINUX["x86_64"], family="euler"),
    # UEFI for a direct kernel boot too: openEuler documents UEFI as the only boot mode of
    # AArch64 VMs ("x86 servers support UEFI and BIOS boot modes, and AArch64 servers support
    # only the UEFI boot mode": openEuler Virtualization guide, Preparing Boot Firmware,
    # openeuler-mirror/docs content/en/docs/Virtualization/preparing-boot-firmware.md) and
    # every AArch64 example there boots through the edk2 loader with <acpi/>. Without UEFI
    # the guest has no ACPI, and QEMU's virt machine then refuses memory hot-add ("memory
    # hotplug is not enabled: missing acpi-ged device", hw/arm/virt.c), which openEuler
    # documents for its AArch64 VMs (the same guide, Memory Hot Add).
    "aarch64": replace(_LINUX["aarch64"], family="euler", firmware_direct_kernel="uefi"),
}
# Researched for Euler and left out, for want of a source that makes them openEuler's need:
# the guest-agent channel always present (the same guide: qemu-guest-agent "is not installed
# on openEuler by default", so the channel stays spec.guest_agent's, which backups, passwords
# and first boot check); virtio-rng (nothing openEuler-specific); a console on ttyAMA0 (the
# PL011 libvirt gives every aarch64 virt guest already); a clock source (the guide's examples
# use <clock offset='utc'/>, Linux's).

PROFILES: dict[str, dict[str, GuestProfile]] = {"linux": _LINUX, "windows": _WINDOWS, "euler": _EULER}


def profile_for(os_family: str, arch: str) -> GuestProfile:
    """The profile of ``os_family`` ("" = linux) on ``arch``; KeyError for a family or arch
    spec_validation.validate does not accept."""
    return PROFILES[os_family or "linux"][arch]
