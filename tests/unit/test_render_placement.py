"""Compute's builder renders a whole placement plan (from the planner on the recorded Kunpeng
and Xeon trees, or written out): vcpupin, emulatorpin, iothreadpin, numatune memory + memnode,
hugepage page size, guest NUMA cells. Every document passes virt-xml-validate and is defined
on a real libvirt (the test driver's domain parser), and libvirt's own XML parses back into
the typed model with the same placement. No daemons (the same on the embedded QEMU driver, which
probes QEMU: tests/integration/test_render_qemu_driver.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from support.specs import ARM, PLACED_UUID, X86, placed_spec
from support.xml import schema_check

from cna_agent.compute import domxml as dx
from cna_agent.compute.render import Bindings, build_domain
from cna_agent.compute.render_placement import apply_placement
from cna_agent.compute.spec import VmSpec
from cna_agent.contracts import GuestNumaCell, PlacementPlan
from cna_agent.errors import InvalidArgument
from cna_agent.host.cpulist import parse_cpulist
from cna_agent.host.placement import Planner, VmRequest
from cna_agent.host.topology import probe_topology

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "sysfs"
UUID = PLACED_UUID
_spec = placed_spec


def _build(spec: VmSpec, plan: PlacementPlan | None) -> dx.Domain:
    ctx = ARM if spec.arch == "aarch64" else X86
    kernel = spec.boot.kernel
    return build_domain(spec, Bindings(kernel=kernel, placement=plan), ctx)


def _libvirt_define(xml: str) -> dx.Domain:
    """Define on libvirt's test driver and return libvirt's own XML as the typed model."""
    libvirt = pytest.importorskip("libvirt")
    conn = libvirt.open("test:///default")
    try:
        dom = conn.defineXML(xml)
        try:
            return dx.Domain.from_xml(dom.XMLDesc(0))
        finally:
            dom.undefine()
    finally:
        conn.close()


def _pins(dom: dx.Domain) -> dict[int, tuple[int, ...]]:
    return {p.vcpu: parse_cpulist(p.cpuset) for p in dom.cputune.vcpupins}


def test_kunpeng_spanning_hugepage_vm_renders_completely_and_libvirt_accepts_it(tmp_path):
    topo = probe_topology(str(FIXTURES / "kunpeng920-2s"))
    vcpus = len(topo.numa_nodes[0].cpus) + 4
    plan = Planner(topo).plan(VmRequest(UUID, vcpus, 2048, dedicated=True, hugepages=True), []).plan
    assert len(plan.guest_cells) == 2 and plan.hugepage_kib == 524288 and plan.iothread_cpus
    spec = _spec("aarch64", vcpus, 2048, dedicated_cpus=True, hugepages=True)
    dom = _build(spec, plan)
    # The builder defines no I/O threads, so the plan's I/O thread gets no pin ...
    assert dom.iothreads is None and dom.cputune.iothreadpins == []
    # ... and once the domain defines one, re-applying the plan pins it.
    dom.iothreads = 1
    apply_placement(dom, plan, spec)
    xml = dom.to_xml()
    schema_check(tmp_path, xml, "domain", "d")
    assert dx.Domain.from_xml(xml).to_xml() == xml  # the typed model round-trips it

    got = _libvirt_define(xml)
    assert _pins(got) == {v: tuple(c) for v, c in plan.vcpu_pins.items()}
    assert parse_cpulist(got.cputune.emulatorpin) == tuple(plan.emulator_cpus)
    assert [(p.iothread, parse_cpulist(p.cpuset)) for p in got.cputune.iothreadpins] == [(1, tuple(plan.iothread_cpus[1]))]
    assert got.numatune.mode == "strict" and parse_cpulist(got.numatune.nodeset) == tuple(plan.memory_nodes)
    assert {m.cellid: (m.mode, int(m.nodeset)) for m in got.numatune.memnodes} == {
        c.id: ("strict", c.host_node) for c in plan.guest_cells}
    assert got.hugepages and [p.size_kib for p in got.hugepage_pages] == [524288]
    assert [parse_cpulist(c.cpus) for c in got.cpu.numa_cells] == [c.vcpus for c in plan.guest_cells]
    assert [c.memory_kib for c in got.cpu.numa_cells] == [c.memory_mib * 1024 for c in plan.guest_cells]


def test_xeon_shared_vm_floats_on_the_pool_with_normal_pages_and_no_cells(tmp_path):
    topo = probe_topology(str(FIXTURES / "fusionserver-2s"))
    plan = Planner(topo, reserved_cpus=[0]).plan(VmRequest(UUID, 2, 1024), []).plan
    spec = _spec("x86_64", 2, 1024)
    dom = _build(spec, plan)
    assert all(0 not in parse_cpulist(p.cpuset) for p in dom.cputune.vcpupins)
    assert dom.cputune.iothreadpins == [] and dom.numatune.memnodes == []
    assert not dom.hugepages and dom.hugepage_pages == [] and dom.cpu.numa_cells == []
    xml = dom.to_xml()
    schema_check(tmp_path, xml, "domain", "d")
    got = _libvirt_define(xml)
    assert _pins(got) == {v: tuple(c) for v, c in plan.vcpu_pins.items()}
    assert parse_cpulist(got.numatune.nodeset) == tuple(plan.memory_nodes)


def test_xeon_1g_pages_with_explicit_cells_mirrored_on_both_nodes(tmp_path):
    topo = probe_topology(str(FIXTURES / "fusionserver-2s"))
    plan = Planner(topo, reserved_cpus=[0, 40]).plan(
        VmRequest(UUID, 4, 4096, dedicated=True, hugepages=True, numa_cells=2), []).plan
    assert plan.hugepage_kib == 1048576 and [c.host_node for c in plan.guest_cells] == [0, 1]
    spec = _spec("x86_64", 4, 4096, dedicated_cpus=True, hugepages=True, numa_cells=2)
    dom = _build(spec, plan)
    xml = dom.to_xml()
    schema_check(tmp_path, xml, "domain", "d")
    got = _libvirt_define(xml)
    assert [p.size_kib for p in got.hugepage_pages] == [1048576]
    assert {m.cellid: int(m.nodeset) for m in got.numatune.memnodes} == {0: 0, 1: 1}


def test_plan_cells_replace_the_spec_split_when_the_plan_made_them():
    # The spec alone splits 3 vCPUs as 0-1 / 2 and gives cell 0 the odd MiB; the plan's cells
    # (what the planner mirrored onto host nodes) win, and carry the memnode bindings.
    spec = _spec("x86_64", 3, 1025, dedicated_cpus=True, numa_cells=2)
    alone = _build(spec, None)
    assert [(c.cpus, c.memory_kib) for c in alone.cpu.numa_cells] == [("0-1", 513 * 1024), ("2", 512 * 1024)]
    assert alone.numatune is None
    plan = PlacementPlan(vcpu_pins={0: (2,), 1: (3,), 2: (22,)}, emulator_cpus=(4,), memory_nodes=(0, 1),
                         guest_cells=(GuestNumaCell(0, (0,), 512, 0), GuestNumaCell(1, (1, 2), 513, 1)), dedicated=True)
    dom = _build(spec, plan)
    assert [(c.id, c.cpus, c.memory_kib) for c in dom.cpu.numa_cells] == [(0, "0", 512 * 1024), (1, "1-2", 513 * 1024)]
    assert [(m.cellid, m.nodeset) for m in dom.numatune.memnodes] == [(0, "0"), (1, "1")]


def test_spec_topology_stays_when_the_plan_made_no_cells():
    spec = _spec("aarch64", 4, 1024, dedicated_cpus=True, numa_cells=2)
    plan = PlacementPlan(vcpu_pins={v: (v,) for v in range(4)}, emulator_cpus=(8,), memory_nodes=(0,), dedicated=True)
    dom = _build(spec, plan)
    assert [c.cpus for c in dom.cpu.numa_cells] == ["0-1", "2-3"]
    assert dom.numatune.nodeset == "0" and dom.numatune.memnodes == []


def test_interleaved_plan_binds_each_cell_strictly_to_its_node():
    spec = _spec("x86_64", 2, 1024, numa_cells=2)
    plan = PlacementPlan(vcpu_pins={0: (1,), 1: (21,)}, memory_nodes=(0, 1), memory_mode="interleave",
                         guest_cells=(GuestNumaCell(0, (0,), 512, 0), GuestNumaCell(1, (1,), 512, 1)))
    dom = _build(spec, plan)
    assert dom.numatune.mode == "interleave" and {m.mode for m in dom.numatune.memnodes} == {"strict"}


def test_applying_twice_renders_the_same_document():
    spec = _spec("aarch64", 4, 2048, dedicated_cpus=True, hugepages=True)
    plan = PlacementPlan(vcpu_pins={v: (v,) for v in range(4)}, emulator_cpus=(8,), iothread_cpus={1: (8,), 2: (9,)},
                         memory_nodes=(0, 1), guest_cells=(GuestNumaCell(0, (0, 1), 1024, 0), GuestNumaCell(1, (2, 3), 1024, 1)),
                         hugepage_kib=2048)
    dom = _build(spec, plan)
    first = dom.to_xml()
    apply_placement(dom, plan, spec)
    assert dom.to_xml() == first
    dom.iothreads = 1  # only I/O thread 1 exists: thread 2's pin would be refused by libvirt
    apply_placement(dom, plan, spec)
    assert [(p.iothread, p.cpuset) for p in dom.cputune.iothreadpins] == [(1, "8")]


@pytest.mark.parametrize("plan, spec_kw, field", [
    (PlacementPlan(vcpu_pins={0: (), 1: (1,)}), {}, "plan.vcpu_pins[0]"),
    (PlacementPlan(vcpu_pins={0: (0,), 5: (1,)}), {}, "plan.vcpu_pins[5]"),
    (PlacementPlan(vcpu_pins={0: (0,), 1: (1,)}, memory_nodes=(0,), memory_mode="bogus"), {}, "plan.memory_mode"),
    (PlacementPlan(vcpu_pins={0: (0,), 1: (1,)}, hugepage_kib=0), {}, "plan.hugepage_kib"),
    (PlacementPlan(guest_cells=(GuestNumaCell(0, (0, 1), 1024, 0),)), {"numa_cells": 2}, "spec.numa_cells"),
    (PlacementPlan(guest_cells=(GuestNumaCell(0, (0,), 512, 0), GuestNumaCell(1, (), 512, 1))), {}, "plan.guest_cells[1]"),
    (PlacementPlan(guest_cells=(GuestNumaCell(0, (0,), 512, 0), GuestNumaCell(1, (0,), 512, 1))), {}, "plan.guest_cells"),
    (PlacementPlan(guest_cells=(GuestNumaCell(0, (0,), 512, 0), GuestNumaCell(1, (1,), 256, 1))), {}, "plan.guest_cells"),
])
def test_unrenderable_plans_are_refused_naming_the_field(plan, spec_kw, field):
    spec = _spec("x86_64", 2, 1024, **spec_kw)
    with pytest.raises(InvalidArgument) as exc:
        _build(spec, plan)
    assert exc.value.field == field, exc.value.message


def test_typed_model_parses_libvirt_units_and_round_trips_the_new_elements():
    xml = ("<domain type='kvm'><name>x</name><memory unit='KiB'>2097152</memory>"
           "<memoryBacking><hugepages><page size='2' unit='M' nodeset='0'/></hugepages></memoryBacking>"
           "<vcpu>2</vcpu><iothreads>1</iothreads>"
           "<cputune><vcpupin vcpu='0' cpuset='1'/><iothreadpin iothread='1' cpuset='3-4'/></cputune>"
           "<numatune><memory mode='strict' nodeset='0-1'/><memnode cellid='1' mode='preferred' nodeset='1'/></numatune>"
           "</domain>")
    dom = dx.Domain.from_xml(xml)
    assert dom.iothreads == 1 and dom.hugepages
    (page,) = dom.hugepage_pages
    assert (page.size_kib, page.nodeset) == (2048, "0")
    assert [(p.iothread, p.cpuset) for p in dom.cputune.iothreadpins] == [(1, "3-4")]
    assert [(m.cellid, m.mode, m.nodeset) for m in dom.numatune.memnodes] == [(1, "preferred", "1")]
    assert dx.Domain.from_xml(dom.to_xml()).to_xml() == dom.to_xml()
