"""Where a process's threads may run, where they last ran, and where its memory really is.

This is the hot path behind live re-pinning (after a dedicated VM shrinks the shared pool,
or CPUs are taken offline or isolated), the drift check and ``cna-ctl host placement``:
thousands of thread ids across hundreds of QEMU processes, each needing a
``sched_setaffinity``/``sched_getaffinity`` or a ``/proc`` read.

Two implementations with the same results on the same processes:

* ``cna_agent._native`` (native/affinity.c through cffi): one call per batch, masks passed as
  raw bytes, per-thread errors in an errno array;
* a pure-Python twin (``os.sched_setaffinity`` per thread, ``/proc`` parsed in Python) for
  hosts and CI where the extension is missing, and as the benchmark's baseline.

Every function takes ``use_native``: None picks C when the extension has these symbols,
True insists (ImportError/AttributeError when missing, so a broken wheel is noticed), False
forces Python. Threads and processes that exit mid-call are normal (QEMU starts and stops
helper threads all the time): they are reported per item, never raised.

Sources, and why not libvirt's view: ``virDomainGetVcpuPinInfo`` returns what libvirt
*configured*, not what the kernel enforces; the drift check must see the kernel's view
(``sched_getaffinity``, ``/proc/<pid>/task/<tid>/stat`` field 39, ``/proc/<pid>/numa_maps``).
"""

from __future__ import annotations

import errno
import os
import sys
from dataclasses import dataclass
from typing import Iterable, Mapping

from cna_agent.host.cpulist import MAX_CPUS, format_cpulist, parse_cpulist

__all__ = [
    "MAX_NODES",
    "ThreadStat",
    "get_affinity",
    "list_threads",
    "native_available",
    "numa_memory_kib",
    "pin_processes",
    "repin_threads",
    "set_affinity",
    "thread_stats",
]

#: Mirrors CNA_AFF_MAX_NODES in native/affinity.h.
MAX_NODES = 1024
#: Bytes of a mask big enough for any CPU id the agent handles (MAX_CPUS bits); the kernel
#: refuses sched_getaffinity buffers smaller than its nr_cpu_ids.
_GET_MASK_BYTES = MAX_CPUS // 8
_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


@dataclass(frozen=True, slots=True)
class ThreadStat:
    """One thread as the kernel accounts it (``/proc/<pid>/task/<tid>/stat``)."""

    tid: int
    comm: str
    state: str
    utime_ticks: int
    stime_ticks: int
    #: The CPU it last ran on (field 39, "processor").
    last_cpu: int

    @property
    def cpu_seconds(self) -> float:
        return (self.utime_ticks + self.stime_ticks) / _CLK_TCK


# --------------------------------------------------------------------------- helpers


def native_available() -> bool:
    """True when the extension is importable and was built with affinity.c."""
    try:
        from cna_agent._native import lib
    except ImportError:
        return False
    return hasattr(lib, "cna_aff_set")


def _use_native(flag: bool | None) -> bool:
    return native_available() if flag is None else flag


def _check_cpus(cpus: Iterable[int], what: str) -> tuple[int, ...]:
    out = tuple(sorted(set(cpus)))
    if not out:
        raise ValueError(f"{what}: empty CPU set (a thread must be allowed somewhere)")
    if out[0] < 0 or out[-1] >= MAX_CPUS:
        raise ValueError(f"{what}: CPU ids must be in 0..{MAX_CPUS - 1}, got {out[0]}..{out[-1]}")
    return out


