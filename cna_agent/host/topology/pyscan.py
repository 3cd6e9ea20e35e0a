"""The pure-Python per-CPU reader: the twin of cna_topo_scan() in native/topology.c.

Separate from the C bridge because it is the reference the C reader is tested against and
the path hosts and CI take when the extension is missing; it follows the same files and the
same rules, file by file (the package docstring lists them), and fills the same raw records.
"""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Iterable

from cna_agent.host.cpulist import MAX_CPUS, parse_cpulist
from cna_agent.host.topology.raw import CACHE_TYPES, RawCache, RawCpu
from cna_agent.host.topology.sysfs_io import read_file, read_id, read_int

__all__ = ["parse_size_kib", "scan_python"]

#: cache/indexK directories examined per CPU (CNA_TOPO_MAX_CACHE_INDEX).
MAX_CACHE_INDEX = 16

CPU_DIR = "sys/devices/system/cpu"


def parse_size_kib(text: str) -> int:
    """A cache ``size`` attribute ("32K", "1M", "512") in KiB; -1 when it does not parse."""
    match = re.fullmatch(r"\s*(\d+)([KMG]?)\s*", text)
    if not match:
        return -1
    value = int(match.group(1))
    return {"": value // 1024, "K": value, "M": value * 1024, "G": value * 1024 * 1024}[match.group(2)]


def scan_python(root: str) -> tuple[list[RawCpu], list[RawCache]]:
    """Pure-Python twin of cna_topo_scan() in native/topology.c: same files, same rules."""
    cpudir = os.path.join(root, CPU_DIR)
    if not os.path.isdir(cpudir):
        raise FileNotFoundError(errno.ENOENT, "no CPU sysfs directory", cpudir)
    try:
        text = read_file(cpudir + "/possible")
        if text is not None:
            possible: Iterable[int] = parse_cpulist(text)
        else:
            found = []
            for name in os.listdir(cpudir):
                if name.startswith("cpu") and name[3:].isdigit() and name[3:].isascii():
                    if int(name[3:]) >= MAX_CPUS:
                        raise ValueError(f"{name} beyond {MAX_CPUS} CPUs")
                    found.append(int(name[3:]))
            possible = sorted(found)
        online_text = read_file(cpudir + "/online")
        online = set(parse_cpulist(online_text)) if online_text is not None else None
    except ValueError as exc:
        raise OSError(errno.EINVAL, str(exc), cpudir) from exc

    cpus: list[RawCpu] = []
    caches: list[RawCache] = []
    covered: dict[tuple[int, int], set[int]] = {}
    for cid in possible:
        base = f"{cpudir}/cpu{cid}"
        if not os.path.isdir(base):
            continue
        topo = base + "/topology/"
        sib_text = read_file(topo + "thread_siblings_list")
        siblings: tuple[int, ...] = ()
        if sib_text is not None:
            try:
                siblings = parse_cpulist(sib_text)
            except ValueError:
                siblings = ()
        midr = None
        midr_text = read_file(base + "/regs/identification/midr_el1")
        if midr_text is not None:
            try:
                midr = int(midr_text, 16)
            except ValueError:
                midr = None
        cpus.append(
            RawCpu(
                id=cid,
                online=(cid in online) if online is not None else True,
                package=read_id(topo + "physical_package_id"),
                die=read_id(topo + "die_id"),
                cluster=read_id(topo + "cluster_id"),
                core=read_id(topo + "core_id"),
                siblings=siblings,
                midr=midr,
            )
        )
        for k in range(MAX_CACHE_INDEX):
            index = f"{base}/cache/index{k}/"
            level = read_int(index + "level")
            if level is None:
                break  # indexes are dense; the first gap ends the list
            type_text = read_file(index + "type")
            if type_text is None:
                continue
            ctype = CACHE_TYPES.get(type_text.rstrip(), 0)
            key = (level & 7, ctype)
            seen = covered.setdefault(key, set())
            if cid in seen:
                continue  # already reported by a lower CPU sharing it
            size_text = read_file(index + "size")
            size = parse_size_kib(size_text) if size_text is not None else -1
            shared_text = read_file(index + "shared_cpu_list")
            try:
                shared = parse_cpulist(shared_text) if shared_text is not None else (cid,)
            except ValueError:
                shared = (cid,)
            seen.update(shared)
            caches.append(RawCache(level=level, type=ctype, size_kib=size, cpus=shared))
    return cpus, caches
