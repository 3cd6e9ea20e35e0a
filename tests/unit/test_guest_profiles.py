"""Guest profiles (compute/guest_profiles.py): what each OS family gets from its virtual hardware.

Every Windows variant (without and with virtio drivers, UEFI and BIOS, KVM and TCG) and every
Euler one (x86_64, aarch64 from a disk and from a direct kernel) passes virt-xml-validate and is
defined on libvirt's test driver (test:///default: libvirt's own domain parser, no daemon), and
the profile's differences are read back from libvirt's XML through the typed model. That the
QEMU driver boots the Euler aarch64 direct kernel through AAVMF with ACPI was checked by hand
on the embedded driver (the busybox test guest reached its marker, ACPI tables and ttyAMA0 on
the PL011 in its log); the golden file is tests/fixtures/domxml/aarch64_euler_direct_kernel_uefi.xml.
"""

from __future__ import annotations

import dataclasses
import pytest
from support.xml import schema_check

from cna_agent.compute import domxml as dx
from cna_agent.compute.guest_profiles import PROFILES, profile_for
from cna_agent.compute.render import Bindings, RenderContext, build_domain, host_limitations, interface_xml, render_xml
from cna_agent.compute.spec import BootSpec, DiskSpec, NicSpec, VmSpec
from cna_agent.compute.spec_validation import ValidationContext, validate
from cna_agent.contracts import DiskSourceBinding, NicBinding

UUID = "0b7d3c1e-5a2f-4e6d-8c9b-1a2b3c4d5e6f"
X86_KVM = RenderContext(host_arch="x86_64", virt_type="kvm", state_dir="/var/lib/cna-agent", run_dir="/run/cna-agent",
                        agent_version="test", qmp_side_channel=False)
X86_TCG = dataclasses.replace(X86_KVM, virt_type="qemu")
ARM_KVM = dataclasses.replace(X86_KVM, host_arch="aarch64")
DISK = DiskSourceBinding(kind="file", path="/srv/images/guest.qcow2", format="qcow2")
NIC = NicBinding(kind="linux-bridge", bridge="br0", port_group="pg-web")


def _spec(family: str, **kw) -> VmSpec:
    """A VM with one of each device a profile decides about (disk, NIC, balloon, panic where
    the arch has one, serial console, VNC)."""
    arch = kw.get("arch", "x86_64")
    spec = VmSpec(name=f"{family}1", uuid=UUID, os_family=family, vcpus=2, memory_mib=2048, balloon=True,
                  serial_console=True, guest_agent=True, panic_device=arch == "x86_64",
                  disks=[DiskSpec(volume="ds/guest.qcow2", boot_order=1)],
                  nics=[NicSpec(port_group="pg-web", mac="52:54:00:00:01:01")])
    return dataclasses.replace(spec, **kw)


KERNEL = BootSpec(kernel="/img/Image", initrd="/img/initrd.gz", cmdline="console=ttyAMA0")
CASES: dict[str, tuple[VmSpec, RenderContext]] = {
    "windows-legacy-uefi": (_spec("windows", firmware="uefi"), X86_KVM),
    "windows-legacy-bios": (_spec("windows", firmware="bios"), X86_KVM),
    "windows-virtio-uefi": (_spec("windows", firmware="uefi", virtio_drivers=True), X86_KVM),
    "windows-virtio-bios": (_spec("windows", virtio_drivers=True), X86_KVM),
    "windows-legacy-tcg": (_spec("windows", firmware="uefi"), X86_TCG),
    "euler-x86_64": (_spec("euler"), X86_KVM),
    "euler-aarch64-disk": (_spec("euler", arch="aarch64"), ARM_KVM),
    "euler-aarch64-kernel": (_spec("euler", arch="aarch64", boot=KERNEL), ARM_KVM),
}


def _render(spec: VmSpec, ctx: RenderContext) -> str:
    validate(spec, ValidationContext(host_arch=ctx.host_arch, virt_type=ctx.virt_type, host_cpus=8))
    return render_xml(spec, Bindings(disks=[DISK] * len(spec.disks), nics=[NIC] * len(spec.nics), kernel=spec.boot.kernel,
                                     initrd=spec.boot.initrd), ctx)


@pytest.fixture(scope="module")
def test_driver():
    libvirt = pytest.importorskip("libvirt")
    conn = libvirt.open("test:///default")
    yield conn
    conn.close()


def _as_libvirt_keeps_it(conn, xml: str) -> dx.Domain:
    """libvirt's own XML of ``xml`` defined on the test driver (undefined again)."""
    dom = conn.defineXML(xml)
    try:
        return dx.Domain.from_xml(dom.XMLDesc(0))
    finally:
        dom.undefine()


@pytest.mark.parametrize("name", sorted(CASES))
def test_each_variant_passes_the_schema_libvirt_defines_it_and_keeps_the_profile(name, tmp_path, test_driver) -> None:
    spec, ctx = CASES[name]
    xml = _render(spec, ctx)
    schema_check(tmp_path, xml, "domain", name)
    got = _as_libvirt_keeps_it(test_driver, xml)
    p = profile_for(spec.os_family, spec.arch or ctx.host_arch)
    assert got.clock.offset == p.clock_offset
    assert [d.target_bus for d in got.devices.disks] == [p.disk_bus(spec.virtio_drivers)]
    assert [i.model for i in got.devices.interfaces] == [p.nic_model(spec.virtio_drivers)]
    assert got.devices.memballoon.model == ("virtio" if p.balloon(spec.virtio_drivers) else "none")
    assert (got.features.hyperv is not None) == p.hyperv
    assert got.features.vmport is (False if p.vmport_off else None)
    assert [pn.model for pn in got.devices.panics] == ([p.panic_model(ctx.virt_type)] if spec.panic_device else [])
    uefi = (spec.firmware or p.default_firmware(direct_kernel=bool(spec.boot.kernel))) == "uefi"
    assert (got.os.firmware == "efi") == uefi and got.features.acpi is True
    # the channel is the spec's for every family (openEuler does not install qemu-ga by default)
    assert [c.target_name for c in got.devices.channels] == ["org.qemu.guest_agent.0"]


