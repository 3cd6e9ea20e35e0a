"""Domain XML builder: every profile renders to its golden file, passes virt-xml-validate,
and parses back into the same model (build(parse(xml)) == xml).

Regenerate the golden files after an intended change with ``CNA_UPDATE_GOLDEN=1``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cna_agent.compute import domxml as dx
from cna_agent.contracts import Bandwidth, DiskSourceBinding, GuestNumaCell, NicBinding, PlacementPlan
from cna_agent.compute.render import Bindings, RenderContext, build_domain, render_xml
from cna_agent.compute.spec import BootSpec, ConsoleSpec, CpuQos, CpuTopology, DiskSpec, IoQos, MemoryQos, NicSpec, VmSpec
from cna_agent.compute.spec_validation import ValidationContext, validate
from support.xml import schema_check

GOLDEN = Path(__file__).resolve().parents[1] / "fixtures" / "domxml"
UUID = "6f1c3a52-8d0e-4b7a-9c1d-2e3f4a5b6c7d"
X86_TCG = RenderContext(host_arch="x86_64", virt_type="qemu", state_dir="/var/lib/cna-agent", run_dir="/run/cna-agent",
                        host_cpu_mhz=2600, agent_version="test", created="2024-01-01T00:00:00Z")
X86_KVM = RenderContext(host_arch="x86_64", virt_type="kvm", state_dir="/var/lib/cna-agent", run_dir="/run/cna-agent",
                        host_cpu_mhz=2600, agent_version="test", created="2024-01-01T00:00:00Z")
ARM_KVM = RenderContext(host_arch="aarch64", virt_type="kvm", state_dir="/var/lib/cna-agent", run_dir="/run/cna-agent",
                        host_cpu_mhz=2600, agent_version="test", created="2024-01-01T00:00:00Z")
FILE_DISK = DiskSourceBinding(kind="file", path="/srv/images/root.qcow2", format="qcow2")
NFS_DISK = DiskSourceBinding(kind="file", path="/srv/nfs/data.raw", format="raw", supports_direct_io=False)
ISCSI = DiskSourceBinding(kind="network", protocol="iscsi", hosts=(("192.0.2.10", 3260),),
                          name="iqn.2024-01.org.example:store/1", auth_username="chap", auth_secret_uuid=UUID)
OVS = NicBinding(kind="ovs", bridge="br-int", port_group="pg-web", vlan=100, inbound=Bandwidth(8000, 16000, 1024))
LINUX_BR = NicBinding(kind="linux-bridge", bridge="br0", port_group="pg-mgmt", filter="clean-traffic",
                      filter_params={"IP": "192.0.2.5"}, mtu=1500)


def _base(**kw) -> VmSpec:
    spec = VmSpec(name="vm1", uuid=UUID, vcpus=2, memory_mib=512, serial_console=True)
    for k, v in kw.items():
        setattr(spec, k, v)
    return spec


PROFILES: dict[str, tuple[VmSpec, Bindings, RenderContext]] = {
    "x86_linux_bios_pc": (
        _base(machine_type="pc", firmware="bios", disks=[DiskSpec(volume="ds/root.qcow2", boot_order=1, bus="ide")]),
        Bindings(disks=[FILE_DISK]), X86_TCG),
    "x86_linux_bios_q35": (
        _base(os_family="linux", disks=[DiskSpec(volume="ds/root.qcow2", boot_order=1),
                                        DiskSpec(volume="ds/data.raw", cache="writeback", qos=IoQos(total_iops_sec=500))],
              nics=[NicSpec(port_group="pg-web", mac="52:54:00:00:00:01", interface_id="09b11c53-8b5c-4eeb-8f00-d84eaa0aaa4f", queues=2)],
              guest_agent=True, watchdog=True, panic_device=True, balloon=True,
              console=ConsoleSpec(type="vnc", password="secret12", keymap="en-us")),
        Bindings(disks=[FILE_DISK, NFS_DISK], nics=[OVS]), X86_TCG),
    "x86_linux_uefi_q35_kvm": (
        _base(firmware="uefi", secure_boot=True, cpu_mode="host-model", vcpus=4, max_vcpus=8,
              cpu_topology=CpuTopology(sockets=2, cores=2, threads=2), max_memory_mib=2048,
              disks=[DiskSpec(volume="ds/root.qcow2", bus="scsi", boot_order=1), DiskSpec(lun=None, volume="san/lun1", device="lun", bus="scsi")],
              nics=[NicSpec(port_group="pg-mgmt", mac="52:54:00:00:00:02", link_down=True, boot_order=2)]),
        Bindings(disks=[FILE_DISK, ISCSI], nics=[LINUX_BR]), X86_KVM),
    "x86_windows_legacy": (
        _base(os_family="windows", firmware="uefi", vcpus=4, memory_mib=4096, panic_device=True, balloon=True,
              disks=[DiskSpec(volume="ds/win.qcow2", boot_order=1), DiskSpec(volume="ds/virtio-win.iso", device="cdrom")],
              nics=[NicSpec(port_group="pg-web", mac="52:54:00:00:00:03")], console=ConsoleSpec(password="pw")),
        Bindings(disks=[FILE_DISK, FILE_DISK], nics=[OVS]), X86_KVM),
    "x86_windows_virtio": (
        _base(os_family="windows", virtio_drivers=True, vcpus=2, memory_mib=4096, balloon=True, guest_agent=True,
              disks=[DiskSpec(volume="ds/win.qcow2", boot_order=1)], nics=[NicSpec(port_group="pg-web", mac="52:54:00:00:00:04")]),
        Bindings(disks=[FILE_DISK], nics=[OVS]), X86_KVM),
    "x86_euler_qos": (
        _base(os_family="euler", vcpus=4, memory_mib=2048, cpu_qos=CpuQos(shares=2048, limit_mhz=5200, reservation_mhz=1000),
              memory_qos=MemoryQos(limit_mib=3072, reservation_mib=1024), hugepages=True,
              disks=[DiskSpec(volume="ds/euler.qcow2", boot_order=1, serial="sys-disk")]),
        Bindings(disks=[FILE_DISK], placement=PlacementPlan(vcpu_pins={0: (2,), 1: (3,), 2: (4,), 3: (5,)}, emulator_cpus=(0, 1), memory_nodes=(0,))),
        X86_KVM),
    # A Kunpeng dedicated VM spanning two host nodes: guest cells mirror them (memnode per
    # cell), 512 MiB pages; the plan's I/O thread gets no pin (the domain defines none).
    "aarch64_dedicated_spanning_hugepages": (
        _base(arch="aarch64", vcpus=4, memory_mib=2048, dedicated_cpus=True, hugepages=True, console=ConsoleSpec(type="none"),
              disks=[DiskSpec(volume="ds/euler-arm.qcow2", boot_order=1)]),
        Bindings(disks=[FILE_DISK], placement=PlacementPlan(
            vcpu_pins={0: (0,), 1: (1,), 2: (24,), 3: (25,)}, emulator_cpus=(4, 5, 28, 29), iothread_cpus={1: (4, 5, 28, 29)},
            memory_nodes=(0, 1), guest_cells=(GuestNumaCell(0, (0, 1), 1024, 0), GuestNumaCell(1, (2, 3), 1024, 1)),
            hugepage_kib=524288, dedicated=True)),
        ARM_KVM),
    # Memory hot-plug needs a guest NUMA cell; a single-node plan makes none, so the spec's own
    # cell stays and only the hugepage size and pins come from the plan.
    "x86_dedicated_hotplug_1g_pages": (
        _base(vcpus=2, max_vcpus=4, memory_mib=2048, max_memory_mib=8192, dedicated_cpus=True, hugepages=True,
              disks=[DiskSpec(volume="ds/root.qcow2", boot_order=1)]),
        Bindings(disks=[FILE_DISK], placement=PlacementPlan(
            vcpu_pins={0: (2,), 1: (42,), 2: (3,), 3: (43,)}, emulator_cpus=(4, 44), iothread_cpus={1: (4, 44)},
            memory_nodes=(0,), hugepage_kib=1048576, dedicated=True)),
        X86_KVM),
    "x86_direct_boot_tcg": (
        _base(vcpus=1, memory_mib=256, console=ConsoleSpec(type="none"), boot=BootSpec(kernel="/img/vmlinuz", initrd="/img/initrd.gz", cmdline="console=ttyS0")),
        Bindings(kernel="/img/vmlinuz", initrd="/img/initrd.gz"), X86_TCG),
    "aarch64_uefi_kvm": (
        _base(arch="aarch64", vcpus=8, memory_mib=4096, numa_cells=2, balloon=True,
              cpu_topology=CpuTopology(sockets=1, clusters=2, cores=4, threads=1),
              disks=[DiskSpec(volume="ds/euler-arm.qcow2", boot_order=1)], nics=[NicSpec(port_group="pg-web", mac="52:54:00:00:00:05")]),
        Bindings(disks=[FILE_DISK], nics=[OVS]), ARM_KVM),
    # openEuler on Kunpeng from a direct kernel: through UEFI (AAVMF, per-VM NVRAM) with ACPI,
    # where a Linux guest would boot without firmware (guest_profiles.py).
    "aarch64_euler_direct_kernel_uefi": (
        _base(arch="aarch64", os_family="euler", vcpus=4, memory_mib=2048, guest_agent=True, balloon=True,
              boot=BootSpec(kernel="/img/Image", initrd="/img/initrd.gz", cmdline="console=ttyAMA0 root=/dev/vda"),
              disks=[DiskSpec(volume="ds/openeuler-arm.qcow2")], nics=[NicSpec(port_group="pg-web", mac="52:54:00:00:00:06")]),
        Bindings(disks=[FILE_DISK], nics=[OVS], kernel="/img/Image", initrd="/img/initrd.gz"), ARM_KVM),
    "aarch64_direct_boot_tcg_numa": (
        _base(arch="aarch64", vcpus=4, memory_mib=256, numa_cells=2, console=ConsoleSpec(type="none"),
              boot=BootSpec(kernel="/img/Image", initrd="/img/initrd.gz", cmdline="console=ttyAMA0")),
        Bindings(kernel="/img/Image", initrd="/img/initrd.gz"), X86_TCG),
}


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_profile_matches_golden_validates_and_round_trips(name: str) -> None:
    spec, bindings, ctx = PROFILES[name]
    validate(spec, ValidationContext(host_arch=ctx.host_arch, virt_type=ctx.virt_type, host_cpus=64, have_placer=True))
    xml = render_xml(spec, bindings, ctx) + "\n"
    golden = GOLDEN / f"{name}.xml"
    if os.environ.get("CNA_UPDATE_GOLDEN"):
        golden.write_text(xml)
    assert golden.read_text() == xml, f"{name}: rendered XML differs from {golden} (CNA_UPDATE_GOLDEN=1 to accept)"
    # parse back: same model, same document
    parsed = dx.Domain.from_xml(xml)
    assert parsed.to_xml() + "\n" == xml
    assert parsed == build_domain(spec, bindings, ctx)
    spec_back = VmSpec.from_json(dx.spec_json_from_metadata(parsed.agent_metadata()))
    assert spec_back == spec


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_profile_passes_virt_xml_validate(name: str, tmp_path: Path) -> None:
    spec, bindings, ctx = PROFILES[name]
    schema_check(tmp_path, render_xml(spec, bindings, ctx), "domain", name)


def test_windows_has_enlightenments_localtime_and_driverless_devices() -> None:
    spec, bindings, ctx = PROFILES["x86_windows_legacy"]
    dom = build_domain(spec, bindings, ctx)
    hv = dom.features.hyperv
    for feat in ("relaxed", "vapic", "spinlocks", "vpindex", "runtime", "synic", "stimer", "reset", "frequencies", "tlbflush"):
        assert getattr(hv, feat) is True, feat
    assert dom.clock.offset == "localtime"
    assert any(t.name == "hypervclock" and t.present for t in dom.clock.timers)
    assert dom.devices.disks[0].target_bus == "sata" and dom.devices.disks[0].target_dev == "sda"
    assert dom.devices.interfaces[0].model == "e1000e"
    assert dom.devices.memballoon.model == "none"
    virtio = build_domain(*PROFILES["x86_windows_virtio"])
    assert virtio.devices.disks[0].target_bus == "virtio" and virtio.devices.interfaces[0].model == "virtio"


def test_aarch64_has_gicv3_no_x86_devices_and_cpu_per_virt_type() -> None:
    dom = build_domain(*PROFILES["aarch64_direct_boot_tcg_numa"])
    assert dom.features.gic_version == "3" and not dom.features.apic
    assert dom.type == "qemu" and dom.cpu.model == "cortex-a57"
    assert dom.os.firmware is None and dom.os.kernel == "/img/Image"
    assert [c.cpus for c in dom.cpu.numa_cells] == ["0-1", "2-3"]
    assert sum(c.memory_kib for c in dom.cpu.numa_cells) == 256 * 1024
    kvm = build_domain(*PROFILES["aarch64_uefi_kvm"])
    assert kvm.cpu.mode == "host-passthrough" and kvm.os.firmware == "efi"
    assert kvm.os.nvram == f"/var/lib/cna-agent/nvram/{UUID}_VARS.fd"
    for el in ("vga", "isa", "i6300esb"):
        assert el not in kvm.to_xml()


def test_disk_defaults_protect_data() -> None:
    dom = build_domain(*PROFILES["x86_linux_bios_q35"])
    root, nfs = dom.devices.disks
    assert (root.cache, root.io, root.error_policy, root.rerror_policy) == ("none", "native", "stop", "stop")
    assert nfs.cache == "writeback" and nfs.io is None and nfs.iotune.total_iops_sec == 500


def test_cpu_qos_becomes_cfs_quota_and_reservation_stays_in_metadata() -> None:
    spec, bindings, ctx = PROFILES["x86_euler_qos"]
    dom = build_domain(spec, bindings, ctx)
    assert dom.cputune.shares == 2048
    assert dom.cputune.global_period == 100_000 and dom.cputune.global_quota == 200_000  # 5200 MHz / 2600 MHz
    assert dom.memtune.hard_limit_kib == 3072 * 1024
    assert "reservation_mhz" in dx.spec_json_from_metadata(dom.agent_metadata())


def test_libvirt_kib_output_parses() -> None:
    xml = "<domain type='kvm'><name>x</name><memory unit='GiB'>2</memory><currentMemory>1048576</currentMemory></domain>"
    dom = dx.Domain.from_xml(xml)
    assert dom.memory_kib == 2 * 1024 * 1024 and dom.current_memory_kib == 1024 * 1024


def test_a_tpm_is_libvirts_swtpm_2_0_crb_on_x86_and_tis_on_aarch64_and_needs_swtpm(tmp_path: Path) -> None:
    from cna_agent.compute.spec_validation import ValidationContext, validate
    from cna_agent.errors import InvalidArgument

    for ctx, model in ((X86_TCG, "tpm-crb"), (ARM_KVM, "tpm-tis")):
        spec = _base(tpm=True, disks=[DiskSpec(volume="ds/root.qcow2", boot_order=1)])
        xml = render_xml(spec, Bindings(disks=[FILE_DISK]), ctx)
        (tpm,) = dx.Domain.from_xml(xml).devices.tpms
        assert (tpm.model, tpm.backend_type, tpm.backend_version) == (model, "emulator", "2.0")
        schema_check(tmp_path, xml, "domain", f"tpm-{model}")
    assert not build_domain(_base(), Bindings(), X86_TCG).devices.tpms
    with pytest.raises(InvalidArgument, match="swtpm") as err:
        validate(_base(tpm=True), ValidationContext(tpm_emulator=False))
    assert err.value.field == "spec.tpm"
