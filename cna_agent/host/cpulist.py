"""The kernel's cpulist syntax ("0-3,8,10-11"), used by sysfs, cgroups and libvirt alike.

One parser for the whole agent (sysfs trees, config, placement), with the same rules as the
native reader in native/topology.c so both probe paths agree on every input.
"""

from __future__ import annotations

from typing import Iterable

#: The largest CPU count the agent handles (Linux's NR_CPUS on the big distributions);
#: the native reader sizes its buffers from the same number.
MAX_CPUS = 8192


def parse_cpulist(text: str) -> tuple[int, ...]:
    """Parse a cpulist ("" for none) to sorted, unique CPU ids.

    Strict on purpose: a malformed list in sysfs means a tree we do not understand, and in
    config a typo; guessing would mis-pin guests. Raises ValueError naming the bad part.
    """
    text = text.strip()
    if not text:
        return ()
    ids: set[int] = set()
    for part in text.split(","):
        lo_s, dash, hi_s = part.partition("-")
        if not (lo_s.isdigit() and lo_s.isascii()) or (dash and not (hi_s.isdigit() and hi_s.isascii())):
            raise ValueError(f"bad cpulist {text!r}: {part!r} is not N or N-M")
        lo = int(lo_s)
        hi = int(hi_s) if dash else lo
        if hi < lo:
            raise ValueError(f"bad cpulist {text!r}: descending range {part!r}")
        if hi >= MAX_CPUS:
            raise ValueError(f"bad cpulist {text!r}: cpu {hi} >= {MAX_CPUS}")
        ids.update(range(lo, hi + 1))
    return tuple(sorted(ids))


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