def test_windows_without_drivers_boots_from_what_setup_drives_and_keeps_local_time() -> None:
    spec, ctx = CASES["windows-legacy-bios"]
    dom = dx.Domain.from_xml(_render(spec, ctx))
    assert (dom.devices.disks[0].target_bus, dom.devices.disks[0].target_dev) == ("sata", "sda")
    assert dom.devices.interfaces[0].model == "e1000e" and dom.devices.memballoon.model == "none"
    assert dom.clock.offset == "localtime"
    assert [(t.name, t.tickpolicy, t.present) for t in dom.clock.timers] == [
        ("rtc", "catchup", None), ("pit", "delay", None), ("hpet", None, False), ("hypervclock", None, True)]
    assert dom.devices.panics[0].model == "hyperv" and dom.features.hyperv.synic is True
    assert dom.os.firmware is None  # BIOS: no <os firmware>, no NVRAM
    # hot-plug renders the same NIC the full domain has
    assert dx.Interface.from_xml(interface_xml(spec, 0, NIC)).model == "e1000e"


def test_windows_with_drivers_gets_virtio_and_tcg_the_isa_panic_without_hypervclock() -> None:
    virtio = dx.Domain.from_xml(_render(*CASES["windows-virtio-uefi"]))
    assert virtio.devices.disks[0].target_bus == "virtio" and virtio.devices.interfaces[0].model == "virtio"
    assert virtio.devices.memballoon.model == "virtio" and virtio.os.firmware == "efi"
    tcg = dx.Domain.from_xml(_render(*CASES["windows-legacy-tcg"]))
    assert tcg.clock.offset == "localtime" and "hypervclock" not in {t.name for t in tcg.clock.timers}
    assert tcg.devices.panics[0].model == "isa"
    assert host_limitations(*CASES["windows-legacy-tcg"])  # GetVm says what TCG left out


def test_euler_on_aarch64_boots_a_direct_kernel_through_uefi_where_linux_uses_no_firmware(test_driver) -> None:
    spec, ctx = CASES["euler-aarch64-kernel"]
    euler = _as_libvirt_keeps_it(test_driver, _render(spec, ctx))
    assert euler.os.firmware == "efi" and euler.os.nvram == f"/var/lib/cna-agent/nvram/{UUID}_VARS.fd"
    assert euler.os.kernel == "/img/Image" and euler.os.cmdline == "console=ttyAMA0"
    assert euler.features.acpi is True and euler.features.gic_version == "3"
    linux = _as_libvirt_keeps_it(test_driver, _render(dataclasses.replace(spec, os_family="linux"), ctx))
    assert linux.os.firmware is None and linux.os.nvram is None and not linux.features.acpi
    # an explicit firmware still wins: UEFI for both from a disk
    assert dx.Domain.from_xml(_render(*CASES["euler-aarch64-disk"])).os.firmware == "efi"


def _without_metadata(spec: VmSpec, ctx: RenderContext) -> str:
    dom = build_domain(spec, Bindings(disks=[DISK], nics=[NIC], kernel=spec.boot.kernel), ctx)
    dom.metadata = []
    return dom.to_xml()


@pytest.mark.parametrize("name", ["euler-x86_64", "euler-aarch64-disk"])
def test_euler_is_linux_wherever_openeuler_documents_nothing_else(name: str) -> None:
    spec, ctx = CASES[name]
    assert _without_metadata(spec, ctx) == _without_metadata(dataclasses.replace(spec, os_family="linux"), ctx)
    assert host_limitations(spec, ctx) == ()


def test_every_family_has_a_profile_per_arch_and_the_table_is_frozen() -> None:
    assert set(PROFILES) == {"linux", "windows", "euler"}
    for family, by_arch in PROFILES.items():
        assert set(by_arch) == {"x86_64", "aarch64"}
        for arch, p in by_arch.items():
            assert (p.family, p.arch) == (family, arch)
    assert profile_for("", "aarch64") is profile_for("linux", "aarch64")
    assert not any(p.hyperv for p in (profile_for(f, "aarch64") for f in PROFILES))  # Hyper-V is x86 only
    with pytest.raises(dataclasses.FrozenInstanceError):
        profile_for("euler", "x86_64").clock_offset = "localtime"  # type: ignore[misc]
    with pytest.raises(KeyError):
        profile_for("solaris", "x86_64")


@pytest.mark.parametrize("family", ["linux", "euler"])
def test_the_linux_families_drive_virtio_whatever_virtio_drivers_says(family: str) -> None:
    p = profile_for(family, "x86_64")
    assert (p.disk_bus(False), p.nic_model(False), p.balloon(False)) == ("virtio", "virtio", True)
    assert not p.hyperv and p.clock_offset == "utc" and p.panic_model("kvm") == "isa"
