"""The public topology records: what a probe returns (HostTopology and its parts).

Separate from the readers because these frozen dataclasses are the agent-wide contract: the
placement planner, the host service, the VRM report, cna-ctl and the benchmarks build and
read them (tests construct them directly), while none of them needs to know how sysfs is
walked. Nothing here does I/O.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from cna_agent.host import midr as _midr

__all__ = ["CacheInfo", "CpuInfo", "HostTopology", "HugePagePool", "MidrInfo", "NumaNode"]


@dataclass(frozen=True, slots=True)
class HugePagePool:
    """One hugepage size: pools are per size, so the planner needs all of them."""

    size_kib: int
    total: int
    free: int


@dataclass(frozen=True, slots=True)
class MidrInfo:
    """Decoded MIDR_EL1: identifies the Arm core, which decides migration compatibility."""

    raw: int
    implementer: int
    implementer_name: str
    variant: int
    architecture: int
    part: int
    part_name: str
    revision: int

    @classmethod
    def from_raw(cls, raw: int) -> MidrInfo:
        impl, variant, arch, part, rev = _midr.split_midr(raw)
        return cls(
            raw=raw & 0xFFFFFFFF,
            implementer=impl,
            implementer_name=_midr.implementer_name(impl),
            variant=variant,
            architecture=arch,
            part=part,
            part_name=_midr.part_name(impl, part),
            revision=rev,
        )


@dataclass(frozen=True, slots=True)
class CpuInfo:
    """One logical CPU. Ids are the kernel's; -1 means "the kernel does not say"."""

    id: int
    online: bool
    socket: int
    die: int
    cluster: int
    core: int
    node: int
    thread_siblings: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class CacheInfo:
    """One cache instance and the CPUs sharing it (pinning keeps a guest inside an L3)."""

    level: int
    type: str
    size_kib: int
    cpus: tuple[int, ...]

    @property
    def name(self) -> str:
        """Conventional short name: L1d, L1i, L2, L3."""
        if self.type == "Data":
            return f"L{self.level}d"
        if self.type == "Instruction":
            return f"L{self.level}i"
        if self.type == "Unified":
            return f"L{self.level}"
        return f"L{self.level}-other"


@dataclass(frozen=True, slots=True)
class NumaNode:
    """One NUMA node; guests are placed so their memory and vCPUs share a node."""

    id: int
    cpus: tuple[int, ...]
    memory_total_kib: int
    memory_free_kib: int
    distances: tuple[int, ...]
    hugepages: tuple[HugePagePool, ...]


@dataclass(frozen=True, slots=True)
class HostTopology:
    """Everything the planner and the VRM need to know about the host's processors."""

    arch: str
    cpu_vendor: str
    cpu_model: str
    midr: MidrInfo | None
    hw_virt: str
    sockets: int
    dies_per_socket: int
    clusters_per_die: int
    cores_per_cluster: int
    threads_per_core: int
    cpus: tuple[CpuInfo, ...]
    online_cpus: tuple[int, ...]
    numa_nodes: tuple[NumaNode, ...]
    caches: tuple[CacheInfo, ...]
    hugepages: tuple[HugePagePool, ...]
    memory_total_kib: int

    def cache_sizes_kib(self) -> dict[str, int]:
        """{"L1d": 64, "L1i": 64, "L2": 512, "L3": 24576}: size of one instance per kind."""
        sizes: dict[str, int] = {}
        for cache in self.caches:
            sizes.setdefault(cache.name, cache.size_kib)
        return sizes

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (lists, not tuples) for cna-ctl --json and the VRM report."""
        out = _jsonable(dataclasses.asdict(self))
        out["cache_sizes_kib"] = self.cache_sizes_kib()
        return out


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value
