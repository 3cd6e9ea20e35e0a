"""The kernel's cpulist syntax ("0-3,8,10-11"), used by sysfs, cgroups and libvirt alike."""

from __future__ import annotations

from typing import Iterable

#: Linux's NR_CPUS ceiling on the largest distributions; anything above is a typo, not a host.
MAX_CPU_ID = 8191


def parse_cpulist(text: str) -> tuple[int, ...]:
    """Parse a cpulist into sorted, unique CPU ids; raises ValueError naming the bad part."""
    cpus: set[int] = set()
    text = text.strip()
    if not text:
        return ()
    for part in text.split(","):
        part = part.strip()
        lo_s, dash, hi_s = part.partition("-")
        stride = 1
        if ":" in hi_s:  # "0-15:2" (the kernel accepts a stride; libvirt and cgroups do not)
            hi_s, _, stride_s = hi_s.partition(":")
            if not stride_s.isdigit() or int(stride_s) == 0:
                raise ValueError(f"bad stride in cpulist part {part!r}")
            stride = int(stride_s)
        if not lo_s.isdigit() or (dash and not hi_s.isdigit()):
            raise ValueError(f"bad cpulist part {part!r} (expected N or N-M)")
        lo = int(lo_s)
        hi = int(hi_s) if dash else lo
        if hi < lo:
            raise ValueError(f"bad cpulist range {part!r} (end before start)")
        if hi > MAX_CPU_ID:
            raise ValueError(f"CPU id {hi} in {part!r} is above {MAX_CPU_ID}")
        cpus.update(range(lo, hi + 1, stride))
    return tuple(sorted(cpus))


def format_cpulist(cpus: Iterable[int]) -> str:
    """Format CPU ids compactly as ranges, the inverse of :func:`parse_cpulist`."""
    ids = sorted(set(cpus))
    parts: list[str] = []
    i = 0
    while i < len(ids):
        j = i
        while j + 1 < len(ids) and ids[j + 1] == ids[j] + 1:
            j += 1
        parts.append(str(ids[i]) if i == j else f"{ids[i]}-{ids[j]}")
        i = j + 1
    return ",".join(parts)
