"""Domain snapshot XML (compute/snapshotxml.py) and the snapshot operations that build and read it.

Round trips: the documents the agent sends; in tests/fixtures/snapshotxml, hand-written documents
shaped like the QEMU driver's ``virsh snapshot-dumpxml`` output (element names from libvirt's
domainsnapshot.rng) and ``captured-*`` ones libvirt 9.0's embedded QEMU driver returned for
snapshots.create() on a TCG guest (internal while shut off, external disk-only while running);
and documents libvirt returns here at test time (the test driver, test:///default, which takes
internal snapshots of its in-memory domains). Every document, given and rebuilt, is
checked with ``virt-xml-validate FILE domainsnapshot``.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from xml.etree import ElementTree as ET

import libvirt
import pytest

# domxml also registers the cna: prefix the fixtures use, so rebuilt documents keep it
from cna_agent.compute import domxml as dx
from cna_agent.compute import snapshots as snaps
from cna_agent.compute import state as st
from cna_agent.compute.snapshotxml import DomainSnapshot, SnapshotDisk, SnapshotMemory
from cna_agent.errors import FailedPrecondition, InvalidArgument
from support.xml import canon, schema_check

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "snapshotxml"


@pytest.mark.parametrize("fixture", sorted(p.name for p in FIXTURES.glob("*.xml")))
def test_libvirt_shaped_documents_round_trip_and_validate(fixture: str, tmp_path: Path) -> None:
    given = (FIXTURES / fixture).read_text()
    schema_check(tmp_path, given, "domainsnapshot", "given")
    built = DomainSnapshot.from_xml(given).to_xml()
    assert canon(built) == canon(given)
    assert DomainSnapshot.from_xml(built).to_xml() == built  # build(parse(xml)) == xml, to the byte
    schema_check(tmp_path, built, "domainsnapshot", "built")


def test_external_disk_only_snapshot_fields() -> None:
    doc = DomainSnapshot.from_xml((FIXTURES / "external-disk-only-running.xml").read_text())
    assert (doc.name, doc.state, doc.parent, doc.creation_time) == ("live1", "disk-snapshot", "s2", 1764629526)
    assert doc.description == "before the kernel upgrade & reboot"
    assert doc.external and doc.memory.snapshot == "no"
    assert [(d.name, d.snapshot, d.driver_type, d.source_file) for d in doc.disks] == [
        ("vda", "external", "qcow2", "/var/lib/cna-agent/datastores/local/vm1-root.live1.qcow2"),
        ("vdb", "external", "qcow2", "/var/lib/cna-agent/datastores/local/vm1-data.live1.qcow2"),
        ("sda", "no", None, None)]
    # the domain libvirt embeds is read, when needed, by the domain model, not by this one
    domain = dx.Domain.from_element(doc.domain)
    assert domain.name == "vm1" and [d.target_dev for d in domain.devices.disks] == ["vda", "vdb", "sda"]
    assert dx.spec_json_from_metadata(domain.agent_metadata()).startswith('{"name": "vm1"')
    assert doc.inactive_domain.tag == "inactiveDomain" and doc.cookie.find("cpu/model").text == "qemu64"


def test_captured_qemu_snapshots_read_as_the_agent_needs() -> None:
    live = DomainSnapshot.from_xml((FIXTURES / "captured-libvirt-9.0-qemu-external-disk-only.xml").read_text())
    assert (live.state, live.parent, live.external, live.memory.snapshot) == ("disk-snapshot", "s1", True, "no")
    assert [(d.name, d.snapshot, d.source_file) for d in live.disks] == [
        ("vda", "external", "/tmp/wtxml-probe/root.live1.qcow2"), ("vdb", "no", None)]
    assert live.domain is not None and live.inactive_domain is not None and live.cookie is None
    stopped = DomainSnapshot.from_xml((FIXTURES / "captured-libvirt-9.0-qemu-internal-shutoff.xml").read_text())
    assert (stopped.state, stopped.parent, stopped.external, stopped.description) == ("shutoff", None, False, "stopped & internal")


def test_memory_and_block_overlay_fields() -> None:
    doc = DomainSnapshot.from_xml((FIXTURES / "full-system-running.xml").read_text())
    assert doc.memory.snapshot == "external" and doc.memory.file.endswith("vm1.checkpoint.mem")
    assert [(d.type, d.source_file, d.source_dev) for d in doc.disks] == [
        ("file", "/var/lib/cna-agent/datastores/local/vm1-root.checkpoint.qcow2", None),
        ("block", None, "/dev/mapper/vg0-vm1--data--checkpoint")]
    assert doc.domain.findtext("uuid") == "6f1c3a52-8d0e-4b7a-9c1d-2e3f4a5b6c7d"
    internal = DomainSnapshot.from_xml((FIXTURES / "internal-shutoff.xml").read_text())
    assert not internal.external and internal.parent is None and internal.state == "shutoff"


def test_opaque_elements_are_not_changed_by_building() -> None:
    doc = DomainSnapshot.from_xml((FIXTURES / "internal-shutoff.xml").read_text())
    before = ET.tostring(doc.domain, encoding="unicode")
    doc.to_xml()
    doc.to_xml(pretty=False)
    assert ET.tostring(doc.domain, encoding="unicode") == before


# -- what snapshots.create sends ------------------------------------------------------------------


def _domain(tmp_path: Path) -> dx.Domain:
    """A running VM's definition: two writable file disks, a CD-ROM, a shared disk, an iSCSI LUN."""
    return dx.Domain(type="qemu", name="vm1", devices=dx.Devices(disks=[
        dx.Disk(type="file", device="disk", driver_type="qcow2", source_file=str(tmp_path / "vm1-root.qcow2"), target_dev="vda"),
        dx.Disk(type="file", device="disk", driver_type="raw", source_file=str(tmp_path / "vm1-data.raw"), target_dev="vdb"),
        dx.Disk(type="file", device="cdrom", driver_type="raw", source_file=str(tmp_path / "seed.iso"), target_dev="sda",
                readonly=True),
        dx.Disk(type="file", device="disk", driver_type="raw", source_file=str(tmp_path / "shared.raw"), target_dev="vdc",
                shareable=True),
        dx.Disk(type="network", device="disk", driver_type="raw", source_protocol="iscsi", source_name="iqn.2024-01.org.example:t/1",
                source_hosts=[dx.DiskHost(name="192.0.2.10", port="3260")], target_dev="vdd"),
    ], channels=[dx.Channel(type="unix", target_type="virtio", target_name="org.qemu.guest_agent.0")]))


