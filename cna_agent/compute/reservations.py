"""CPU and memory reservations are admission checks, not only stored numbers.

Why: ``cpu_qos.reservation_mhz`` and ``memory_qos.reservation_mib`` promise a VM that much
CPU and memory whatever its neighbours do (VMware's and FusionCompute's reservation). KVM has no
knob that guarantees it at run time, so the promise is kept where it can be: a VM is only
powered on here (start, create-and-start, an incoming live migration) when the reservations of
the VMs running here plus its own fit the host's capacity. Running and paused VMs count;
stopped ones reserve nothing. The check and the start are serialised (one lock for the host),
so two starts at once cannot both take the last free share.

Capacity: the guests' CPUs (the host's logical CPUs minus ``[host] reserved_cpus``) times the
nominal MHz the renderer uses for CPU limits, and the host's MemTotal. A refusal is
RESOURCE_EXHAUSTED naming the spec field, what is asked, what is free and who holds the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from typing import AsyncIterator, Iterable

from cna_agent.compute import state as st
from cna_agent.compute.inventory import VmInventory
from cna_agent.compute.spec import VmSpec
from cna_agent.errors import ResourceExhausted

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HostCapacity:
    """What guests may reserve on this host in total."""

    cpu_mhz: int
    memory_mib: int


def host_memory_mib(meminfo: str = "/proc/meminfo") -> int:
    """The host's MemTotal in MiB (0 when unreadable: then memory is not admission-checked)."""
    try:
        with open(meminfo) as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) // 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


class ReservationAdmission:
    def __init__(self, inventory: VmInventory, capacity: HostCapacity) -> None:
        self.inventory = inventory
        self.capacity = capacity
        self._lock = asyncio.Lock()

    @contextlib.asynccontextmanager
    async def admitted(self, uuid: str, spec: VmSpec, what: str) -> AsyncIterator[None]:
        """Hold the host's admission while ``uuid`` is powered on: raises ResourceExhausted if
        its reservations do not fit beside those of the VMs running here. A VM that reserves
        nothing passes without waiting."""
        if not (spec.cpu_qos.reservation_mhz or spec.memory_qos.reservation_mib):
            yield
            return
        async with self._lock:
            await self.check(uuid, spec, what)
            yield

    async def check(self, uuid: str, spec: VmSpec, what: str, *, arriving: Iterable[tuple[str, VmSpec]] = ()) -> None:
        """Raise ResourceExhausted unless ``spec``'s reservations fit beside those of the VMs
        running or paused here and of ``arriving`` ((name, spec) of prepared incoming VMs)."""
        holders = [(v.name, v.spec) for v in await self.inventory.list(states=(st.RUNNING, st.PAUSED))
                   if v.uuid != uuid and v.spec is not None]
        holders += [(name, s) for name, s in arriving if s.uuid != uuid]
        for field, asked, capacity, unit, of in (
                ("spec.cpu_qos.reservation_mhz", spec.cpu_qos.reservation_mhz, self.capacity.cpu_mhz, "MHz",
                 lambda s: s.cpu_qos.reservation_mhz),
                ("spec.memory_qos.reservation_mib", spec.memory_qos.reservation_mib, self.capacity.memory_mib, "MiB",
                 lambda s: s.memory_qos.reservation_mib)):
            if not asked or not capacity:
                continue
            held = [(name, of(s)) for name, s in holders if of(s)]
            taken = sum(n for _, n in held)
            if taken + asked > capacity:
                who = ", ".join(f"{name} {n}" for name, n in sorted(held, key=lambda h: -h[1])[:5]) or "none"
                log.warning("event=reservation.refused vm=%s field=%s asked=%d taken=%d capacity=%d", uuid, field, asked,
                            taken, capacity)
                raise ResourceExhausted(
                    f"{field}: {what} would reserve {asked} {unit}, but only {max(0, capacity - taken)} of this host's "
                    f"{capacity} {unit} are unreserved ({taken} {unit} reserved by {len(held)} VM(s) running or "
                    f"arriving: {who})",
                    field=field)