def _mask_bytes(max_cpu: int) -> int:
    """Smallest mask (whole 64-bit words, as cpu_set_t is an array of unsigned long)."""
    return ((max_cpu // 64) + 1) * 8


def _to_mask(cpus: Iterable[int], nbytes: int) -> bytes:
    bits = 0
    for c in cpus:
        bits |= 1 << c
    words = nbytes // 8
    return b"".join(((bits >> (64 * w)) & 0xFFFFFFFFFFFFFFFF).to_bytes(8, sys.byteorder) for w in range(words))


def _from_mask(raw: bytes) -> tuple[int, ...]:
    out = []
    for w in range(len(raw) // 8):
        word = int.from_bytes(raw[8 * w : 8 * w + 8], sys.byteorder)
        while word:
            low = word & -word
            out.append(64 * w + low.bit_length() - 1)
            word ^= low
    return tuple(out)


def _check_ids(ids: Iterable[int], what: str) -> list[int]:
    out = [int(i) for i in ids]
    for i in out:
        if not 0 < i < 2**31:
            raise ValueError(f"{what}: {i} is not a valid process/thread id")
    return out


# --------------------------------------------------------------------------- threads


def list_threads(pids: Iterable[int], *, use_native: bool | None = None) -> dict[int, tuple[int, ...]]:
    """{pid: sorted thread ids} from /proc/<pid>/task; processes that are gone are left out."""
    plist = _check_ids(pids, "pids")
    if not plist:
        return {}
    if not _use_native(use_native):
        out: dict[int, tuple[int, ...]] = {}
        for pid in plist:
            try:
                names = os.listdir(f"/proc/{pid}/task")
            except OSError:
                continue
            out[pid] = tuple(sorted(int(n) for n in names if n.isdigit()))
        return out
    from cna_agent._native import ffi, lib

    pids_c = ffi.new("int32_t[]", plist)
    errs = ffi.new("int32_t[]", len(plist))
    n_out = ffi.new("int32_t *")
    cap = max(16, 64 * len(plist))
    for _attempt in range(4):
        tids = ffi.new("int32_t[]", cap)
        owner = ffi.new("int32_t[]", cap)
        rc = lib.cna_aff_list_tasks(pids_c, len(plist), tids, owner, cap, n_out, errs)
        if rc == -errno.E2BIG:
            cap = n_out[0] + 64  # threads may appear between the two calls
            continue
        if rc < 0:
            raise OSError(-rc, os.strerror(-rc))
        break
    else:
        raise OSError(errno.EAGAIN, "thread lists kept growing during the scan")
    groups: dict[int, list[int]] = {}
    for k in range(n_out[0]):
        groups.setdefault(plist[owner[k]], []).append(tids[k])
    return {pid: tuple(sorted(groups.get(pid, ()))) for i, pid in enumerate(plist) if errs[i] == 0}


def set_affinity(assignments: Mapping[int, Iterable[int]], *, use_native: bool | None = None) -> dict[int, int]:
    """Pin each thread id to its CPU set; returns {tid: errno} for the threads that failed.

    Validated before anything changes (ValueError naming the thread): an empty set or a CPU
    id out of range would otherwise leave a batch half applied.
    """
    items = [(tid, _check_cpus(cpus, f"thread {tid}")) for tid, cpus in assignments.items()]
    _check_ids((t for t, _ in items), "thread ids")
    if not items:
        return {}
    if not _use_native(use_native):
        failed: dict[int, int] = {}
        for tid, cpus in items:
            try:
                os.sched_setaffinity(tid, cpus)
            except OSError as exc:
                failed[tid] = exc.errno or errno.EIO
        return failed
    from cna_agent._native import ffi, lib

    nbytes = _mask_bytes(max(c[-1] for _, c in items))
    index: dict[tuple[int, ...], int] = {}
    for _, cpus in items:
        index.setdefault(cpus, len(index))
    masks = b"".join(_to_mask(cpus, nbytes) for cpus in index)  # dict order = index order
    tids = ffi.new("int32_t[]", [t for t, _ in items])
    idx = ffi.new("int32_t[]", [index[c] for _, c in items])
    errs = ffi.new("int32_t[]", len(items))
    rc = lib.cna_aff_set(tids, len(items), ffi.from_buffer("uint8_t[]", masks), len(index), nbytes, idx, errs)
    if rc < 0:
        raise OSError(-rc, f"batch affinity refused: {os.strerror(-rc)}")
    return {items[k][0]: errs[k] for k in range(len(items)) if errs[k]}


def get_affinity(tids: Iterable[int], *, use_native: bool | None = None) -> dict[int, tuple[int, ...]]:
    """{tid: CPUs the kernel lets it run on}; threads that are gone are left out."""
    tlist = _check_ids(tids, "thread ids")
    if not tlist:
        return {}
    if not _use_native(use_native):
        out: dict[int, tuple[int, ...]] = {}
        for tid in tlist:
            try:
                out[tid] = tuple(sorted(os.sched_getaffinity(tid)))
            except OSError:
                continue
        return out
    from cna_agent._native import ffi, lib

    buf = ffi.new("uint8_t[]", len(tlist) * _GET_MASK_BYTES)
    errs = ffi.new("int32_t[]", len(tlist))
    rc = lib.cna_aff_get(ffi.new("int32_t[]", tlist), len(tlist), buf, _GET_MASK_BYTES, errs)
    if rc < 0:
        raise OSError(-rc, os.strerror(-rc))
    raw = ffi.buffer(buf)[:]
    return {tid: _from_mask(raw[k * _GET_MASK_BYTES : (k + 1) * _GET_MASK_BYTES])
            for k, tid in enumerate(tlist) if errs[k] == 0}


def pin_processes(pins: Mapping[int, Iterable[int]], *, use_native: bool | None = None) -> tuple[int, dict[int, int]]:
    """Pin every thread of each pid to that pid's CPU set.

    Native: ONE call lists /proc/<pid>/task of every process and pins each thread as it is
    listed (no per-thread Python at all). Python: os.listdir + os.sched_setaffinity per thread.
    Returns (threads pinned, {tid: errno} of threads that failed, e.g. exited meanwhile).
    Processes that are gone are skipped.
    """
    cpus_of = {pid: _check_cpus(cpus, f"process {pid}") for pid, cpus in pins.items()}
    _check_ids(cpus_of, "pids")
    if not cpus_of:
        return 0, {}
    if not _use_native(use_native):
        threads = list_threads(cpus_of, use_native=False)
        assignments = {tid: cpus_of[pid] for pid, tids in threads.items() for tid in tids}
        failed = set_affinity(assignments, use_native=False)
        return len(assignments) - len(failed), failed
    from cna_agent._native import ffi, lib

    pids = list(cpus_of)
    nbytes = _mask_bytes(max(c[-1] for c in cpus_of.values()))
    index: dict[tuple[int, ...], int] = {}
    for cpus in cpus_of.values():
        index.setdefault(cpus, len(index))
    masks = b"".join(_to_mask(cpus, nbytes) for cpus in index)
    n = len(pids)
    cap = 64 * n + 64
    done = ffi.new("int32_t[]", n)
    pid_errs = ffi.new("int32_t[]", n)
    failed_tids = ffi.new("int32_t[]", cap)
    failed_errs = ffi.new("int32_t[]", cap)
    n_failed = ffi.new("int32_t *")
    rc = lib.cna_aff_pin_tasks(ffi.new("int32_t[]", pids), n, ffi.from_buffer("uint8_t[]", masks), len(index), nbytes,
                               ffi.new("int32_t[]", [index[cpus_of[p]] for p in pids]), done, pid_errs,
                               failed_tids, failed_errs, cap, n_failed)
    if rc < 0:
        raise OSError(-rc, f"batch re-pin refused: {os.strerror(-rc)}")
    if n_failed[0] > cap:  # too many failures to list: the per-thread path names each one
        return pin_processes(pins, use_native=False)
    return rc, {failed_tids[k]: failed_errs[k] for k in range(n_failed[0])}


# --------------------------------------------------------------------------- cgroup cpusets


def _cgroup_mounts() -> tuple[str | None, str | None]:
    """(cgroup v1 cpuset mount point, cgroup2 mount point) from /proc/self/mountinfo."""
    v1 = v2 = None
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                fields, rfields = left.split(), right.split()
                if len(fields) < 5 or len(rfields) < 3:
                    continue
                if rfields[0] == "cgroup" and "cpuset" in rfields[2].split(","):
                    v1 = v1 or fields[4]
                elif rfields[0] == "cgroup2":
                    v2 = v2 or fields[4]
    except OSError:
        pass
    return v1, v2


def cpuset_dir(pid: int, tid: int) -> str | None:
    """The cpuset cgroup directory a thread is in, or None (no cpuset controller / root)."""
    try:
        with open(f"/proc/{pid}/task/{tid}/cgroup", encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    v1, v2 = _cgroup_mounts()
    for line in lines:
        _hid, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if v1 and "cpuset" in controllers.split(","):
            return os.path.join(v1, path.lstrip("/")) if path not in ("", "/") else None
    for line in lines:
        if line.startswith("0::") and v2:
            path = line[3:]
            d = os.path.join(v2, path.lstrip("/"))
            if path not in ("", "/") and os.path.exists(os.path.join(d, "cpuset.cpus")):
                return d
    return None


def _read_cpuset(d: str) -> tuple[int, ...]:
    with open(os.path.join(d, "cpuset.cpus"), encoding="ascii") as f:
        return parse_cpulist(f.read())


def _widen_cpuset(d: str, cpus: tuple[int, ...], root: str) -> None:
    """Make cgroup ``d`` allow exactly ``cpus``, widening ancestors below ``root`` first
    (a v1 child's cpus must be a subset of its parent's). Ancestors only ever grow."""
    parent = os.path.dirname(d)
    if parent != root and parent.startswith(root + "/"):
        have = _read_cpuset(parent)
        if not set(cpus) <= set(have):
            _widen_cpuset(parent, tuple(sorted(set(have) | set(cpus))), root)
    with open(os.path.join(d, "cpuset.cpus"), "w", encoding="ascii") as f:
        f.write(format_cpulist(cpus))


def repin_threads(pid: int, assignments: Mapping[int, Iterable[int]], *, use_native: bool | None = None) -> dict[int, int]:
    """Live re-pin of a (QEMU) process's threads, also where cgroups confine them.

    The fast path is one native batch. libvirt puts each vCPU, I/O thread and the emulator
    threads of a guest in their own cpuset cgroup (…/vcpu0, …/emulator), and the kernel
    refuses (EINVAL) an affinity outside a thread's cpuset. For those threads the cgroup's
    cpuset.cpus is rewritten to the union of its threads' targets (as libvirt does for
    ``virsh vcpupin --live``; the cgroup's other tasks follow it, which is right because
    libvirt groups threads by role) and the batch is retried. Returns {tid: errno} failures.
    """
    wanted = {tid: _check_cpus(cpus, f"thread {tid}") for tid, cpus in assignments.items()}
    failed = set_affinity(wanted, use_native=use_native)
    confined = [tid for tid, err in failed.items() if err == errno.EINVAL]
    if not confined:
        return failed
    by_dir: dict[str, set[int]] = {}
    for tid in confined:
        d = cpuset_dir(pid, tid)
        if d is not None:
            by_dir.setdefault(d, set()).update(wanted[tid])
    v1, v2 = _cgroup_mounts()
    for d, cpus in by_dir.items():
        root = v1 if v1 and d.startswith(v1 + "/") else v2 or "/"
        try:
            _widen_cpuset(d, tuple(sorted(cpus)), root)
        except OSError:
            continue  # the retry below reports the thread's errno
    retried = set_affinity({tid: wanted[tid] for tid in confined}, use_native=use_native)
    return {tid: err for tid, err in failed.items() if tid not in confined} | retried


# --------------------------------------------------------------------------- /proc stats


def _parse_stat(raw: bytes) -> tuple[str, str, int, int, int] | None:
    """(comm, state, utime, stime, processor) from a stat line; None if unparsable.

    comm may contain ')' and spaces, so it ends at the *last* ')' (as in the C reader), and
    is cut to 15 bytes before decoding, as the C struct holds it.
    """
    open_p = raw.find(b"(")
    close_p = raw.rfind(b")")
    if open_p < 0 or close_p < open_p:
        return None
    fields = raw[close_p + 1 :].split(b"\n", 1)[0].split()
    # fields[0] is field 3 (state); field N is fields[N - 3].
    if len(fields) < 37:
        return None
    nums = [fields[i] for i in (11, 12, 36)]
    if not all(n.isdigit() and len(n) <= 18 for n in nums):
        return None
    utime, stime, cpu = (int(n) for n in nums)
    if cpu >= 2**31:
        return None
    comm = raw[open_p + 1 : close_p][:15].decode("utf-8", "replace")
    return comm, fields[0][:1].decode("ascii", "replace"), utime, stime, cpu


def thread_stats(pid: int, tids: Iterable[int] | None = None, *, use_native: bool | None = None) -> list[ThreadStat]:
    """Per-thread name, state, CPU time and last CPU of ``pid`` (all its threads by default).

    Threads that exited meanwhile are left out. ``comm`` names QEMU's vCPU threads
    ("CPU 0/KVM", "CPU 0/TCG": libvirt starts QEMU with debug-threads=on).
    """
    _check_ids([pid], "pid")
    if tids is None:
        tlist = list(list_threads([pid], use_native=use_native).get(pid, ()))
    else:
        tlist = _check_ids(tids, "thread ids")
    if not tlist:
        return []
    if not _use_native(use_native):
        out = []
        for tid in tlist:
            try:
                with open(f"/proc/{pid}/task/{tid}/stat", "rb") as f:
                    raw = f.read(1023)  # the C reader's buffer size
            except OSError:
                continue
            parsed = _parse_stat(raw)
            if parsed is not None:
                out.append(ThreadStat(tid, parsed[0], parsed[1], parsed[2], parsed[3], parsed[4]))
        return out
    from cna_agent._native import ffi, lib

    stats = ffi.new("struct cna_thread_stat[]", len(tlist))
    errs = ffi.new("int32_t[]", len(tlist))
    rc = lib.cna_aff_thread_stats(pid, ffi.new("int32_t[]", tlist), len(tlist), stats, errs)
    if rc < 0:
        raise OSError(-rc, os.strerror(-rc))
    out = []
    for k in range(len(tlist)):
        if errs[k]:
            continue
        s = stats[k]
        out.append(ThreadStat(
            tid=s.tid,
            comm=ffi.string(s.comm, 16).decode("utf-8", "replace"),
            state=s.state.decode("ascii", "replace"),
            utime_ticks=s.utime,
            stime_ticks=s.stime,
            last_cpu=s.last_cpu,
        ))
    return out


# --------------------------------------------------------------------------- NUMA memory


def _numa_line(line: str, kib: dict[int, int]) -> None:
    """Add one numa_maps line's N<node>=<pages> x kernelpagesize_kB to ``kib``.

    Parsed from the end: the file name may contain spaces (the kernel escapes only
    newlines), so " N0=5" inside a path must not count. A mapping with no resident pages
    has no kernelpagesize_kB field and contributes nothing.
    """
    tokens = line.rstrip("\n ").split(" ")
    if not tokens or not tokens[-1].startswith("kernelpagesize_kB="):
        return
    size = tokens[-1][len("kernelpagesize_kB="):]
    if not (size.isdigit() and size.isascii()) or len(size) > 18:
        return
    page_kib = int(size)
    for tok in reversed(tokens[:-1]):
        node_s, eq, pages_s = tok[1:].partition("=")
        if not (tok.startswith("N") and eq and node_s.isdigit() and node_s.isascii() and pages_s.isdigit()
                and pages_s.isascii() and len(node_s) <= 18 and len(pages_s) <= 18):
            return
        node = int(node_s)
        kib[node] = kib.get(node, 0) + int(pages_s) * page_kib


def numa_memory_kib(pid: int, *, use_native: bool | None = None) -> dict[int, int]:
    """{node: KiB of the process's resident memory on that node} from /proc/<pid>/numa_maps.

    Nodes with nothing resident are left out. Raises OSError when the process is gone or
    the kernel has no NUMA support (no numa_maps).
    """
    _check_ids([pid], "pid")
    if not _use_native(use_native):
        kib: dict[int, int] = {}
        with open(f"/proc/{pid}/numa_maps", "r", encoding="utf-8", errors="replace", newline="\n") as f:
            for line in f:
                _numa_line(line, kib)
        if any(n >= MAX_NODES for n in kib):
            raise OSError(errno.ERANGE, f"memory on NUMA nodes >= {MAX_NODES}", f"/proc/{pid}/numa_maps")
        return {n: v for n, v in sorted(kib.items()) if v}
    from cna_agent._native import ffi, lib

    arr = ffi.new("int64_t[]", MAX_NODES)
    overflow = ffi.new("int64_t *")
    rc = lib.cna_aff_numa_maps(pid, arr, MAX_NODES, overflow)
    if rc < 0:
        raise OSError(-rc, os.strerror(-rc), f"/proc/{pid}/numa_maps")
    if overflow[0]:
        raise OSError(errno.ERANGE, f"memory on NUMA nodes >= {MAX_NODES}", f"/proc/{pid}/numa_maps")
    return {n: arr[n] for n in range(MAX_NODES) if arr[n]}
