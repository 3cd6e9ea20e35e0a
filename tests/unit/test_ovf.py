"""OVF descriptors and OVA packages: a VMware-shaped descriptor read and mapped to a VM spec with
every device it asks for accounted for; our own export read back to an equivalent spec;
hostile packages (entities, links in the tar, paths out of the package, a wrong digest) refused.

The descriptor in tests/data/ovf is hand-written in the shape ovftool gives an ESXi 7 VM, plus
the devices a KVM host does not give (sound, floppy, VMCI, USB, an empty CD drive).
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from cna_agent.compute.appliance_spec import ExportedDisk, envelope_of, plan_import
from cna_agent.compute.spec import CpuTopology, DiskSpec, NicSpec, VmSpec
from cna_agent.errors import InvalidArgument
from cna_agent.ovf import descriptor, package, writer
from cna_agent.ovf.descriptor import DescriptorError

DATA = Path(__file__).resolve().parent.parent / "data" / "ovf"


def _vmware() -> descriptor.Envelope:
    return descriptor.parse((DATA / "vmware-web.ovf").read_bytes())


def test_a_vmware_descriptor_is_read_item_by_item() -> None:
    env = _vmware()
    s = env.system
    assert (env.version, s.name, s.vcpus, s.cores_per_socket, s.memory_mib) == ("1", "web01", 4, 2, 2048)
    assert s.os_type == "debian11_64Guest" and s.system_types == ["vmx-19"] and s.firmware == "bios"
    assert env.disks["vmdisk1"].capacity_bytes == 32 << 20 and env.disks["vmdisk1"].file_ref == "file1"
    assert env.disks["vmdisk2"].file_ref == "" and env.files["file1"].href == "web01-disk1.vmdk"
    assert {c.kind for c in s.controllers.values()} == {"scsi", "ide"}
    assert [(d.kind, d.disk_id) for d in s.drives] == [("disk", "vmdisk1"), ("disk", "vmdisk2"), ("cdrom", ""),
                                                       ("floppy", "")]
    assert [(n.network, n.subtype, n.mac) for n in s.nics] == [("VM Network", "VmxNet3", "00:50:56:8a:12:34")]
    assert sorted(i.resource_type for i in s.others) == [1, 1, 23, 24]
    assert s.properties == ["guestinfo.hostname"] and env.networks == ["VM Network"]


def test_the_vmware_vm_maps_to_a_spec_and_every_unsupported_device_is_reported() -> None:
    plan = plan_import(_vmware(), name="", datastore="ds1", folder="web01", network_map={"VM Network": "prod"},
                       fmt="qcow2", keep_macs=False)
    spec = plan.spec
    assert (spec.name, spec.vcpus, spec.memory_mib, spec.os_family, spec.firmware, spec.arch) == \
        ("web01", 4, 2048, "linux", "bios", "x86_64")
    assert spec.cpu_topology == CpuTopology(sockets=2, cores=2, threads=1)
    assert [(d.volume, d.bus, d.boot_order) for d in spec.disks] == [
        ("ds1/web01/web01-disk1.qcow2", "scsi", 1), ("ds1/web01/web01-disk2.qcow2", "scsi", 0)]
    assert [(d.href, d.capacity) for d in plan.disks] == [("web01-disk1.vmdk", 32 << 20), ("", 16 << 20)]
    assert [(n.port_group, n.model, n.mac) for n in spec.nics] == [("prod", "virtio", "")]
    by_item = {n.item: n for n in plan.notes}
    for item in ("Sound card (other device, vmware.soundcard.hdaudio)", "Floppy drive 1", "CD/DVD drive 1",
                 "VMCI device (other device, vmware.vmci)", "USB controller (vmware.usb.ehci)"):
        assert by_item[item].action == "dropped", (item, sorted(by_item))
    assert by_item["Network adapter 1"].action == "changed" and "virtio" in by_item["Network adapter 1"].detail
    assert by_item["Hard disk 1"].action == "changed" and "virtio-scsi" in by_item["Hard disk 1"].detail
    assert by_item["Video card (graphics controller)"].action == "changed"
    assert by_item["vApp properties"].action == "ignored"
    assert "cpuHotAddEnabled" in by_item["VMware settings"].detail


def test_a_windows_guest_without_virtio_drivers_keeps_devices_it_has_drivers_for() -> None:
    raw = (DATA / "vmware-web.ovf").read_text().replace("debian11_64Guest", "windows2019srv_64Guest") \
        .replace("Debian GNU/Linux 11 (64-bit)", "Microsoft Windows Server 2019 (64-bit)")
    plan = plan_import(descriptor.parse(raw.encode()), name="win1", datastore="ds1", folder="w", network_map={"VM Network": "p"},
                       fmt="raw", keep_macs=True)
    assert plan.spec.os_family == "windows"
    assert [d.bus for d in plan.spec.disks] == ["sata", "sata"]
    assert [d.volume for d in plan.spec.disks] == ["ds1/w/win1-disk1.raw", "ds1/w/win1-disk2.raw"]
    assert [(n.model, n.mac) for n in plan.spec.nics] == [("e1000e", "00:50:56:8a:12:34")]


def test_what_cannot_be_imported_is_refused_naming_the_field() -> None:
    env = _vmware()
    with pytest.raises(InvalidArgument, match="network_map.*'VM Network'.*not mapped"):
        plan_import(env, name="", datastore="d", folder="f", network_map={}, fmt="qcow2", keep_macs=False)
    with pytest.raises(InvalidArgument, match="network_map.*'Other'.*no NIC"):
        plan_import(env, name="", datastore="d", folder="f", network_map={"VM Network": "p", "Other": "q"}, fmt="qcow2",
                    keep_macs=False)
    with pytest.raises(InvalidArgument, match="^name"):
        plan_import(env, name="bad name", datastore="d", folder="f", network_map={"VM Network": "p"}, fmt="qcow2",
                    keep_macs=False)
    gz = (DATA / "vmware-web.ovf").read_text().replace('ovf:size="4194304"', 'ovf:size="4194304" ovf:compression="gzip"')
    with pytest.raises(InvalidArgument, match="gzip-compressed"):
        plan_import(descriptor.parse(gz.encode()), name="", datastore="d", folder="f", network_map={"VM Network": "p"},
                    fmt="qcow2", keep_macs=False)


@pytest.mark.parametrize("text, message", [
    (b'<?xml version="1.0"?><!DOCTYPE x [<!ENTITY a "aaaa">]><Envelope/>', "DTD or entities"),
    (b"<Envelope xmlns='http://schemas.dmtf.org/ovf/envelope/1'><References><File ovf:id='f' ovf:href='../etc/passwd' "
     b"xmlns:ovf='http://schemas.dmtf.org/ovf/envelope/1'/></References></Envelope>", "leaves the package"),
    (b"<Envelope xmlns='http://schemas.dmtf.org/ovf/envelope/1'><References><File ovf:id='f' ovf:href='http://x/y.vmdk' "
     b"xmlns:ovf='http://schemas.dmtf.org/ovf/envelope/1'/></References></Envelope>", "URLs"),
    (b"<Envelope xmlns='http://schemas.dmtf.org/ovf/envelope/1'/>", "no VirtualSystem"),
    (b"<NotOvf/>", "not an OVF Envelope"),
    (b"<Envelope", "not well-formed"),
])
def test_hostile_or_broken_descriptors_are_refused(text: bytes, message: str) -> None:
    with pytest.raises(DescriptorError, match=message):
        descriptor.parse(text)


def _spec() -> VmSpec:
    return VmSpec(name="app1", description="an exported VM", os_family="euler", firmware="uefi", vcpus=2, memory_mib=512,
                  machine_type="q35", arch="x86_64", guest_agent=True, serial_console=True,
                  cpu_topology=CpuTopology(sockets=1, cores=2, threads=1),
                  disks=[DiskSpec(volume="ds/app1/root.qcow2", bus="virtio", boot_order=1, target="vda"),
                         DiskSpec(volume="ds/app1/data.raw", bus="scsi", target="sda")],
                  nics=[NicSpec(port_group="prod", model="virtio", mac="52:54:00:00:00:01"),
                        NicSpec(port_group="backup", model="e1000e", link_down=True)])


def test_an_exported_spec_reads_back_to_an_equivalent_spec() -> None:
    spec = _spec()
    disks = [ExportedDisk(index=0, href="app1-disk1.vmdk", size=1000, capacity=1 << 30),
             ExportedDisk(index=1, href="app1-disk2.vmdk", size=2000, capacity=2 << 30)]
    data = writer.write(envelope_of(spec, disks))
    env = descriptor.parse(data)
    assert env.networks == ["prod", "backup"]
    plan = plan_import(env, name="", datastore="ds2", folder="imp", network_map={"prod": "prod", "backup": "backup"},
                       fmt="qcow2", keep_macs=True)
    got = plan.spec
    assert plan.notes == []
    for attr in ("name", "description", "os_family", "firmware", "vcpus", "memory_mib", "machine_type", "arch",
                 "guest_agent", "serial_console", "cpu_topology"):
        assert getattr(got, attr) == getattr(spec, attr), attr
    assert [(d.bus, d.boot_order) for d in got.disks] == [("virtio", 1), ("scsi", 0)]
    assert [(n.port_group, n.model, n.mac, n.link_down) for n in got.nics] == \
        [("prod", "virtio", "52:54:00:00:00:01", False), ("backup", "e1000e", "", True)]
    assert [(d.href, d.capacity) for d in plan.disks] == [("app1-disk1.vmdk", 1 << 30), ("app1-disk2.vmdk", 2 << 30)]


def _ova(path: Path, members: list[tuple[str, bytes]], *, link: str = "") -> Path:
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        if link:
            info = tarfile.TarInfo(link)
            info.type = tarfile.SYMTYPE
            info.linkname = "/etc/shadow"
            tar.addfile(info)
    return path


def test_an_ova_is_read_in_place_and_its_manifest_checked(tmp_path: Path) -> None:
    ovf = (DATA / "vmware-web.ovf").read_bytes()
    disk = b"KDMV" + bytes(1020)
    files = [("web01.ovf", ovf), ("web01-disk1.vmdk", disk)]
    (tmp_path / "a").write_bytes(ovf)
    (tmp_path / "b").write_bytes(disk)
    mf = package.manifest_text([("web01.ovf", str(tmp_path / "a")), ("web01-disk1.vmdk", str(tmp_path / "b"))])
    pkg = package.open_package(str(_ova(tmp_path / "good.ova", [files[0], ("web01.mf", mf), files[1]])))
    m = pkg.member("web01-disk1.vmdk")
    with open(m.path, "rb") as f:
        f.seek(m.offset)
        assert f.read(m.size) == disk  # the member is the byte range: what qemu-img's raw window reads
    assert pkg.read(pkg.descriptor, 1 << 20) == ovf
    assert package.verify_manifest(pkg) == 2

    bad_mf = mf.replace(mf.split(b"= ")[2][:8], b"00000000")
    pkg = package.open_package(str(_ova(tmp_path / "bad.ova", [files[0], ("web01.mf", bad_mf), files[1]])))
    with pytest.raises(DescriptorError, match="does not match the manifest"):
        package.verify_manifest(pkg)
    assert package.verify_manifest(package.open_package(str(_ova(tmp_path / "nomf.ova", files)))) is None


def test_an_ova_with_a_link_or_a_path_out_is_refused(tmp_path: Path) -> None:
    ovf = (DATA / "vmware-web.ovf").read_bytes()
    with pytest.raises(DescriptorError, match="link or special file"):
        package.open_package(str(_ova(tmp_path / "l.ova", [("a.ovf", ovf)], link="web01-disk1.vmdk")))
    with pytest.raises(DescriptorError, match="leaves the package"):
        package.open_package(str(_ova(tmp_path / "p.ova", [("a.ovf", ovf), ("../x.vmdk", b"x")])))
    with pytest.raises(DescriptorError, match="exactly one .ovf"):
        package.open_package(str(_ova(tmp_path / "two.ova", [("a.ovf", ovf), ("b.ovf", ovf)])))
    (tmp_path / "n.ova").write_bytes(b"not a tar" * 100)
    with pytest.raises(DescriptorError, match="not an OVA"):
        package.open_package(str(tmp_path / "n.ova"))


def test_an_ovf_directory_does_not_reach_outside_it(tmp_path: Path) -> None:
    d = tmp_path / "pkg"
    d.mkdir()
    (d / "a.ovf").write_bytes(b"<x/>")
    (tmp_path / "secret").write_bytes(b"s")
    (d / "link.vmdk").symlink_to(tmp_path / "secret")
    pkg = package.open_package(str(d / "a.ovf"))
    assert pkg.find("link.vmdk") is None
    with pytest.raises(DescriptorError):
        pkg.find("../secret")


def test_an_ova_written_here_lists_the_descriptor_first(tmp_path: Path) -> None:
    (tmp_path / "x.ovf").write_bytes(b"<ovf/>")
    (tmp_path / "x-disk1.vmdk").write_bytes(b"d" * 3000)
    out = io.BytesIO()
    package.write_ova(out, [("x.ovf", str(tmp_path / "x.ovf")), ("x-disk1.vmdk", str(tmp_path / "x-disk1.vmdk"))])
    out.seek(0)
    with tarfile.open(fileobj=out) as tar:
        assert [(m.name, m.size, m.mode) for m in tar.getmembers()] == [("x.ovf", 6, 0o644), ("x-disk1.vmdk", 3000, 0o644)]


def test_the_ovf_writer_leaves_the_domain_xml_prefixes_alone() -> None:
    """ElementTree's prefixes are process-wide: the writer once registered "cna" for its own
    section, and every domain rendered after it carried ns0: instead of cna: metadata."""
    from xml.etree import ElementTree as ET

    from cna_agent.compute import domxml as dx

    writer.write(envelope_of(_spec(), []))
    assert ET.tostring(ET.Element(f"{{{dx.CNA_NS}}}vm")).startswith(b"<cna:vm")
