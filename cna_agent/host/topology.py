"""Host CPU/NUMA/cache/hugepage topology, read from sysfs and procfs under a root prefix.

This is what the placement planner pins guests against and what the node reports to the
VRM, so it must be exact on Kunpeng (clusters of 4 cores sharing an L3 tag partition, 2 dies
= 2 NUMA nodes per socket) and on Xeon FusionServers (SMT siblings numbered n and n+cores).

Two readers produce the same raw records, and one assembler turns them into
:class:`HostTopology`:

* ``cna_agent._native`` (C through cffi) walks the per-CPU files: thousands of tiny reads on
  big hosts, where Python's io stack dominates the cost. It also reads cpuid.
* a pure-Python twin that follows the same rules file by file, for hosts and CI where the
  extension is missing. Both are tested for equal results on every recorded tree.

Per-node and host-wide files (a handful) are read in Python on both paths.

Everything is under ``root`` so tests can point the probe at recorded trees
(tests/fixtures/sysfs/); ``root="/"`` reads the live host. The probe is blocking file I/O:
async callers run it in the host executor.

Rules where sysfs is silent or ambiguous (both readers apply them identically):

* CPUs: the ``possible`` list intersected with existing ``cpuN`` directories (VMs often
  declare hundreds of possible hot-plug slots); without ``possible``, the ``cpuN`` dirs.
  Online: the ``online`` list; without it every present CPU counts as online.
* ``die_id`` is absent on arm64 and before Linux 5.3: one die per socket (die 0).
  ``cluster_id`` is absent before 5.16 and reads -1 (arm64) or 65535 (x86) when firmware
  describes no cluster: the CPU's cluster is reported as -1 and every core counts as its
  own cluster. Offline CPUs have no topology directory: ids -1, no siblings.
* Counts (sockets, dies_per_socket, ...) come from online CPUs only and are integer
  averages, exact on the symmetric servers we target.
* No ``/sys/devices/system/node``: one node 0 holding all online CPUs and the host memory.
* Caches: one :class:`CacheInfo` per cache instance, reported by the lowest CPU it covers.
* ``hw_virt`` on x86: ``vmx``/``svm`` from the cpuinfo flags (the kernel clears them when
  firmware disabled VT-x/AMD-V, so they mean "usable"); on the live host with the native
  module, cpuid must confirm them as well. On aarch64: ``arm-el2`` when
  ``sys/devices/virtual/misc/kvm`` exists. The KVM misc device registers only after KVM
  initialised, which on arm64 requires the kernel to have been entered at EL2; cpuinfo's
  ``Features`` line is deliberately *not* used, since it lists EL0 hwcaps and is present on
  any arm64 guest that cannot host VMs.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import re
from dataclasses import dataclass
from typing import Any, Iterable

from cna_agent.host import midr as _midr
# MAX_CPUS mirrors CNA_TOPO_MAX_CPUS in native/topology.h; the parser is shared agent-wide.
from cna_agent.host.cpulist import MAX_CPUS, parse_cpulist

__all__ = [
    "MAX_CPUS",
    "CacheInfo",
    "CpuInfo",
    "HostTopology",
    "HugePagePool",
    "MidrInfo",
    "NumaNode",
    "native_available",
    "parse_cpulist",
    "probe_topology",
]

_MAX_CACHE_INDEX = 16
#: x86 kernels report this cluster_id when no cluster is known (BAD_APICID).
_X86_NO_CLUSTER = 0xFFFF

_CACHE_TYPES = {"Data": 1, "Instruction": 2, "Unified": 3}
_CACHE_TYPE_NAMES = {0: "Other", 1: "Data", 2: "Instruction", 3: "Unified"}

_CPU_DIR = "sys/devices/system/cpu"
_NODE_DIR = "sys/devices/system/node"
_HUGEPAGES_DIR = "sys/kernel/mm/hugepages"
_KVM_MISC = "sys/devices/virtual/misc/kvm"


# --------------------------------------------------------------------------- public data


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


# --------------------------------------------------------------------------- raw records


@dataclass(slots=True)
class _RawCpu:
    id: int
    online: bool
    package: int
    die: int
    cluster: int
    core: int
    siblings: tuple[int, ...]
    midr: int | None


@dataclass(slots=True)
class _RawCache:
    level: int
    type: int
    size_kib: int
    cpus: tuple[int, ...]


# --------------------------------------------------------------------------- helpers


def _read(path: str) -> str | None:
    """Whole small file as text, None when unreadable (missing files are normal in sysfs)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        chunks = []
        while True:
            chunk = os.read(fd, 65536)
            chunks.append(chunk)
            # A short read is EOF for sysfs attributes (one show() buffer) and regular
            # files; stopping there saves a syscall per file (same rule as the C reader).
            if len(chunk) < 65536:
                break
    except OSError:
        return None
    finally:
        os.close(fd)
    return b"".join(chunks).decode("ascii", "replace")