def test_stopped_vm_request_is_internal_with_escaped_description(tmp_path: Path) -> None:
    domain = dx.Domain(devices=dx.Devices(disks=[dx.Disk(device="disk", driver_type="qcow2", source_file="/d/r.qcow2", target_dev="vda")]))
    doc = snaps.request(domain, "s1", "a & b <c> \"d\" 'e'", running=False)
    xml = doc.to_xml(pretty=False)
    assert xml == ("<domainsnapshot><name>s1</name><description>a &amp; b &lt;c&gt; \"d\" 'e'</description>"
                   "</domainsnapshot>")
    assert DomainSnapshot.from_xml(xml).description == "a & b <c> \"d\" 'e'"
    assert DomainSnapshot.from_xml(xml).to_xml(pretty=False) == xml
    assert snaps.request(domain, "s2", "", running=False).to_xml(pretty=False) == "<domainsnapshot><name>s2</name></domainsnapshot>"
    schema_check(tmp_path, xml, "domainsnapshot")


def test_running_vm_request_puts_each_writable_disk_on_an_overlay(tmp_path: Path) -> None:
    doc = snaps.request(_domain(tmp_path), "live1", "", running=True)
    xml = doc.to_xml(pretty=False)
    assert xml == (
        "<domainsnapshot><name>live1</name><disks>"
        f'<disk name="vda" snapshot="external"><driver type="qcow2" /><source file="{tmp_path}/vm1-root.live1.qcow2" /></disk>'
        f'<disk name="vdb" snapshot="external"><driver type="qcow2" /><source file="{tmp_path}/vm1-data.live1.qcow2" /></disk>'
        '<disk name="sda" snapshot="no" /><disk name="vdc" snapshot="no" /><disk name="vdd" snapshot="no" />'
        "</disks></domainsnapshot>")
    # the same document the f-string builder this model replaced wrote
    old = (f"<domainsnapshot><name>live1</name><disks>"
           f"<disk name='vda' snapshot='external'><driver type='qcow2'/><source file='{tmp_path}/vm1-root.live1.qcow2'/></disk>"
           f"<disk name='vdb' snapshot='external'><driver type='qcow2'/><source file='{tmp_path}/vm1-data.live1.qcow2'/></disk>"
           "<disk name='sda' snapshot='no'/><disk name='vdc' snapshot='no'/><disk name='vdd' snapshot='no'/>"
           "</disks></domainsnapshot>")
    assert canon(xml) == canon(old)
    assert DomainSnapshot.from_xml(xml) == doc and doc.external
    schema_check(tmp_path, doc.to_xml(), "domainsnapshot")


