"""Host CPU/NUMA/cache/hugepage topology, read from sysfs and procfs under a root prefix.

This is what the placement planner pins guests against and what the node reports to the
VRM, so it must be exact on Kunpeng (clusters of 4 cores sharing an L3 tag partition, 2 dies
= 2 NUMA nodes per socket) and on Xeon FusionServers (SMT siblings numbered n and n+cores).

Two readers produce the same raw records (raw.py), and one assembler (assemble.py) turns
them into :class:`HostTopology` (model.py):

* ``cna_agent._native`` (C through cffi) walks the per-CPU files: thousands of tiny reads on
  big hosts, where Python's io stack dominates the cost. It also reads cpuid (native.py is
  the bridge).
* a pure-Python twin that follows the same rules file by file, for hosts and CI where the
  extension is missing (pyscan.py). Both are tested for equal results on every recorded tree.

Per-node and host-wide files (a handful) are read in Python on both paths (hostfiles.py,
through the small-file reads in sysfs_io.py). This module only picks the reader and
re-exports the public names, so ``from cna_agent.host.topology import ...`` is the one
import callers need.

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

# MAX_CPUS mirrors CNA_TOPO_MAX_CPUS in native/topology.h; the parser is shared agent-wide.
from cna_agent.host.cpulist import MAX_CPUS, parse_cpulist
from cna_agent.host.topology.assemble import assemble
from cna_agent.host.topology.model import (
    CacheInfo,
    CpuInfo,
    HostTopology,
    HugePagePool,
    MidrInfo,
    NumaNode,
)

# The same list object the native reader updates in place; tests and benchmarks read and
# reset it through this name.
from cna_agent.host.topology.native import buffer_caps as _native_caps  # noqa: F401
from cna_agent.host.topology.native import scan_native
from cna_agent.host.topology.pyscan import scan_python

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

#: Cached answer of native_available(); tests and benchmarks reset it to None after building
#: the extension in place, so it lives here, next to the function that reads it.
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


def probe_topology(root: str = "/", *, use_native: bool | None = None) -> HostTopology:
    """Read the host topology under ``root``.

    ``use_native``: None picks the C reader when ``cna_agent._native`` imports and the
    Python twin otherwise; True insists on C (ImportError when it is missing, so a broken
    wheel is noticed); False forces Python (tests, comparisons, benchmarks).
    Raises OSError when ``root`` has no CPU sysfs at all or a CPU list is malformed.
    """
    native = native_available() if use_native is None else use_native
    if native:
        raw_cpus, raw_caches = scan_native(root)
    else:
        raw_cpus, raw_caches = scan_python(root)
    return assemble(root, raw_cpus, raw_caches, native)
