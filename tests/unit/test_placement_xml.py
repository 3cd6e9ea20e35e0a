"""Placement plans (from the planner on the recorded Kunpeng and Xeon trees) rendered to
cputune/numatune/memoryBacking/guest NUMA, validated by virt-xml-validate and parsed by a real
libvirt (the test driver's domain parser). No daemons."""

from __future__ import annotations

import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from cna_agent.compute.bindings import PlacementPlan
from cna_agent.errors import InvalidArgument
from cna_agent.host.cpulist import parse_cpulist
from cna_agent.host.placement import Planner, VmRequest
from cna_agent.host.placement_xml import render_guest_numa, render_placement
from cna_agent.host.topology import probe_topology

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "sysfs"


def domain(plan: PlacementPlan, vcpus: int, memory_mib: int, iothreads: int = 0) -> str:
    dom = ET.Element("domain", type="kvm")
    ET.SubElement(dom, "name").text = "placed"
    ET.SubElement(dom, "memory", unit="MiB").text = str(memory_mib)
    ET.SubElement(dom, "vcpu", placement="static").text = str(vcpus)
    if iothreads:
        ET.SubElement(dom, "iothreads").text = str(iothreads)
    dom.extend(render_placement(plan, iothreads=iothreads))
    os_ = ET.SubElement(dom, "os")
    ET.SubElement(os_, "type", arch="x86_64").text = "hvm"
    numa = render_guest_numa(plan)
    if numa is not None:
        cpu = ET.SubElement(dom, "cpu")
        cpu.append(numa)
    ET.SubElement(dom, "devices")
    return ET.tostring(dom, encoding="unicode")


def validate(xml: str, tmp_path: Path) -> None:
    tool = shutil.which("virt-xml-validate")
    if tool is None:
        pytest.skip("virt-xml-validate (libvirt-clients) is not installed")
    path = tmp_path / "d.xml"
    path.write_text(xml)
    r = subprocess.run([tool, str(path), "domain"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr + xml


def libvirt_parse(xml: str) -> ET.Element:
    libvirt = pytest.importorskip("libvirt")
    conn = libvirt.open("test:///default")
    try:
        dom = conn.defineXML(xml)
        try:
            return ET.fromstring(dom.XMLDesc(0))
        finally:
            dom.undefine()
    finally:
        conn.close()


def test_kunpeng_spanning_hugepage_vm_renders_valid_xml_libvirt_accepts(tmp_path):
    topo = probe_topology(str(FIXTURES / "kunpeng920-2s"))
    node_cpus = len(topo.numa_nodes[0].cpus)
    vm = Planner(topo).plan(VmRequest("big", node_cpus + 4, 2048, dedicated=True, hugepages=True), [])
    plan = vm.plan
    assert len(plan.guest_cells) >= 2 and plan.hugepage_kib
    xml = domain(plan, node_cpus + 4, 2048, iothreads=1)
    validate(xml, tmp_path)
    parsed = libvirt_parse(xml)
    pins = {int(p.get("vcpu")): parse_cpulist(p.get("cpuset")) for p in parsed.findall("cputune/vcpupin")}
    assert pins == {v: tuple(c) for v, c in plan.vcpu_pins.items()}
    assert parse_cpulist(parsed.find("cputune/emulatorpin").get("cpuset")) == tuple(plan.emulator_cpus)
    assert parse_cpulist(parsed.find("cputune/iothreadpin").get("cpuset")) == tuple(plan.iothread_cpus[1])
    memnodes = {int(m.get("cellid")): int(m.get("nodeset")) for m in parsed.findall("numatune/memnode")}
    assert memnodes == {c.id: c.host_node for c in plan.guest_cells}
    assert parse_cpulist(parsed.find("numatune/memory").get("nodeset")) == tuple(plan.memory_nodes)
    page = parsed.find("memoryBacking/hugepages/page")
    assert int(page.get("size")) == plan.hugepage_kib and page.get("unit") in ("KiB", "k")
    cells = parsed.findall("cpu/numa/cell")
    assert [parse_cpulist(c.get("cpus")) for c in cells] == [c.vcpus for c in plan.guest_cells]


def test_xeon_shared_vm_renders_pins_to_the_pool_and_no_hugepages(tmp_path):
    topo = probe_topology(str(FIXTURES / "fusionserver-2s"))
    vm = Planner(topo, reserved_cpus=[0]).plan(VmRequest("small", 2, 1024), [])
    elements = render_placement(vm.plan)  # no iothreads defined: no iothreadpin
    assert [e.tag for e in elements] == ["cputune", "numatune"]
    assert elements[0].find("iothreadpin") is None
    assert all(0 not in parse_cpulist(p.get("cpuset")) for p in elements[0].findall("vcpupin"))
    validate(domain(vm.plan, 2, 1024), tmp_path)


def test_unrenderable_plans_are_refused_naming_the_field():
    with pytest.raises(InvalidArgument) as exc:
        render_placement(PlacementPlan(vcpu_pins={0: ()}))
    assert exc.value.fields[0][0] == "plan.vcpu_pins[0]"
    with pytest.raises(InvalidArgument):
        render_placement(PlacementPlan(memory_nodes=(0,), memory_mode="bogus"))
