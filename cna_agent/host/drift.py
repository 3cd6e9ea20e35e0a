"""Where placed VMs' threads and memory really are, compared with their plans; drift events.

The plan says where a VM should run (HostPlacer, re-derived by ``Planner.current_plans`` so
shared-pool changes are included); the kernel says where it does. They part ways when
someone runs ``taskset``/``virsh vcpupin`` by hand, when libvirt restarts a guest from an
older definition, when CPUs go offline (the kernel widens affinity of threads whose CPUs all
went away), or when the shared pool shrank under a running VM. This module reads the
kernel's view through the native hot path (cna_agent.host.affinity) and

* builds a per-VM report (``inspect``) for ``cna-ctl host placement`` / ``GetPlacement``;
* runs a periodic check (:class:`PlacementMonitor`, level-triggered as in DESIGN.md) that
  publishes ``placement.drift`` when a VM's drift appears or changes, and with
  ``repair=True`` re-pins the drifted threads in one native batch and publishes
  ``placement.repaired`` (or ``placement.repair_failed``).

QEMU threads are told apart by name (libvirt starts QEMU with ``debug-threads=on``):
``CPU <n>/KVM`` (or ``/TCG``) is vCPU n, ``IO iothread<n>`` is I/O thread n, everything else
(the main loop, RCU, workers, VNC) is an emulator thread. libvirt's own view
(virDomainGetVcpuPinInfo) is not used because it reports what libvirt configured, not what
the kernel enforces.

Memory: resident pages per node from ``numa_maps``. Off-plan memory below a tolerance (the
larger of ``memory_tolerance_kib`` and 5% of the process's memory) is not drift: shared
library pages in the page cache may sit on any node. Memory is reported, never moved
(migrating guest RAM is an admin decision: it stalls the guest).

Reading /proc and re-pinning block: they run in a BlockingPool (the daemon's shared "host"
pool; a one-thread pool of its own when none is given), each call with its deadline.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Mapping

from cna_agent.blocking import BlockingPool
from cna_agent.contracts import Finding, PlacementPlan, VmStatus
from cna_agent.errors import InvalidArgument, NotFound
from cna_agent.host import affinity
from cna_agent.host.cpulist import format_cpulist

log = logging.getLogger(__name__)

_VCPU_RE = re.compile(r"CPU (\d+)/[A-Za-z]+")
_IOTHREAD_RE = re.compile(r"IO iothread(\d+)")

#: Off-plan resident memory ignored below this (page-cache pages of shared libraries).
DEFAULT_MEMORY_TOLERANCE_KIB = 64 * 1024


@dataclass(frozen=True)
class ThreadView:
    tid: int
    name: str
    #: "vcpu", "iothread" or "emulator".
    role: str
    #: vCPU or I/O thread number; -1 for emulator threads.
    index: int
    planned: tuple[int, ...]
    allowed: tuple[int, ...]
    last_cpu: int
    cpu_seconds: float

    @property
    def drifted(self) -> bool:
        return bool(self.planned) and self.allowed != self.planned


@dataclass(frozen=True)
class VmView:
    uuid: str
    name: str
    #: compute's state ("running", "shut-off", ...) or "missing" when libvirt has no such VM.
    state: str
    pid: int
    plan: PlacementPlan
    threads: tuple[ThreadView, ...] = ()
    memory_kib: Mapping[int, int] = field(default_factory=dict)
    #: Human-readable reasons, empty when everything is where the plan says.
    drift: tuple[str, ...] = ()

    def drift_key(self) -> tuple[str, ...]:
        return self.drift


def classify(name: str) -> tuple[str, int]:
    """(role, index) of a QEMU thread from its name."""
    m = _VCPU_RE.fullmatch(name)
    if m:
        return "vcpu", int(m.group(1))
    m = _IOTHREAD_RE.fullmatch(name)
    if m:
        return "iothread", int(m.group(1))
    return "emulator", -1


def planned_cpus(plan: PlacementPlan, role: str, index: int) -> tuple[int, ...]:
    """Where the plan lets a thread run; () when the plan does not say (then no drift)."""
    if role == "vcpu":
        return tuple(sorted(plan.vcpu_pins.get(index, ())))
    if role == "iothread":
        return tuple(sorted(plan.iothread_cpus.get(index, ()) or plan.emulator_cpus))
    return tuple(sorted(plan.emulator_cpus))


def inspect(uuid: str, name: str, state: str, pid: int, plan: PlacementPlan, *,
            memory_tolerance_kib: int = DEFAULT_MEMORY_TOLERANCE_KIB, use_native: bool | None = None) -> VmView:
    """Read one VM's threads and memory from the kernel and compare with ``plan`` (blocking)."""
    if pid <= 0:
        return VmView(uuid, name, state, 0, plan)
    stats = affinity.thread_stats(pid, use_native=use_native)
    allowed = affinity.get_affinity([s.tid for s in stats], use_native=use_native)
    threads = []
    for s in stats:
        if s.tid not in allowed:
            continue  # exited between the two reads
        role, index = classify(s.comm)
        threads.append(ThreadView(s.tid, s.comm, role, index, planned_cpus(plan, role, index), allowed[s.tid],
                                  s.last_cpu, s.cpu_seconds))
    try:
        memory = affinity.numa_memory_kib(pid, use_native=use_native)
    except OSError:
        memory = {}
    drift = [
        f"{t.name} (tid {t.tid}) may run on {format_cpulist(t.allowed)}, planned {format_cpulist(t.planned)}"
        for t in threads if t.drifted
    ]
    seen_vcpus = {t.index for t in threads if t.role == "vcpu"}
    if threads and seen_vcpus and plan.vcpu_pins and not set(plan.vcpu_pins) >= seen_vcpus:
        drift.append(f"vCPU threads {sorted(seen_vcpus - set(plan.vcpu_pins))} have no planned pin")
    if plan.memory_nodes and memory:
        off = {n: k for n, k in memory.items() if n not in plan.memory_nodes}
        total = sum(memory.values())
        if sum(off.values()) > max(memory_tolerance_kib, total // 20):
            where = ", ".join(f"node {n}: {k // 1024} MiB" for n, k in sorted(off.items()))
            drift.append(f"memory outside planned node(s) {format_cpulist(plan.memory_nodes)}: {where}")
    return VmView(uuid, name, state, pid, plan, tuple(threads), memory, tuple(drift))


def repair(view: VmView, *, use_native: bool | None = None) -> dict[int, int]:
    """Re-pin the drifted threads of one VM in one batch; {tid: errno} of those that failed."""
    wanted = {t.tid: t.planned for t in view.threads if t.drifted}
    return affinity.repin_threads(view.pid, wanted, use_native=use_native) if wanted else {}


#: Finds a placed VM's (name, state, qemu pid); raises when libvirt has no such VM.
VmLocator = Callable[[str], Awaitable[tuple[str, str, int]]]


class PlacementMonitor:
    """The pinning check of every placed VM (a contracts.VmCheck: compute's per-VM reconcile
    runs it at ``interval_s`` and on the VM's events); also answers on-demand reports.

    Blocking /proc reads run in the host pool, one VM at a time, so a host with hundreds of
    guests never stalls the event loop.
    """

    name = "placement"

    def __init__(self, placer: Any, events: Any, locate: VmLocator, *, interval_s: float = 60.0,
                 repair: bool = False, memory_tolerance_kib: int = DEFAULT_MEMORY_TOLERANCE_KIB,
                 use_native: bool | None = None, pool: BlockingPool | None = None) -> None:
        self.pool = pool or BlockingPool("placement", 1, 30.0)
        self.placer = placer
        self.events = events
        self.locate = locate
        self.interval_s = interval_s
        self.repair = repair
        self.memory_tolerance_kib = memory_tolerance_kib
        self.use_native = use_native
        self._last: dict[str, tuple[str, ...]] = {}
        self.last_check: float = 0.0

    def plans(self) -> dict[str, PlacementPlan]:
        return self.placer.planner.current_plans(self.placer.placements())

    async def report(self, vm: str = "") -> list[VmView]:
        """Every placed VM (or the one whose UUID or name is ``vm``), read now."""
        views = []
        for uuid, plan in sorted(self.plans().items()):
            try:
                name, state, pid = await self.locate(uuid)
            except Exception as exc:  # noqa: BLE001 - a placement whose VM libvirt lost
                log.debug("event=placement.locate_failed vm=%s error=%r", uuid, str(exc))
                name, state, pid = "", "missing", 0
            if vm and vm not in (uuid, name):
                continue
            views.append(await self._inspect(uuid, plan, (name, state, pid)))
        return views

    async def _inspect(self, uuid: str, plan: PlacementPlan, located: tuple[str, str, int]) -> VmView:
        name, state, pid = located
        return await self.pool.run(
            lambda: inspect(uuid, name, state, pid, plan, memory_tolerance_kib=self.memory_tolerance_kib,
                            use_native=self.use_native), what=f"placement check of {name or uuid}")

    async def check_vm(self, vm: VmStatus) -> list[Finding]:
        """One VM: publish drift that is new or changed, repair when configured."""
        plan = self.plans().get(vm.uuid)
        if plan is None:
            self._last.pop(vm.uuid, None)
            return []  # not placed (no dedicated CPUs or hugepages)
        view = await self._inspect(vm.uuid, plan, await self.locate(vm.uuid))
        self.last_check = time.time()
        return await self._apply(view)

    async def check_once(self) -> list[VmView]:
        """Every placed VM in one pass (what check_vm does for each)."""
        views = await self.report()
        self.last_check = time.time()
        current = {v.uuid for v in views}
        for gone in set(self._last) - current:
            del self._last[gone]
        for view in views:
            await self._apply(view)
        return views

    async def _apply(self, view: VmView) -> list[Finding]:
        key = view.drift_key()
        previous = self._last.get(view.uuid, ())
        self._last[view.uuid] = key
        if not key:
            return []
        if key != previous:
            await self.events.publish(
                "placement.drift", severity="warning", resource_kind="vm", resource_id=view.uuid,
                resource_name=view.name, message="; ".join(key),
                attributes={"qemu_pid": view.pid, "drifted_threads": sum(t.drifted for t in view.threads),
                            "repair": self.repair})
        repaired = False
        if self.repair and any(t.drifted for t in view.threads):
            repaired = await self._repair(view)
        return [Finding(self.name, view.uuid, "; ".join(key), repaired, "re-pinned as planned" if repaired else "")]

    async def _repair(self, view: VmView) -> bool:
        """Re-pin drifted threads; True when every one of them moved."""
        failed = await self.pool.run(lambda: repair(view, use_native=self.use_native),
                                     what=f"re-pinning {view.name or view.uuid}")
        moved = [t for t in view.threads if t.drifted and t.tid not in failed]
        if moved:
            await self.events.publish(
                "placement.repaired", resource_kind="vm", resource_id=view.uuid, resource_name=view.name,
                message=f"re-pinned {len(moved)} thread(s) as planned: "
                        + ", ".join(f"{t.name} -> {format_cpulist(t.planned)}" for t in moved),
                attributes={"threads": len(moved)})
            # Repaired thread drift is gone; the next pass reports it again only if it returns,
            # while what repair cannot fix (memory, unplanned vCPUs) stays reported once.
            moved_tids = {f"(tid {t.tid})" for t in moved}
            self._last[view.uuid] = tuple(d for d in view.drift if not any(m in d for m in moved_tids))
        if failed:
            await self.events.publish(
                "placement.repair_failed", severity="error", resource_kind="vm", resource_id=view.uuid,
                resource_name=view.name, message=f"could not re-pin {len(failed)} thread(s): "
                + ", ".join(f"tid {tid}: errno {err}" for tid, err in sorted(failed.items())),
                attributes={"threads": len(failed)})
        return not failed


@dataclass(frozen=True)
class HostPlacementReport:
    """What GetPlacement answers: the host's CPU split and every placed VM's view."""

    time: float
    reserved_cpus: tuple[int, ...]
    shared_cpus: tuple[int, ...]
    vms: tuple[VmView, ...]
    native: bool


async def host_report(monitor: PlacementMonitor, vm: str = "") -> HostPlacementReport:
    """Validate ``vm`` (UUID or name, or "" for all) and read the report; NotFound if unplaced."""
    if len(vm) > 256 or any(ord(ch) < 32 or ord(ch) == 127 for ch in vm):
        raise InvalidArgument("vm", "must be a VM UUID or name (at most 256 printable characters)")
    views = await monitor.report(vm)
    if vm and not views:
        raise NotFound(f"VM {vm!r} has no placement on this host (only dedicated-CPU and hugepage VMs are placed)",
                       field="vm")
    placer = monitor.placer
    return HostPlacementReport(
        time=time.time(),
        reserved_cpus=tuple(placer.planner.reserved),
        shared_cpus=tuple(placer.planner.shared_pool(placer.placements())),
        vms=tuple(views),
        native=affinity.native_available() if monitor.use_native is None else monitor.use_native,
    )