def _read_head(path: str, limit: int) -> str | None:
    """First ``limit`` bytes: /proc/cpuinfo is generated per CPU (slowly on x86, where each
    record samples the clock), and only the first record is needed."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return os.read(fd, limit).decode("utf-8", "replace")
    except OSError:
        return None
    finally:
        os.close(fd)


def _read_id(path: str) -> int:
    text = _read(path)
    if text is None:
        return -1
    try:
        value = int(text)
    except ValueError:
        return -1
    return value if -(2**31) <= value < 2**31 else -1


def _read_int(path: str) -> int | None:
    text = _read(path)
    if text is None:
        return None
    try:
        return int(text)
    except ValueError:
        return None


def _parse_size_kib(text: str) -> int:
    match = re.fullmatch(r"\s*(\d+)([KMG]?)\s*", text)
    if not match:
        return -1
    value = int(match.group(1))
    return {"": value // 1024, "K": value, "M": value * 1024, "G": value * 1024 * 1024}[match.group(2)]


def _is_live(root: str) -> bool:
    return os.path.realpath(root) == "/"


# --------------------------------------------------------------------------- readers


def _scan_python(root: str) -> tuple[list[_RawCpu], list[_RawCache]]:
    """Pure-Python twin of cna_topo_scan() in native/topology.c: same files, same rules."""
    cpudir = os.path.join(root, _CPU_DIR)
    if not os.path.isdir(cpudir):
        raise FileNotFoundError(errno.ENOENT, "no CPU sysfs directory", cpudir)
    try:
        text = _read(cpudir + "/possible")
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
        online_text = _read(cpudir + "/online")
        online = set(parse_cpulist(online_text)) if online_text is not None else None
    except ValueError as exc:
        raise OSError(errno.EINVAL, str(exc), cpudir) from exc

    cpus: list[_RawCpu] = []
    caches: list[_RawCache] = []
    covered: dict[tuple[int, int], set[int]] = {}
    for cid in possible:
        base = f"{cpudir}/cpu{cid}"
        if not os.path.isdir(base):
            continue
        topo = base + "/topology/"
        sib_text = _read(topo + "thread_siblings_list")
        siblings: tuple[int, ...] = ()
        if sib_text is not None:
            try:
                siblings = parse_cpulist(sib_text)
            except ValueError:
                siblings = ()
        midr = None
        midr_text = _read(base + "/regs/identification/midr_el1")
        if midr_text is not None:
            try:
                midr = int(midr_text, 16)
            except ValueError:
                midr = None
        cpus.append(
            _RawCpu(
                id=cid,
                online=(cid in online) if online is not None else True,
                package=_read_id(topo + "physical_package_id"),
                die=_read_id(topo + "die_id"),
                cluster=_read_id(topo + "cluster_id"),
                core=_read_id(topo + "core_id"),
                siblings=siblings,
                midr=midr,
            )
        )
        for k in range(_MAX_CACHE_INDEX):
            index = f"{base}/cache/index{k}/"
            level = _read_int(index + "level")
            if level is None:
                break  # indexes are dense; the first gap ends the list
            type_text = _read(index + "type")
            if type_text is None:
                continue
            ctype = _CACHE_TYPES.get(type_text.rstrip(), 0)
            key = (level & 7, ctype)
            seen = covered.setdefault(key, set())
            if cid in seen:
                continue  # already reported by a lower CPU sharing it
            size_text = _read(index + "size")
            size = _parse_size_kib(size_text) if size_text is not None else -1
            shared_text = _read(index + "shared_cpu_list")
            try:
                shared = parse_cpulist(shared_text) if shared_text is not None else (cid,)
            except ValueError:
                shared = (cid,)
            seen.update(shared)
            caches.append(_RawCache(level=level, type=ctype, size_kib=size, cpus=shared))
    return cpus, caches


# Buffer sizes that fitted last time; the C reports exact needs, so at most one retry.
_native_caps = [256, 256 * 8, 256 * 40]


def _scan_native(root: str) -> tuple[list[_RawCpu], list[_RawCache]]:
    """Run cna_topo_scan() and copy its plain-data output into the shared raw records."""
    from cna_agent._native import ffi, lib  # ImportError when the extension is missing

    root_b = os.fsencode(root)
    for _attempt in range(3):
        cpus_cap, caches_cap, ints_cap = _native_caps
        buf = ffi.new("struct cna_topo_buf *")
        cpus_arr = ffi.new("struct cna_cpu_raw[]", cpus_cap)
        caches_arr = ffi.new("struct cna_cache_raw[]", caches_cap)
        ints_arr = ffi.new("int32_t[]", ints_cap)
        buf.cpus, buf.cpus_cap = cpus_arr, cpus_cap
        buf.caches, buf.caches_cap = caches_arr, caches_cap
        buf.ints, buf.ints_cap = ints_arr, ints_cap
        rc = lib.cna_topo_scan(root_b, buf)
        if rc == -errno.E2BIG:
            _native_caps[:] = [max(1, buf.n_cpus), max(1, buf.n_caches), max(1, buf.n_ints)]
            continue
        if rc < 0:
            raise OSError(-rc, f"native topology scan failed: {os.strerror(-rc)}", root)
        break
    else:  # the tree changed size between attempts (CPU hot-plug); give up loudly
        raise OSError(errno.EAGAIN, "topology kept changing during the scan", root)

    ints = ffi.unpack(ints_arr, buf.n_ints)
    cpus = []
    for i in range(buf.n_cpus):
        c = cpus_arr[i]
        off = c.sib_off
        cpus.append(
            _RawCpu(
                id=c.id,
                online=bool(c.online),
                package=c.package,
                die=c.die,
                cluster=c.cluster,
                core=c.core,
                siblings=tuple(ints[off : off + c.sib_len]),
                midr=c.midr if c.has_midr else None,
            )
        )
    caches = []
    for i in range(buf.n_caches):
        ca = caches_arr[i]
        off = ca.cpus_off
        caches.append(
            _RawCache(level=ca.level, type=ca.type, size_kib=ca.size_kib, cpus=tuple(ints[off : off + ca.cpus_len]))
        )
    return cpus, caches


def _native_cpuid_confirms(feature: str) -> bool:
    """Does cpuid on this CPU report the virtualization extension cpuinfo claims?"""
    from cna_agent._native import ffi, lib

    regs = ffi.new("uint32_t[4]")
    if feature == "vmx":
        return lib.cna_cpuid(1, 0, regs) == 0 and bool(regs[2] & (1 << 5))  # CPUID.1:ECX.VMX
    if feature == "svm":
        return lib.cna_cpuid(0x80000001, 0, regs) == 0 and bool(regs[2] & (1 << 2))  # ECX.SVM
    return False


_native_ok: bool | None = None


def native_available() -> bool:
    """True when cna_agent._native imports (built wheel or in-place developer build)."""
    global _native_ok
    if _native_ok is None:
        try:
            from cna_agent._native import ffi, lib  # noqa: F401
        except ImportError:
            _native_ok = False
        else:
            _native_ok = True
    return _native_ok


# --------------------------------------------------------------------------- assembly


def _cpuinfo_first_record(root: str) -> dict[str, str]:
    """Key/value pairs of the first processor record (plus any header before it)."""
    text = _read_head(os.path.join(root, "proc/cpuinfo"), 32768)
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


def _meminfo(path: str, prefix: str = "") -> dict[str, int]:
    """"MemTotal: 123 kB" (or "Node 0 MemTotal: 123 kB") lines -> {"MemTotal": 123}."""
    text = _read(path)
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


_HUGE_RE = re.compile(r"hugepages-(\d+)kB")


def _hugepage_pools(directory: str) -> tuple[HugePagePool, ...]:
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
                total=_read_int(base + "/nr_hugepages") or 0,
                free=_read_int(base + "/free_hugepages") or 0,
            )
        )
    return tuple(sorted(pools, key=lambda p: p.size_kib))


def _numa_nodes(root: str) -> list[NumaNode] | None:
    """Nodes from sysfs, or None when the kernel has no NUMA sysfs at all."""
    node_dir = os.path.join(root, _NODE_DIR)
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
        cpulist = _read(base + "/cpulist")
        try:
            cpus = parse_cpulist(cpulist) if cpulist is not None else ()
        except ValueError:
            cpus = ()
        mem = _meminfo(base + "/meminfo", prefix=f"Node {nid} ")
        dist_text = _read(base + "/distance") or ""
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
                hugepages=_hugepage_pools(base + "/hugepages"),
            )
        )
    return nodes


def _hw_virt(root: str, arch: str, cpuinfo: dict[str, str], live: bool, native: bool) -> str:
    if arch == "x86_64":
        flags = set(cpuinfo.get("flags", "").split())
        feature = "vmx" if "vmx" in flags else "svm" if "svm" in flags else ""
        if feature and live and native and os.uname().machine == "x86_64":
            if not _native_cpuid_confirms(feature):
                return ""
        return feature
    if arch == "aarch64":
        return "arm-el2" if os.path.isdir(os.path.join(root, _KVM_MISC)) else ""
    return ""


def _midr_from_cpuinfo(cpuinfo: dict[str, str]) -> int | None:
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


def _assemble(root: str, raw_cpus: list[_RawCpu], raw_caches: list[_RawCache], native: bool) -> HostTopology:
    live = _is_live(root)
    cpuinfo = _cpuinfo_first_record(root)

    midr_raw = next((c.midr for c in raw_cpus if c.midr is not None and c.online), None)
    if midr_raw is None:
        midr_raw = next((c.midr for c in raw_cpus if c.midr is not None), None)
    if midr_raw is None and "CPU implementer" in cpuinfo:
        midr_raw = _midr_from_cpuinfo(cpuinfo)
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

    nodes = _numa_nodes(root)
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

    host_mem = _meminfo(os.path.join(root, "proc/meminfo"))
    host_pools = _hugepage_pools(os.path.join(root, _HUGEPAGES_DIR))
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
        (CacheInfo(level=r.level, type=_CACHE_TYPE_NAMES.get(r.type, "Other"), size_kib=r.size_kib, cpus=r.cpus)
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


def probe_topology(root: str = "/", *, use_native: bool | None = None) -> HostTopology:
    """Read the host topology under ``root``.

    ``use_native``: None picks the C reader when ``cna_agent._native`` imports and the
    Python twin otherwise; True insists on C (ImportError when it is missing, so a broken
    wheel is noticed); False forces Python (tests, comparisons, benchmarks).
    Raises OSError when ``root`` has no CPU sysfs at all or a CPU list is malformed.
    """
    native = native_available() if use_native is None else use_native
    if native:
        raw_cpus, raw_caches = _scan_native(root)
    else:
        raw_cpus, raw_caches = _scan_python(root)
    return _assemble(root, raw_cpus, raw_caches, native)
