"""A PlacementPlan as libvirt domain XML fragments: cputune, numatune, memoryBacking, guest NUMA.

Compute's builder (compute/render.py) owns the domain document; this renders only what the
plan decides, complete, so the builder can insert the elements as they are. Compute's
builder currently renders vcpupin/emulatorpin and a single numatune nodeset itself; what it
does not yet render from the plan (per-cell ``memnode`` bindings, the hugepage page size,
``iothreadpin``, guest cells mirroring host nodes) is here.

Placement of each element (libvirt's schema order is free for these top-level elements):
``render_placement`` returns the children of ``<domain>``; ``render_guest_numa`` returns the
``<numa>`` element that goes inside ``<cpu>``.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET

from cna_agent.compute.bindings import PlacementPlan
from cna_agent.errors import InvalidArgument
from cna_agent.host.cpulist import format_cpulist

_MODES = ("strict", "preferred", "interleave", "restrictive")


def _cpuset(cpus, field: str) -> str:
    text = format_cpulist(cpus)
    if not text:
        raise InvalidArgument(field, "an empty CPU/node set cannot be rendered (libvirt rejects it)")
    return text


def render_placement(plan: PlacementPlan, *, iothreads: int = 0) -> list[ET.Element]:
    """``<cputune>``, ``<numatune>`` and ``<memoryBacking>`` for ``plan`` (those it needs).

    ``iothreads``: how many I/O threads the domain defines (``<iothreads>``); pins are
    rendered only for ids 1..iothreads, since libvirt refuses an iothreadpin for an I/O
    thread the domain does not have.
    """
    out: list[ET.Element] = []
    tune = ET.Element("cputune")
    for vcpu, cpus in sorted(plan.vcpu_pins.items()):
        ET.SubElement(tune, "vcpupin", vcpu=str(vcpu), cpuset=_cpuset(cpus, f"plan.vcpu_pins[{vcpu}]"))
    if plan.emulator_cpus:
        ET.SubElement(tune, "emulatorpin", cpuset=_cpuset(plan.emulator_cpus, "plan.emulator_cpus"))
    for iothread, cpus in sorted(plan.iothread_cpus.items()):
        if 1 <= iothread <= iothreads:
            ET.SubElement(tune, "iothreadpin", iothread=str(iothread), cpuset=_cpuset(cpus, f"plan.iothread_cpus[{iothread}]"))
    if len(tune):
        out.append(tune)
    if plan.memory_nodes:
        if plan.memory_mode not in _MODES:
            raise InvalidArgument("plan.memory_mode", f"{plan.memory_mode!r} is not one of {', '.join(_MODES)}")
        numa = ET.Element("numatune")
        ET.SubElement(numa, "memory", mode=plan.memory_mode, nodeset=_cpuset(plan.memory_nodes, "plan.memory_nodes"))
        for cell in plan.guest_cells:
            if cell.host_node is not None:
                ET.SubElement(numa, "memnode", cellid=str(cell.id), mode="strict" if plan.memory_mode == "interleave"
                              else plan.memory_mode, nodeset=str(cell.host_node))
        out.append(numa)
    if plan.hugepage_kib:
        backing = ET.Element("memoryBacking")
        pages = ET.SubElement(backing, "hugepages")
        ET.SubElement(pages, "page", size=str(plan.hugepage_kib), unit="KiB")
        out.append(backing)
    return out


def render_guest_numa(plan: PlacementPlan) -> ET.Element | None:
    """``<numa>`` (inside ``<cpu>``) with one cell per planned guest cell, or None."""
    if not plan.guest_cells:
        return None
    numa = ET.Element("numa")
    for cell in plan.guest_cells:
        if not cell.vcpus or cell.memory_mib <= 0:
            raise InvalidArgument(f"plan.guest_cells[{cell.id}]", "a guest NUMA cell needs vCPUs and memory")
        ET.SubElement(numa, "cell", id=str(cell.id), cpus=format_cpulist(cell.vcpus), memory=str(cell.memory_mib), unit="MiB")
    return numa
