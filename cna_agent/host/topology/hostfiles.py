"""The per-node and host-wide files: NUMA nodes, meminfo, hugepage pools, /proc/cpuinfo.

Separate from the per-CPU readers because these are a handful of files read in Python on
both probe paths (the C reader only walks ``cpuN`` directories), and they produce public
model records (NumaNode, HugePagePool) directly rather than raw records.
"""

from __future__ import annotations

import os
import re
from dataclasses import replace

from cna_agent.host import midr as _midr
from cna_agent.host.cpulist import parse_cpulist
from cna_agent.host.topology.model import HugePagePool, NumaNode
from cna_agent.host.topology.sysfs_io import read_file, read_head, read_int

__all__ = [
    "HUGEPAGES_DIR",
    "cpuinfo_first_record",
    "hugepage_pools",
    "hugetlbfs_page_sizes",
    "meminfo",
    "midr_from_cpuinfo",
    "node_hugepage_pools",
    "numa_nodes",
]

NODE_DIR = "sys/devices/system/node"
#: Host-wide hugepage pools (each node has its own under node/nodeN/hugepages).
HUGEPAGES_DIR = "sys/kernel/mm/hugepages"

_HUGE_RE = re.compile(r"hugepages-(\d+)kB")


def cpuinfo_first_record(root: str) -> dict[str, str]:
    """Key/value pairs of the first processor record (plus any header before it)."""
    text = read_head(os.path.join(root, "proc/cpuinfo"), 32768)
    fields: dict[str, str] = {}
    if not text:
        return fields
    seen_processor = False
    for line in text.splitlines():
        if not line.strip():
            if seen_processor:
                break
            continue
        key, sep, value = line.partition(":")
        if not sep:
            continue
        key = key.strip()
        if key == "processor":
            seen_processor = True
        fields.setdefault(key, value.strip())
    return fields


def meminfo(path: str, prefix: str = "") -> dict[str, int]:
    """"MemTotal: 123 kB" (or "Node 0 MemTotal: 123 kB") lines -> {"MemTotal": 123}."""
    text = read_file(path)
    out: dict[str, int] = {}
    if text is None:
        return out
    for line in text.splitlines():
        if prefix:
            if not line.startswith(prefix):
                continue
            line = line[len(prefix) :]
        key, sep, rest = line.partition(":")
        if not sep:
            continue
        words = rest.split()
        if words and words[0].isdigit():
            out[key.strip()] = int(words[0])
    return out


def hugepage_pools(directory: str) -> tuple[HugePagePool, ...]:
    """The ``hugepages-<size>kB`` pools under ``directory``, smallest size first."""
    try:
        names = os.listdir(directory)
    except OSError:
        return ()
    pools = []
    for name in names:
        match = _HUGE_RE.fullmatch(name)
        if not match:
            continue
        base = os.path.join(directory, name)
        pools.append(
            HugePagePool(
                size_kib=int(match.group(1)),
                total=read_int(base + "/nr_hugepages") or 0,
                free=read_int(base + "/free_hugepages") or 0,
            )
        )
    return tuple(sorted(pools, key=lambda p: p.size_kib))


