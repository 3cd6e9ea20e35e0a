"""cna_agent.host.affinity on real processes: the native batch calls and the pure-Python twin
against child processes this test spawns, checked from /proc (Cpus_allowed_list, task dirs),
never from the code under test's own view. No daemons."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from cna_agent.host import affinity as aff
from cna_agent.host.cpulist import parse_cpulist
from support.procs import Child, proc_allowed, proc_comm, proc_tids

NATIVE = [pytest.param(True, id="native"), pytest.param(False, id="python")]
CPUS = sorted(os.sched_getaffinity(0))

pytestmark = pytest.mark.skipif(not aff.native_available(), reason="cna_agent._native without affinity.c (rebuild: python native/build_native.py)")


@pytest.fixture
def child():
    c = Child()
    yield c
    c.close()


@pytest.mark.parametrize("native", NATIVE)
def test_list_threads_matches_proc_and_skips_gone_processes(child, native):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait(timeout=30)
    got = aff.list_threads([child.pid, dead.pid], use_native=native)
    assert got == {child.pid: proc_tids(child.pid)}
    assert set(child.workers) < set(got[child.pid]) and child.pid in got[child.pid]


@pytest.mark.skipif(len(CPUS) < 2, reason="needs 2 CPUs to see a pin move")
@pytest.mark.parametrize("native", NATIVE)
def test_set_affinity_pins_each_thread_as_asked_seen_in_proc_status(child, native):
    want = {tid: (CPUS[k % len(CPUS)],) for k, tid in enumerate(child.workers)}
    want[child.pid] = tuple(CPUS)
    assert aff.set_affinity(want, use_native=native) == {}
    for tid, cpus in want.items():
        assert proc_allowed(child.pid, tid) == cpus, tid
    # And back the other way (a live re-pin, not just a first pin).
    flipped = {tid: (CPUS[(k + 1) % len(CPUS)],) for k, tid in enumerate(child.workers)}
    assert aff.set_affinity(flipped, use_native=native) == {}
    assert {tid: proc_allowed(child.pid, tid) for tid in flipped} == flipped


@pytest.mark.parametrize("native", NATIVE)
def test_get_affinity_agrees_with_proc_status(child, native):
    if len(CPUS) > 1:
        os.sched_setaffinity(child.workers[0], {CPUS[-1]})
    got = aff.get_affinity(proc_tids(child.pid), use_native=native)
    assert got == {tid: proc_allowed(child.pid, tid) for tid in proc_tids(child.pid)}


@pytest.mark.parametrize("native", NATIVE)
def test_pin_processes_moves_every_thread_of_every_process(native):
    kids = [Child(threads=3) for _ in range(2)]
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait(timeout=30)
    try:
        target = {k.pid: (CPUS[i % len(CPUS)],) for i, k in enumerate(kids)}
        done, failed = aff.pin_processes({**target, dead.pid: CPUS[:1]}, use_native=native)  # a gone one is skipped
        assert failed == {}
        assert done == sum(len(proc_tids(k.pid)) for k in kids)
        for k in kids:
            assert {proc_allowed(k.pid, t) for t in proc_tids(k.pid)} == {target[k.pid]}
    finally:
        for k in kids:
            k.close()


@pytest.mark.parametrize("native", NATIVE)
def test_exited_thread_is_reported_per_item_and_the_rest_applied(child, native):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait(timeout=30)
    failed = aff.set_affinity({dead.pid: CPUS[:1], child.workers[0]: CPUS[-1:]}, use_native=native)
    assert failed == {dead.pid: errno.ESRCH}
    assert proc_allowed(child.pid, child.workers[0]) == tuple(CPUS[-1:])
    assert dead.pid not in aff.get_affinity([dead.pid], use_native=native)


@pytest.mark.parametrize("native", NATIVE)
def test_invalid_batches_change_nothing(child, native):
    before = {t: proc_allowed(child.pid, t) for t in child.workers}
    with pytest.raises(ValueError, match="empty CPU set"):
        aff.set_affinity({child.workers[0]: CPUS[:1], child.workers[1]: ()}, use_native=native)
    with pytest.raises(ValueError, match="CPU ids must be"):
        aff.set_affinity({child.workers[0]: CPUS[:1], child.workers[1]: (aff.MAX_CPUS,)}, use_native=native)
    with pytest.raises(ValueError, match="not a valid"):
        aff.set_affinity({-1: CPUS[:1]}, use_native=native)
    assert {t: proc_allowed(child.pid, t) for t in child.workers} == before


def test_native_set_refuses_an_out_of_range_mask_index_before_changing_anything(child):
    from cna_agent._native import ffi, lib

    before = proc_allowed(child.pid, child.workers[0])
    mask = ffi.new("uint8_t[]", 8)
    mask[0] = 1 << CPUS[0]
    tids = ffi.new("int32_t[]", child.workers[:2])
    errs = ffi.new("int32_t[]", 2)
    assert lib.cna_aff_set(tids, 2, mask, 1, 8, ffi.new("int32_t[]", [0, 1]), errs) == -errno.ERANGE
    assert lib.cna_aff_set(tids, 2, mask, 1, 7, ffi.new("int32_t[]", [0, 0]), errs) == -errno.EINVAL
    assert proc_allowed(child.pid, child.workers[0]) == before


def test_native_task_listing_reports_the_size_needed_when_the_buffer_is_small(child):
    from cna_agent._native import ffi, lib

    n_out = ffi.new("int32_t *")
    tids = ffi.new("int32_t[]", 2)
    owner = ffi.new("int32_t[]", 2)
    errs = ffi.new("int32_t[]", 1)
    rc = lib.cna_aff_list_tasks(ffi.new("int32_t[]", [child.pid]), 1, tids, owner, 2, n_out, errs)
    assert rc == -errno.E2BIG and n_out[0] == len(proc_tids(child.pid))


@pytest.mark.skipif(len(CPUS) < 2, reason="needs 2 CPUs")
@pytest.mark.parametrize("native", NATIVE)
def test_thread_stats_name_vcpu_threads_and_last_cpu_follows_the_pin(child, native):
    pins = {tid: (CPUS[k % 2],) for k, tid in enumerate(child.workers)}
    aff.set_affinity(pins, use_native=False)
    # Every worker wakes every 5 ms, so each soon runs on its new CPU (the host may be busy).
    deadline = time.monotonic() + 20
    while True:
        stats = {s.tid: s for s in aff.thread_stats(child.pid, use_native=native)}
        if all(stats[t].last_cpu == c[0] for t, c in pins.items()) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert set(stats) == set(proc_tids(child.pid))
    for tid, cpus in pins.items():
        assert stats[tid].comm == proc_comm(child.pid, tid)
        assert stats[tid].comm.startswith("CPU ") and stats[tid].comm.endswith("/TCG")
        assert stats[tid].last_cpu == cpus[0], (tid, stats[tid])
    assert stats[child.pid].comm == proc_comm(child.pid, child.pid)


def test_thread_cpu_time_agrees_between_native_and_python():
    c = Child(threads=2, spin=True)
    try:
        deadline = time.monotonic() + 60
        tick = os.sysconf("SC_CLK_TCK")

        def burned() -> float:
            # CPU seconds of worker 0 straight from /proc (utime + stime), not through the module
            # under test. Its state is no guide: a spinning Python thread also sleeps waiting for
            # the GIL, so "not running" does not mean "done".
            fields = Path(f"/proc/{c.pid}/task/{c.workers[0]}/stat").read_text().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / tick

        last = -1.0
        while (now := burned()) < 0.35 or now != last:  # burned its 0.4 s, and stopped burning
            assert time.monotonic() < deadline, "worker 0 never finished burning its 0.4 s of CPU"
            last = now
            time.sleep(0.2)  # worker 0 burns 0.4 s of CPU, then goes back to sleeping
        native = {s.tid: s for s in aff.thread_stats(c.pid, use_native=True)}
        python = {s.tid: s for s in aff.thread_stats(c.pid, use_native=False)}
        assert set(native) == set(python)
        spun = native[c.workers[0]]
        assert spun.comm == "CPU 0/TCG" and spun.cpu_seconds >= 0.35, native
        for tid in native:
            n, p = native[tid], python[tid]
            assert (n.comm, n.tid) == (p.comm, p.tid)
            assert 0 <= p.utime_ticks + p.stime_ticks - (n.utime_ticks + n.stime_ticks) <= 5  # read a moment later
    finally:
        c.close()


def test_stat_parser_takes_the_last_paren_for_comm():
    line = b"42 (a) b (c)) S " + b" ".join(str(i).encode() for i in range(4, 53)) + b"\n"
    comm, state, utime, stime, cpu = aff._parse_stat(line)
    assert (comm, state) == ("a) b (c)", "S")
    assert (utime, stime, cpu) == (14, 15, 39)  # field N holds N in this line


@pytest.mark.parametrize("native", NATIVE)
def test_numa_memory_counts_a_touched_allocation(native):
    small, big = Child(threads=1), Child(threads=1, alloc_mib=64)
    try:
        a = aff.numa_memory_kib(small.pid, use_native=native)
        b = aff.numa_memory_kib(big.pid, use_native=native)
        nodes = {int(n[4:]) for n in os.listdir("/sys/devices/system/node") if n[4:].isdigit()} or {0}
        assert set(a) <= nodes and set(b) <= nodes
        assert sum(b.values()) - sum(a.values()) >= 60 * 1024, (a, b)
    finally:
        small.close()
        big.close()


def test_numa_maps_native_equals_python_with_a_mapped_file_named_like_fields():
    with tempfile.TemporaryDirectory() as tmp:
        # A mapped file whose name looks like numa_maps fields. Kernels before 5.x escaped
        # only newlines in numa_maps file names, so a reader splitting from the left would
        # count 99999 fake pages there; newer kernels escape spaces and '=' too.
        path = Path(tmp) / "x N0=99999 kernelpagesize_kB=4"
        path.write_bytes(b"\1" * 4096)
        c = Child(threads=1, map_path=str(path))
        try:
            maps = Path(f"/proc/{c.pid}/numa_maps").read_text()
            assert tmp in maps  # the mapping is really there
            native = aff.numa_memory_kib(c.pid, use_native=True)
            python = aff.numa_memory_kib(c.pid, use_native=False)
            assert native == python
            rss_kib = next(int(l.split()[1]) for l in Path(f"/proc/{c.pid}/status").read_text().splitlines() if l.startswith("VmRSS:"))
            assert sum(native.values()) < 99999 * 4
            assert rss_kib // 2 <= sum(native.values()) <= rss_kib * 2, (native, rss_kib)
        finally:
            c.close()


def test_numa_line_parser_reads_fields_from_the_end_as_old_kernels_print_them():
    kib: dict[int, int] = {}
    aff._numa_line("7f00 default file=/tmp/x N0=99999 kernelpagesize_kB=4 dirty=1 N0=1 N1=2 kernelpagesize_kB=2048\n", kib)
    assert kib == {0: 2048, 1: 4096}
    aff._numa_line("7f01 default file=/tmp/y mapped=5 N3=5 kernelpagesize_kB=4\n", kib)
    aff._numa_line("7f02 bind:1 anon=3 N1=3 kernelpagesize_kB=4\n", kib)
    assert kib == {0: 2048, 1: 4096 + 12, 3: 20}
    before = dict(kib)
    # A mapping with no resident page: the kernel prints no N fields and no page size, so
    # nothing in its (old-style unescaped) file name may count.
    aff._numa_line("7f03 default file=/tmp/z N0=7\n", kib)
    assert kib == before


def test_numa_memory_of_a_gone_process_raises():
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait(timeout=30)
    for native in (True, False):
        with pytest.raises(OSError):
            aff.numa_memory_kib(dead.pid, use_native=native)


def _scratch_cpuset() -> Path | None:
    v1, _ = aff._cgroup_mounts()
    if os.geteuid() != 0 or not v1 or len(CPUS) < 2:
        return None
    d = Path(v1) / f"cna-test-{os.getpid()}"
    d.mkdir()
    (d / "cpuset.mems").write_text((Path(v1) / "cpuset.mems").read_text())
    (d / "cpuset.cpus").write_text(str(CPUS[0]))
    return d


def test_repin_threads_widens_a_confining_cpuset_cgroup_as_libvirt_sets_them_up(child):
    """A thread in its own cpuset cgroup (as libvirt puts each vCPU thread): a bare
    sched_setaffinity outside it fails with EINVAL; repin_threads rewrites the cgroup first."""
    d = _scratch_cpuset()
    if d is None:
        pytest.skip("needs root, a cgroup v1 cpuset hierarchy and 2 CPUs")
    tid = child.workers[0]
    try:
        (d / "tasks").write_text(str(tid))
        assert proc_allowed(child.pid, tid) == (CPUS[0],)
        assert aff.cpuset_dir(child.pid, tid) == str(d)
        assert aff.set_affinity({tid: (CPUS[1],)}) == {tid: errno.EINVAL}
        assert aff.repin_threads(child.pid, {tid: (CPUS[1],), child.workers[1]: (CPUS[0],)}) == {}
        assert proc_allowed(child.pid, tid) == (CPUS[1],)
        assert proc_allowed(child.pid, child.workers[1]) == (CPUS[0],)
        assert parse_cpulist((d / "cpuset.cpus").read_text()) == (CPUS[1],)
    finally:
        (d.parent / "tasks").write_text(str(tid))
        d.rmdir()
