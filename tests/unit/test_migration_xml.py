"""The destination's definition of an incoming VM (compute/migration_xml.py): the source's guest
ABI (device addresses, aliases, CPU and NUMA cells) with the destination's host side (pins,
disk sources, NIC bridges, the agent's own paths). The live move itself is
tests/e2e/test_vm_migration.py's."""

from __future__ import annotations

from dataclasses import replace
from xml.etree import ElementTree as ET

import pytest

from cna_agent.compute.migration_xml import destination_xml
from cna_agent.compute.render import Bindings, RenderContext, build_domain
from cna_agent.compute.spec import DiskSpec, NicSpec, VmSpec
from cna_agent.contracts import DiskSourceBinding, NicBinding, PlacementPlan
from cna_agent.errors import FailedPrecondition

UUID = "6f1c3a52-8d0e-4b7a-9c1d-2e3f4a5b6c70"
SRC = RenderContext(host_arch="x86_64", virt_type="qemu", state_dir="/var/lib/a", run_dir="/run/a", agent_version="t")
DST = replace(SRC, state_dir="/var/lib/b", run_dir="/run/b")


def _spec() -> VmSpec:
    return VmSpec(name="mover", uuid=UUID, vcpus=2, memory_mib=512, serial_console=True, firmware="uefi", dedicated_cpus=True,
                  disks=[DiskSpec(volume="ds/a.qcow2", target="vda")], nics=[NicSpec(port_group="pg", mac="52:54:00:aa:bb:01")])


def _source_xml() -> str:
    """The source's rendering as libvirt would hand it back: with addresses, aliases, a tap name."""
    b = Bindings(disks=[DiskSourceBinding(kind="file", path="/srv/a/a.qcow2", format="qcow2")],
                 nics=[NicBinding(kind="linux-bridge", bridge="br-a", port_group="pg")],
                 placement=PlacementPlan(vcpu_pins={0: (2,), 1: (3,)}, emulator_cpus=(0,), memory_nodes=(0,), dedicated=True))
    root = build_domain(_spec(), b, SRC).to_element()
    for i, dev in enumerate(root.find("devices").findall("disk") + root.find("devices").findall("interface")):
        ET.SubElement(dev, "alias", name=f"ua-{i}")
        ET.SubElement(dev, "address", type="pci", domain="0x0000", bus=f"0x0{i + 5}", slot="0x00", function="0x0")
    ET.SubElement(root.find("devices/interface"), "target", dev="vnet7")
    return ET.tostring(root, encoding="unicode")


def _fresh():
    b = Bindings(disks=[DiskSourceBinding(kind="file", path="/srv/b/a.qcow2", format="qcow2")],
                 nics=[NicBinding(kind="linux-bridge", bridge="br-b", port_group="pg")],
                 placement=PlacementPlan(vcpu_pins={0: (6,), 1: (7,)}, emulator_cpus=(5,), memory_nodes=(1,), dedicated=True))
    return build_domain(_spec(), b, DST)


def test_the_host_side_is_the_destinations_and_the_guest_abi_the_sources() -> None:
    out = ET.fromstring(destination_xml(_source_xml(), _fresh()))
    assert [(p.get("vcpu"), p.get("cpuset")) for p in out.findall("cputune/vcpupin")] == [("0", "6"), ("1", "7")]
    assert out.find("cputune/emulatorpin").get("cpuset") == "5" and out.find("numatune/memory").get("nodeset") == "1"
    disk = out.find("devices/disk")
    assert disk.find("source").get("file") == "/srv/b/a.qcow2"
    assert (disk.find("alias").get("name"), disk.find("address").get("bus")) == ("ua-0", "0x05")
    nic = out.find("devices/interface")
    assert nic.find("source").get("bridge") == "br-b" and nic.find("mac").get("address") == "52:54:00:aa:bb:01"
    assert (nic.find("alias").get("name"), nic.find("address").get("bus")) == ("ua-1", "0x06")
    assert nic.find("target") is None  # the destination names its own tap
    assert out.find("devices/serial/log").get("file").startswith("/run/b/")
    assert out.find("os/nvram").text.startswith("/var/lib/b/nvram/")
    cmdline = ET.tostring(out.find("{http://libvirt.org/schemas/domain/qemu/1.0}commandline"), encoding="unicode")
    assert "/run/b/" in cmdline and "/run/a/" not in cmdline
    assert "/run/a/" not in ET.tostring(out, encoding="unicode") and "/var/lib/a/" not in ET.tostring(out, encoding="unicode")


def test_a_device_the_spec_does_not_name_is_refused() -> None:
    src = ET.fromstring(_source_xml())
    extra = ET.SubElement(src.find("devices"), "interface", type="bridge")
    ET.SubElement(extra, "mac", address="52:54:00:de:ad:00")
    with pytest.raises(FailedPrecondition) as err:
        destination_xml(ET.tostring(src, encoding="unicode"), _fresh())
    assert "52:54:00:de:ad:00" in str(err.value)