def node_hugepage_pools(root: str) -> dict[int, tuple[HugePagePool, ...]]:
    """Each NUMA node's hugepage pools as the kernel counts them now (node 0 = the host-wide
    pools when the kernel has no NUMA sysfs). Cheap (a few small sysfs files per node), so the
    placer reads it for every hugepage VM instead of trusting the start-up topology: an admin
    may have changed nr_hugepages since, and pages in use by running guests are not free.
    ``free`` here is what a new mapping can still get (reserved pages taken off)."""
    node_dir = os.path.join(root, NODE_DIR)
    try:
        names = os.listdir(node_dir)
    except OSError:
        names = []
    ids = sorted(int(n[4:]) for n in names if n.startswith("node") and n[4:].isdigit() and n[4:].isascii())
    host_dir = os.path.join(root, HUGEPAGES_DIR)
    pools = {nid: hugepage_pools(f"{node_dir}/node{nid}/hugepages") for nid in ids} or {0: hugepage_pools(host_dir)}
    # Pages a mapping has reserved but not touched yet (HugePages_Rsvd) still count as free, yet
    # nobody else can have them: QEMU then fails "unable to map backing store for guest RAM".
    # The kernel keeps that count host-wide only, so it is taken off every node (on several
    # nodes this may refuse a VM that would fit, with the reason, rather than fail in QEMU).
    resv = {p.size_kib: read_int(f"{host_dir}/hugepages-{p.size_kib}kB/resv_hugepages") or 0
            for node_pools in pools.values() for p in node_pools}
    return {nid: tuple(replace(p, free=max(0, p.free - resv.get(p.size_kib, 0))) for p in node_pools)
            for nid, node_pools in pools.items()}


def hugetlbfs_page_sizes(root: str) -> frozenset[int]:
    """Page sizes (KiB) some hugetlbfs is mounted for, from ``proc/self/mounts`` under ``root``.

    QEMU maps hugepage guest RAM from a file on a hugetlbfs mount of the page size (libvirt
    refuses with "hugetlbfs filesystem is not mounted" otherwise); a mount without a
    ``pagesize=`` option serves the default size (meminfo's Hugepagesize).
    """
    text = read_file(os.path.join(root, "proc/self/mounts")) or ""
    default = meminfo(os.path.join(root, "proc/meminfo")).get("Hugepagesize", 0)
    sizes = set()
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 4 or fields[2] != "hugetlbfs":
            continue
        size = default
        for opt in fields[3].split(","):
            m = re.fullmatch(r"pagesize=(\d+)([KMG]?)", opt)
            if m:
                size = int(m.group(1)) * {"": 1 / 1024, "K": 1, "M": 1024, "G": 1024 * 1024}[m.group(2)]
        if size:
            sizes.add(int(size))
    return frozenset(sizes)


def numa_nodes(root: str) -> list[NumaNode] | None:
    """Nodes from sysfs, or None when the kernel has no NUMA sysfs at all."""
    node_dir = os.path.join(root, NODE_DIR)
    try:
        names = os.listdir(node_dir)
    except OSError:
        return None
    ids = sorted(int(n[4:]) for n in names if n.startswith("node") and n[4:].isdigit() and n[4:].isascii())
    if not ids:
        return None
    nodes = []
    for nid in ids:
        base = f"{node_dir}/node{nid}"
        cpulist = read_file(base + "/cpulist")
        try:
            cpus = parse_cpulist(cpulist) if cpulist is not None else ()
        except ValueError:
            cpus = ()
        mem = meminfo(base + "/meminfo", prefix=f"Node {nid} ")
        dist_text = read_file(base + "/distance") or ""
        try:
            distances = tuple(int(d) for d in dist_text.split())
        except ValueError:
            distances = ()
        nodes.append(
            NumaNode(
                id=nid,
                cpus=cpus,
                memory_total_kib=mem.get("MemTotal", 0),
                memory_free_kib=mem.get("MemFree", 0),
                distances=distances,
                hugepages=hugepage_pools(base + "/hugepages"),
            )
        )
    return nodes


def midr_from_cpuinfo(cpuinfo: dict[str, str]) -> int | None:
    """Rebuild a MIDR from cpuinfo's fields for trees/kernels without regs/identification."""
    try:
        return _midr.join_midr(
            int(cpuinfo["CPU implementer"], 16),
            int(cpuinfo["CPU variant"], 16),
            0xF,  # cpuinfo always prints "8"; ARMv8+ cores put 0xF (see ID regs) in MIDR
            int(cpuinfo["CPU part"], 16),
            int(cpuinfo["CPU revision"], 0),
        )
    except (KeyError, ValueError):
        return None