def test_request_refusals(tmp_path: Path) -> None:
    domain = _domain(tmp_path)
    with pytest.raises(FailedPrecondition, match="vdb, vdd are not qcow2"):
        snaps.request(domain, "s1", "", running=False)
    (tmp_path / "vm1-data.live1.qcow2").write_bytes(b"")
    with pytest.raises(FailedPrecondition, match="already exists; choose another snapshot name"):
        snaps.request(domain, "live1", "", running=True)
    cdrom_only = dx.Domain(devices=dx.Devices(disks=[d for d in domain.devices.disks if d.readonly]))
    with pytest.raises(FailedPrecondition, match="no writable disk"):
        snaps.request(cdrom_only, "live2", "", running=True)
    assert snaps._has_guest_agent(domain) and not snaps._has_guest_agent(cdrom_only) and not snaps._has_guest_agent(dx.Domain())


def test_model_builds_what_the_schema_wants(tmp_path: Path) -> None:
    doc = DomainSnapshot(name="full", description="all fields", memory=SnapshotMemory(snapshot="external", file="/d/full.mem"),
                         disks=[SnapshotDisk(name="vda", snapshot="external", type="block", driver_type="qcow2", source_dev="/dev/vg/o"),
                                SnapshotDisk(name="/d/data.qcow2", snapshot="internal"),
                                SnapshotDisk(name="vdc", snapshot="manual")])
    schema_check(tmp_path, doc.to_xml(), "domainsnapshot")
    assert DomainSnapshot.from_xml(doc.to_xml()).to_xml() == doc.to_xml()


# -- what libvirt returns (the test driver) ----------------------------------------------------


@pytest.fixture
def test_domain():
    libvirt.registerErrorHandler(lambda c, e: None, None)
    conn = libvirt.open("test:///default")
    name = f"snap-{uuid.uuid4().hex[:8]}"
    dom = conn.defineXML(
        f"<domain type='test'><name>{name}</name><memory>131072</memory><os><type>hvm</type></os><devices>"
        "<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='/srv/root.qcow2'/>"
        "<target dev='vda' bus='virtio'/></disk>"
        "<disk type='file' device='cdrom'><driver name='qemu' type='raw'/><source file='/srv/seed.iso'/>"
        "<target dev='sda' bus='sata'/><readonly/></disk></devices></domain>")
    try:
        yield dom
    finally:
        if dom.isActive():
            dom.destroy()
        dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA)
        conn.close()


