"""Turning the raw per-CPU records into the public HostTopology.

Separate from the readers because this is where the rules live that do not depend on which
reader ran (the package docstring lists them): arch and vendor detection, the die/cluster
defaults, node membership, the integer-average counts, the single-node fallback, cache
ordering and the hw_virt verdict. One assembler for both readers is what keeps their results
equal.
"""

from __future__ import annotations

import os

from cna_agent.host.topology import native as _native_bridge
from cna_agent.host.topology.hostfiles import (
    HUGEPAGES_DIR,
    cpuinfo_first_record,
    hugepage_pools,
    meminfo,
    midr_from_cpuinfo,
    numa_nodes,
)
from cna_agent.host.topology.model import (
    CacheInfo,
    CpuInfo,
    HostTopology,
    MidrInfo,
    NumaNode,
)
from cna_agent.host.topology.raw import CACHE_TYPE_NAMES, RawCache, RawCpu

__all__ = ["assemble"]

#: x86 kernels report this cluster_id when no cluster is known (BAD_APICID).
_X86_NO_CLUSTER = 0xFFFF

_KVM_MISC = "sys/devices/virtual/misc/kvm"


def _is_live(root: str) -> bool:
    return os.path.realpath(root) == "/"


def _hw_virt(root: str, arch: str, cpuinfo: dict[str, str], live: bool, native: bool) -> str:
    if arch == "x86_64":
        flags = set(cpuinfo.get("flags", "").split())
        feature = "vmx" if "vmx" in flags else "svm" if "svm" in flags else ""
        if feature and live and native and os.uname().machine == "x86_64":
            if not _native_bridge.cpuid_confirms(feature):
                return ""
        return feature
    if arch == "aarch64":
        return "arm-el2" if os.path.isdir(os.path.join(root, _KVM_MISC)) else ""
    return ""


def assemble(root: str, raw_cpus: list[RawCpu], raw_caches: list[RawCache], native: bool) -> HostTopology:
    """HostTopology from either reader's records plus the per-node and host-wide files."""
    live = _is_live(root)
    cpuinfo = cpuinfo_first_record(root)

    midr_raw = next((c.midr for c in raw_cpus if c.midr is not None and c.online), None)
    if midr_raw is None:
        midr_raw = next((c.midr for c in raw_cpus if c.midr is not None), None)
    if midr_raw is None and "CPU implementer" in cpuinfo:
        midr_raw = midr_from_cpuinfo(cpuinfo)
    midr = MidrInfo.from_raw(midr_raw) if midr_raw is not None else None

    if live:
        arch = os.uname().machine
    elif midr is not None:
        arch = "aarch64"
    elif "vendor_id" in cpuinfo or "flags" in cpuinfo:
        arch = "x86_64"
    else:
        arch = ""

    if arch == "aarch64" and midr is not None:
        vendor, model = midr.implementer_name, midr.part_name
    else:
        vendor, model = cpuinfo.get("vendor_id", ""), cpuinfo.get("model name", "")

    nodes = numa_nodes(root)
    online_ids = tuple(c.id for c in raw_cpus if c.online)
    node_of: dict[int, int] = {}
    if nodes is not None:
        for node in nodes:
            for cid in node.cpus:
                node_of.setdefault(cid, node.id)

    cpus = []
    for c in raw_cpus:
        cluster = c.cluster if c.cluster >= 0 and c.cluster != _X86_NO_CLUSTER else -1
        die = c.die if c.die >= 0 else (0 if c.package >= 0 else -1)
        cpus.append(
            CpuInfo(
                id=c.id,
                online=c.online,
                socket=c.package,
                die=die,
                cluster=cluster,
                core=c.core,
                node=node_of.get(c.id, -1) if nodes is not None else 0,
                thread_siblings=c.siblings,
            )
        )

    placed = [c for c in cpus if c.online and c.socket >= 0]
    sockets = {c.socket for c in placed}
    dies = {(c.socket, c.die) for c in placed}
    cores = {(c.socket, c.die, c.core) for c in placed}
    clusters = {(c.socket, c.die, c.cluster if c.cluster >= 0 else ("core", c.core)) for c in placed}

    def ratio(a: int, b: int) -> int:
        return a // b if b else 0

    host_mem = meminfo(os.path.join(root, "proc/meminfo"))
    host_pools = hugepage_pools(os.path.join(root, HUGEPAGES_DIR))
    if nodes is None:
        nodes = [
            NumaNode(
                id=0,
                cpus=online_ids,
                memory_total_kib=host_mem.get("MemTotal", 0),
                memory_free_kib=host_mem.get("MemFree", 0),
                distances=(10,),
                hugepages=host_pools,
            )
        ]
    memory_total = host_mem.get("MemTotal") or sum(n.memory_total_kib for n in nodes)

    caches = sorted(
        (CacheInfo(level=r.level, type=CACHE_TYPE_NAMES.get(r.type, "Other"), size_kib=r.size_kib, cpus=r.cpus)
         for r in raw_caches),
        key=lambda ci: (ci.level, ci.type != "Data", ci.type, ci.cpus[:1]),
    )

    return HostTopology(
        arch=arch,
        cpu_vendor=vendor,
        cpu_model=model,
        midr=midr,
        hw_virt=_hw_virt(root, arch, cpuinfo, live, native),
        sockets=len(sockets),
        dies_per_socket=ratio(len(dies), len(sockets)),
        clusters_per_die=ratio(len(clusters), len(dies)),
        cores_per_cluster=ratio(len(cores), len(clusters)),
        threads_per_core=ratio(len(placed), len(cores)),
        cpus=tuple(cpus),
        online_cpus=online_ids,
        numa_nodes=tuple(nodes),
        caches=tuple(caches),
        hugepages=host_pools,
        memory_total_kib=memory_total,
    )
