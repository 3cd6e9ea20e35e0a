"""A host's PlacementPlan rendered into the domain: CPU pins, NUMA memory binding, hugepages
and the guest NUMA cells the plan made.

Why apart from render.py: the plan is the one part of a definition that belongs to the host
rather than to the VM (a migration or a hibernation's resume replaces exactly this part, see
migration_xml.py), and it has its own consistency rules against the spec; this is the only
renderer of a plan.
"""

from __future__ import annotations

from typing import Sequence

from cna_agent.compute import domxml as dx
from cna_agent.compute.spec import VmSpec
from cna_agent.contracts import PlacementPlan
from cna_agent.errors import InvalidArgument
from cna_agent.host.cpulist import format_cpulist


def _cpuset(cpus: Sequence[int], field: str) -> str:
    """libvirt's cpuset text; an empty set is refused (libvirt rejects it, and "no CPUs"
    silently read as "any CPU" would undo the plan)."""
    if not cpus:
        raise InvalidArgument(field, "an empty CPU/node set cannot be rendered (libvirt rejects it)")
    return ",".join(str(c) for c in cpus)


#: numatune memory modes libvirt knows; anything else is a planner bug, refused before libvirt sees it.
MEMORY_MODES = ("strict", "preferred", "interleave", "restrictive")


def apply_placement(dom: dx.Domain, plan: PlacementPlan, spec: VmSpec) -> None:
    """Render the whole placement plan into ``dom`` (already built from ``spec``).

    What the plan decides, and only that: ``<vcpupin>`` per vCPU, ``<emulatorpin>``,
    ``<iothreadpin>``, ``<numatune>`` (``<memory>`` on the plan's host nodes plus one
    ``<memnode>`` per guest cell bound to a host node), ``<memoryBacking><hugepages>`` with
    the plan's page size, and the guest NUMA cells the plan made.

    Guest NUMA cells, which of the two sources wins:

    * The spec's own topology (``spec.numa_cells`` > 1 split evenly, or one cell for memory
      hot-plug) is what :func:`build_domain` renders, with or without a plan.
    * When the plan made guest cells (the VM spans host nodes, or the spec asked for cells and
      the planner mirrored them onto nodes), the plan's cells replace the spec's: only they
      say which host node each cell's memory lives on, and ``<memnode cellid>`` must name a
      cell the guest really has. The planner is asked for ``spec.numa_cells`` cells, so the
      counts agree; a plan whose cell count differs from an explicit ``spec.numa_cells``
      (a stale placement after a spec change) is refused rather than silently overriding
      what the caller asked for.
    * A plan without cells leaves the spec's topology as it is.

    I/O threads: pins are rendered only for ids 1..``dom.iothreads``, the I/O threads the
    domain defines (libvirt refuses a pin for any other id). The builder defines none today
    (disks run on QEMU's main loop, which ``emulatorpin`` already confines), so built domains
    carry no ``<iothreadpin>`` until a domain defines I/O threads.

    Idempotent: it replaces what an earlier call rendered, so a caller that sets
    ``dom.iothreads`` on a built domain re-applies the plan to pin them. Raises
    InvalidArgument naming the plan field that cannot be rendered.
    """
    vcpus = dom.vcpu or spec.effective_max_vcpus
    tune = dom.cputune or dx.CpuTune()
    for v in plan.vcpu_pins:
        if not 0 <= v < vcpus:
            raise InvalidArgument(f"plan.vcpu_pins[{v}]", f"vCPU {v} does not exist (the domain has {vcpus})")
    tune.vcpupins = [dx.VcpuPin(vcpu=v, cpuset=_cpuset(c, f"plan.vcpu_pins[{v}]")) for v, c in sorted(plan.vcpu_pins.items())]
    tune.emulatorpin = _cpuset(plan.emulator_cpus, "plan.emulator_cpus") if plan.emulator_cpus else None
    defined = dom.iothreads or 0
    tune.iothreadpins = [dx.IoThreadPin(iothread=i, cpuset=_cpuset(c, f"plan.iothread_cpus[{i}]"))
                         for i, c in sorted(plan.iothread_cpus.items()) if 1 <= i <= defined]
    dom.cputune = tune if len(tune.to_element()) else None

    cells = _plan_cells(plan, spec, vcpus)
    if cells:
        dom.cpu = dom.cpu or dx.Cpu()
        dom.cpu.numa_cells = cells
    if plan.memory_mode not in MEMORY_MODES:
        raise InvalidArgument("plan.memory_mode", f"{plan.memory_mode!r} is not one of {', '.join(MEMORY_MODES)}")
    # A cell bound to one host node has nothing to interleave over, so it is bound strictly;
    # otherwise the cell's mode is the plan's (libvirt refuses a memnode that is not
    # 'restrictive' under a 'restrictive' <memory>).
    cell_mode = "strict" if plan.memory_mode == "interleave" else plan.memory_mode
    memnodes = [dx.MemNode(cellid=c.id, mode=cell_mode, nodeset=str(c.host_node))
                for c in plan.guest_cells if c.host_node is not None]
    if plan.memory_nodes or memnodes:
        tune_mem = dx.NumaTune(memnodes=memnodes)
        if plan.memory_nodes:
            tune_mem.mode = plan.memory_mode
            tune_mem.nodeset = _cpuset(plan.memory_nodes, "plan.memory_nodes")
        dom.numatune = tune_mem
    else:
        dom.numatune = None

    if plan.hugepage_kib is not None and plan.hugepage_kib <= 0:
        raise InvalidArgument("plan.hugepage_kib", f"{plan.hugepage_kib} is not a page size")
    dom.hugepages = spec.hugepages or bool(plan.hugepage_kib)
    dom.hugepage_pages = [dx.HugePage(size=plan.hugepage_kib, unit="KiB")] if plan.hugepage_kib else []


def _plan_cells(plan: PlacementPlan, spec: VmSpec, vcpus: int) -> list[dx.NumaCell]:
    """The plan's guest cells as domain cells, checked to describe exactly this VM."""
    if not plan.guest_cells:
        return []
    if spec.numa_cells and len(plan.guest_cells) != spec.numa_cells:
        raise InvalidArgument("spec.numa_cells", f"{spec.numa_cells} guest NUMA cells asked, but the host's placement "
                              f"planned {len(plan.guest_cells)}; re-plan the VM")
    seen: list[int] = []
    out = []
    for i, cell in enumerate(plan.guest_cells):
        if not cell.vcpus or cell.memory_mib <= 0:
            raise InvalidArgument(f"plan.guest_cells[{i}]", "a guest NUMA cell needs vCPUs and memory")
        seen += cell.vcpus
        out.append(dx.NumaCell(id=cell.id, cpus=format_cpulist(cell.vcpus), memory_kib=cell.memory_mib * 1024, unit="KiB"))
    if sorted(seen) != list(range(vcpus)):
        raise InvalidArgument("plan.guest_cells", f"the cells' vCPUs {format_cpulist(seen)} are not each of the "
                              f"domain's {vcpus} vCPUs exactly once")
    total = sum(c.memory_mib for c in plan.guest_cells)
    if total != spec.memory_mib:
        # libvirt would silently resize the guest to the cells' sum.
        raise InvalidArgument("plan.guest_cells", f"the cells hold {total} MiB, the VM has {spec.memory_mib} MiB")
    return out
