"""The host's placement authority: plans under one lock, persisted, restored on restart.

Wraps the pure :class:`~cna_agent.host.placement.Planner` with the state database, so two
concurrent VM creations never get the same dedicated CPU and an agent restart (kill -9
included) comes back with the same reservations. Implements compute's ``Placer`` protocol
(cna_agent/contracts.py).
"""

from __future__ import annotations

import asyncio
import time
from typing import Awaitable, Callable, Mapping, Sequence

from cna_agent.contracts import PlacementPlan
from cna_agent.host.placement import Placement, Planner, VmRequest
from cna_agent.host.topology import HugePagePool
from cna_agent.host.topology.hostfiles import hugetlbfs_page_sizes, node_hugepage_pools
from cna_agent.state.store import StateStore


#: Reads the hugepage facts now: each node's pools and the page sizes a hugetlbfs is mounted
#: for (:func:`read_live_hugepages`, run in the host pool).
HugePageReader = Callable[[], Awaitable[tuple[Mapping[int, Sequence[HugePagePool]], frozenset[int]]]]


def read_live_hugepages(root: str = "/") -> tuple[dict[int, tuple[HugePagePool, ...]], frozenset[int]]:
    """Blocking (sysfs, /proc): the live counts and mounts a hugepage VM is planned on."""
    return node_hugepage_pools(root), hugetlbfs_page_sizes(root)


class HostPlacer:
    def __init__(self, planner: Planner, store: StateStore, *, live_hugepages: HugePageReader | None = None) -> None:
        """``live_hugepages``: how hugepage VMs learn the kernel's pools at planning time (the
        topology the planner was built from is a start-up snapshot); None keeps the snapshot."""
        self.planner = planner
        self._live_hugepages = live_hugepages
        self._store = store
        self._lock = asyncio.Lock()
        self._placements: dict[str, Placement] = {}

    async def load(self) -> int:
        rows = await self._store.run(self._store.query, "SELECT placement FROM placements")
        self._placements = {p.uuid: p for p in (Placement.from_json(r["placement"]) for r in rows)}
        return len(self._placements)

    def placements(self) -> list[Placement]:
        return list(self._placements.values())

    def get(self, vm_uuid: str) -> Placement | None:
        return self._placements.get(vm_uuid)

    async def plan(self, vm_uuid: str, vcpus: int, memory_mib: int, *, dedicated: bool,
                   hugepages: bool, numa_cells: int) -> PlacementPlan:
        """Reserve (or return the existing reservation of) a VM; FailedPrecondition if it cannot fit."""
        async with self._lock:
            existing = self._placements.get(vm_uuid)
            if existing is not None:
                return existing.plan
            if hugepages and self._live_hugepages is not None:
                self.planner.live_hugepages, self.planner.hugetlbfs_sizes = await self._live_hugepages()
            placement = self.planner.plan(
                VmRequest(vm_uuid, vcpus, memory_mib, dedicated=dedicated, hugepages=hugepages, numa_cells=numa_cells),
                self.placements(),
            )
            await self._store.run(
                self._store.execute,
                "INSERT INTO placements(vm_uuid, placement, update_time) VALUES (?, ?, ?)",
                (vm_uuid, placement.to_json(), time.time()),
            )
            self._placements[vm_uuid] = placement
            return placement.plan

    async def release(self, vm_uuid: str) -> None:
        async with self._lock:
            if self._placements.pop(vm_uuid, None) is not None:
                await self._store.run(self._store.execute, "DELETE FROM placements WHERE vm_uuid = ?", (vm_uuid,))