def test_libvirt_returned_snapshots_round_trip_and_validate(test_domain, tmp_path: Path) -> None:
    snaps.create(test_domain, "s1", "clean & tidy", False)
    snaps.create(test_domain, "s2", "", False)
    test_domain.create()
    test_domain.snapshotCreateXML(DomainSnapshot(name="run1").to_xml(), 0)  # the test driver takes no disk-only ones
    for name in ("s1", "s2", "run1"):
        given = test_domain.snapshotLookupByName(name, 0).getXMLDesc(0)
        schema_check(tmp_path, given, "domainsnapshot", f"{name}-libvirt")
        doc = DomainSnapshot.from_xml(given)
        built = doc.to_xml()
        assert canon(built) == canon(given), name
        schema_check(tmp_path, built, "domainsnapshot", f"{name}-built")
        assert doc.name == name and doc.creation_time > 0 and not doc.external
        assert [(d.name, d.snapshot) for d in doc.disks] == [("vda", "internal"), ("sda", "no")]
        assert dx.Domain.from_element(doc.domain).name == test_domain.name()
    s2, run1 = (DomainSnapshot.from_xml(test_domain.snapshotLookupByName(n, 0).getXMLDesc(0)) for n in ("s2", "run1"))
    assert (s2.parent, s2.state, s2.memory.snapshot) == ("s1", "shutoff", "no")
    assert (run1.parent, run1.state, run1.memory.snapshot) == ("s2", "running", "internal")


def test_snapshot_operations_on_the_test_driver(test_domain) -> None:
    first = snaps.create(test_domain, "s1", "first & <only>", False)
    assert (first.name, first.description, first.kind, first.vm_state, first.current) == (
        "s1", "first & <only>", "internal", st.STOPPED, True)
    snaps.create(test_domain, "s2", "", False)
    snaps.create(test_domain, "s3", "", False)
    snaps.revert(test_domain, "s1")
    snaps.create(test_domain, "s1b", "", False)
    tree = snaps.list_tree(test_domain)
    order = [s.name for s in tree]
    assert sorted(order) == ["s1", "s1b", "s2", "s3"]
    assert {s.name: s.parent for s in tree} == {"s1": "", "s2": "s1", "s3": "s2", "s1b": "s1"}
    assert all(order.index(s.parent) < order.index(s.name) for s in tree if s.parent)  # parents first
    assert sorted({s.name: s.children for s in tree}["s1"]) == ["s1b", "s2"]
    assert [s.name for s in tree if s.current] == ["s1b"]
    with pytest.raises(FailedPrecondition, match="already exists"):
        snaps.create(test_domain, "s1", "", False)
    with pytest.raises(InvalidArgument):
        snaps.create(test_domain, "q", "", True)
    assert snaps.delete(test_domain, "s3") == "deleted"
    assert sorted(s.name for s in snaps.list_tree(test_domain)) == ["s1", "s1b", "s2"]


def test_memory_request_is_internal_with_ram_and_refuses_what_savevm_cannot_hold(tmp_path: Path) -> None:
    qcow2_only = dx.Domain(devices=dx.Devices(disks=[
        dx.Disk(type="file", device="disk", driver_type="qcow2", source_file="/d/r.qcow2", target_dev="vda"),
        dx.Disk(type="file", device="cdrom", driver_type="raw", source_file="/d/seed.iso", target_dev="sda", readonly=True)]))
    doc = snaps.request(qcow2_only, "m1", "", running=True, memory=True)
    xml = doc.to_xml(pretty=False)
    assert xml == '<domainsnapshot><name>m1</name><memory snapshot="internal" /></domainsnapshot>'
    schema_check(tmp_path, doc.to_xml(), "domainsnapshot")
    with pytest.raises(FailedPrecondition, match="vdb, vdd are not qcow2") as err:
        snaps.request(_domain(tmp_path), "m2", "", running=True, memory=True)
    assert err.value.field == "memory"
    with pytest.raises(FailedPrecondition, match="no writable disk"):
        snaps.request(dx.Domain(devices=dx.Devices(disks=[qcow2_only.devices.disks[1]])), "m3", "", running=True, memory=True)
    uefi = dx.Domain(os=dx.Os(loader="/usr/share/OVMF/OVMF_CODE_4M.fd", loader_type="pflash", nvram="/d/VARS.fd"),
                     devices=qcow2_only.devices)
    with pytest.raises(FailedPrecondition, match="writable NVRAM"):
        snaps.request(uefi, "m4", "", running=True, memory=True)
    with pytest.raises(InvalidArgument) as bad:
        snaps.request(qcow2_only, "m5", "", running=False, memory=True)
    assert bad.value.field == "memory"
