"""The bridge to cna_agent._native: run the C topology scan and cpuid, copy out plain data.

Separate because it is the only topology code that touches cffi objects: it sizes the
caller-owned buffers native/topology.h asks for, retries once with the exact sizes the C
reports, and copies every record into the shared raw dataclasses so nothing points into C
memory after the call. ``cna_agent._native`` is imported inside each function, so importing
this module never fails on a host without the extension; calling it then raises ImportError.
"""

from __future__ import annotations

import errno
import os

from cna_agent.host.topology.raw import RawCache, RawCpu

__all__ = ["buffer_caps", "cpuid_confirms", "scan_native"]

#: Buffer sizes (CPUs, caches, ints) that fitted last time; the C reports exact needs, so at
#: most one retry. Updated in place: the package re-exports this very list as ``_native_caps``.
buffer_caps = [256, 256 * 8, 256 * 40]


def scan_native(root: str) -> tuple[list[RawCpu], list[RawCache]]:
    """Run cna_topo_scan() and copy its plain-data output into the shared raw records."""
    from cna_agent._native import ffi, lib  # ImportError when the extension is missing

    root_b = os.fsencode(root)
    for _attempt in range(3):
        cpus_cap, caches_cap, ints_cap = buffer_caps
        buf = ffi.new("struct cna_topo_buf *")
        cpus_arr = ffi.new("struct cna_cpu_raw[]", cpus_cap)
        caches_arr = ffi.new("struct cna_cache_raw[]", caches_cap)
        ints_arr = ffi.new("int32_t[]", ints_cap)
        buf.cpus, buf.cpus_cap = cpus_arr, cpus_cap
        buf.caches, buf.caches_cap = caches_arr, caches_cap
        buf.ints, buf.ints_cap = ints_arr, ints_cap
        rc = lib.cna_topo_scan(root_b, buf)
        if rc == -errno.E2BIG:
            buffer_caps[:] = [max(1, buf.n_cpus), max(1, buf.n_caches), max(1, buf.n_ints)]
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
            RawCpu(
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
            RawCache(level=ca.level, type=ca.type, size_kib=ca.size_kib, cpus=tuple(ints[off : off + ca.cpus_len]))
        )
    return cpus, caches


def cpuid_confirms(feature: str) -> bool:
    """Does cpuid on this CPU report the virtualization extension cpuinfo claims?"""
    from cna_agent._native import ffi, lib

    regs = ffi.new("uint32_t[4]")
    if feature == "vmx":
        return lib.cna_cpuid(1, 0, regs) == 0 and bool(regs[2] & (1 << 5))  # CPUID.1:ECX.VMX
    if feature == "svm":
        return lib.cna_cpuid(0x80000001, 0, regs) == 0 and bool(regs[2] & (1 << 2))  # ECX.SVM
    return False
