"""The raw per-CPU and per-cache records both topology readers produce.

Separate because they are the meeting point of three modules: the C reader (through
native.py) and the pure-Python twin (pyscan.py) each fill them, and assemble.py turns them
into the public model. They mirror ``struct cna_cpu_raw`` / ``struct cna_cache_raw`` and the
CNA_CACHE_* codes in native/topology.h, so the two readers can be compared record by record.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["CACHE_TYPES", "CACHE_TYPE_NAMES", "RawCache", "RawCpu"]

#: sysfs cache "type" text -> CNA_CACHE_* code (anything else is 0, "Other").
CACHE_TYPES = {"Data": 1, "Instruction": 2, "Unified": 3}
#: CNA_CACHE_* code -> the name CacheInfo.type carries.
CACHE_TYPE_NAMES = {0: "Other", 1: "Data", 2: "Instruction", 3: "Unified"}


@dataclass(slots=True)
class RawCpu:
    """One present CPU as sysfs states it: ids are -1 where the file is absent."""

    id: int
    online: bool
    package: int
    die: int
    cluster: int
    core: int
    siblings: tuple[int, ...]
    midr: int | None


@dataclass(slots=True)
class RawCache:
    """One cache instance, reported once by the lowest CPU it covers; type is a CNA_CACHE_* code."""

    level: int
    type: int
    size_kib: int
    cpus: tuple[int, ...]
