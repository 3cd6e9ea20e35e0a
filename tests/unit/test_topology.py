"""Topology probe against recorded trees and the live host, native and pure-Python.

The synthesized Kunpeng/Xeon trees come from tools/make-fixture-trees.py (see
tests/fixtures/sysfs/README.md); the expected numbers below are those machines' published
topology, so a failure here means the probe misreads a real server, not a test detail.
"""

from __future__ import annotations

import dataclasses
import errno
import filecmp
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cna_agent.host import midr as midr_mod
from cna_agent.host import topology
from cna_agent.host.topology import (
    HostTopology,
    HugePagePool,
    MidrInfo,
    native_available,
    parse_cpulist,
    probe_topology,
)

REPO = Path(__file__).resolve().parents[2]
TREES = REPO / "tests" / "fixtures" / "sysfs"
KUNPENG = TREES / "kunpeng920-2s"
XEON = TREES / "fusionserver-2s"
THIS_VM = TREES / "this-vm-x86_64"
ALL_TREES = [KUNPENG, XEON, THIS_VM]


@pytest.fixture(scope="session")
def native() -> None:
    """Make cna_agent._native available, building it in place when needed.

    Skips only when compilation is impossible here (no compiler or headers), and says so.
    """
    if native_available():
        return
    proc = subprocess.run(
        [sys.executable, str(REPO / "native" / "build_native.py")],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    topology._native_ok = None  # forget the cached "missing" answer
    if proc.returncode != 0 or not native_available():
        pytest.skip(f"cannot build cna_agent._native here: {proc.stderr.strip()[-500:]}")


def both(root: Path | str) -> HostTopology:
    """Probe with both readers, insist they agree, return the result."""
    py = probe_topology(str(root), use_native=False)
    c = probe_topology(str(root), use_native=True)
    assert c == py
    return c


def copy_tree(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / src.name
    shutil.copytree(src, dst, symlinks=True)
    return dst


def steady(topo: HostTopology) -> HostTopology:
    """Zero the counters a live host changes between two reads (free memory, free pages)."""
    def pools(ps):
        return tuple(dataclasses.replace(p, free=0) for p in ps)
    nodes = tuple(dataclasses.replace(n, memory_free_kib=0, hugepages=pools(n.hugepages)) for n in topo.numa_nodes)
    return dataclasses.replace(topo, numa_nodes=nodes, hugepages=pools(topo.hugepages))


# --------------------------------------------------------------------------- cpulist


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", ()),
        ("\n", ()),
        ("0", (0,)),
        ("0-3,8,10-11\n", (0, 1, 2, 3, 8, 10, 11)),
        ("5-5", (5,)),
        ("3,1,2", (1, 2, 3)),
        ("0-2,1-3", (0, 1, 2, 3)),
        ("8191", (8191,)),
        ("0-8191", tuple(range(8192))),
    ],
)
def test_parse_cpulist_valid(text: str, expected: tuple[int, ...]) -> None:
    assert parse_cpulist(text) == expected


BAD_LISTS = ["a", "1-", "-1", "3-1", "1,,2", "1,", ",1", "1 2", "0-3:2/4", "8192", "0-9000", "１"]


@pytest.mark.parametrize("text", BAD_LISTS)
def test_parse_cpulist_invalid(text: str) -> None:
    with pytest.raises(ValueError):
        parse_cpulist(text)


@pytest.mark.parametrize("text", ["", "0-3,8,10-11", "3,1,2", "0-8191", "4095-4100,7"] + BAD_LISTS[:-1])
def test_native_cpulist_parser_agrees(native: None, text: str) -> None:
    from cna_agent._native import ffi, lib

    out = ffi.new("int32_t[]", 8192)
    n = ffi.new("int32_t *")
    rc = lib.cna_parse_cpulist(text.encode(), out, 8192, n)
    try:
        expected = parse_cpulist(text)
    except ValueError:
        assert rc < 0
    else:
        assert rc == 0
        assert tuple(out[0 : n[0]]) == expected


def test_native_cpulist_reports_too_small_buffer(native: None) -> None:
    from cna_agent._native import ffi, lib

    out = ffi.new("int32_t[]", 4)
    n = ffi.new("int32_t *")
    assert lib.cna_parse_cpulist(b"0-99", out, 4, n) == -errno.E2BIG
    assert n[0] == 100
    assert tuple(out[0:4]) == (0, 1, 2, 3)


# --------------------------------------------------------------------------- MIDR


def test_midr_decode() -> None:
    kp = MidrInfo.from_raw(0x481FD010)
    assert (kp.implementer, kp.variant, kp.architecture, kp.part, kp.revision) == (0x48, 1, 0xF, 0xD01, 0)
    assert kp.implementer_name == "HiSilicon"
    assert kp.part_name == "Kunpeng 920 (TaiShan v110)"
    assert MidrInfo.from_raw(0x480FD020).part_name.startswith("Kunpeng 920B")
    n1 = MidrInfo.from_raw(0x413FD0C1)
    assert (n1.implementer_name, n1.part_name, n1.variant, n1.revision) == ("ARM", "Neoverse-N1", 3, 1)
    assert MidrInfo.from_raw(0x410FD490).part_name == "Neoverse-N2"
    assert MidrInfo.from_raw(0x410FD400).part_name == "Neoverse-V1"
    assert MidrInfo.from_raw(0xC00FAC30).implementer_name == "Ampere"
    unknown = MidrInfo.from_raw(0xEE0F1230)
    assert unknown.implementer_name == "unknown (0xee)" and unknown.part_name == "unknown (0x123)"
    assert midr_mod.join_midr(*midr_mod.split_midr(0x481FD010)) == 0x481FD010


# --------------------------------------------------------------------------- Kunpeng 920


def test_kunpeng920_two_socket(native: None) -> None:
    t = both(KUNPENG)
    assert t.arch == "aarch64"
    assert (t.cpu_vendor, t.cpu_model) == ("HiSilicon", "Kunpeng 920 (TaiShan v110)")
    assert t.midr == MidrInfo.from_raw(0x481FD010) and t.midr.raw == 0x481FD010
    assert t.hw_virt == "arm-el2"
    # arm64 exposes no die_id: one "die" per socket; the dies show up as NUMA nodes below.
    assert (t.sockets, t.dies_per_socket, t.clusters_per_die, t.cores_per_cluster, t.threads_per_core) == (2, 1, 12, 4, 1)
    assert len(t.cpus) == 96 and t.online_cpus == tuple(range(96))
    assert all(c.thread_siblings == (c.id,) for c in t.cpus)
    assert [c.socket for c in t.cpus] == [0] * 48 + [1] * 48
    assert [c.node for c in t.cpus] == [n for n in range(4) for _ in range(24)]

    clusters: dict[int, list[int]] = {}
    for c in t.cpus:
        clusters.setdefault(c.cluster, []).append(c.id)
    assert len(clusters) == 24
    for members in clusters.values():
        assert len(members) == 4
        assert len({t.cpus[m].node for m in members}) == 1  # a cluster never straddles a die

    assert [n.id for n in t.numa_nodes] == [0, 1, 2, 3]
    assert [n.cpus for n in t.numa_nodes] == [tuple(range(24 * n, 24 * n + 24)) for n in range(4)]
    assert [n.distances for n in t.numa_nodes] == [
        (10, 12, 20, 22), (12, 10, 22, 24), (20, 22, 10, 12), (22, 24, 12, 10)]
    assert [n.memory_total_kib for n in t.numa_nodes] == [132386816, 133660672, 133660672, 133627904]
    assert t.numa_nodes[0].memory_free_kib == 101203968
    assert t.memory_total_kib == sum(n.memory_total_kib for n in t.numa_nodes) == 533336064

    assert t.cache_sizes_kib() == {"L1d": 64, "L1i": 64, "L2": 512, "L3": 24576}
    by_name: dict[str, list] = {}
    for cache in t.caches:
        by_name.setdefault(cache.name, []).append(cache)
    assert {k: len(v) for k, v in by_name.items()} == {"L1d": 96, "L1i": 96, "L2": 96, "L3": 4}
    assert [c.cpus for c in by_name["L3"]] == [n.cpus for n in t.numa_nodes]

    assert t.hugepages == (HugePagePool(2048, 1536, 1280), HugePagePool(524288, 96, 60))
    assert t.numa_nodes[0].hugepages == (HugePagePool(2048, 0, 0), HugePagePool(524288, 32, 20))
    assert t.numa_nodes[3].hugepages == (HugePagePool(2048, 512, 256), HugePagePool(524288, 0, 0))
    for i, pool in enumerate(t.hugepages):
        assert pool.total == sum(n.hugepages[i].total for n in t.numa_nodes)


# --------------------------------------------------------------------------- FusionServer


def test_fusionserver_xeon_two_socket(native: None) -> None:
    t = both(XEON)
    assert t.arch == "x86_64" and t.midr is None
    assert t.cpu_vendor == "GenuineIntel"
    assert t.cpu_model == "Intel(R) Xeon(R) Gold 6248 CPU @ 2.50GHz"
    assert t.hw_virt == "vmx"
    # no cluster_id on this kernel: every core is its own cluster
    assert (t.sockets, t.dies_per_socket, t.clusters_per_die, t.cores_per_cluster, t.threads_per_core) == (2, 1, 20, 1, 2)
    assert len(t.cpus) == 80 and len(t.online_cpus) == 80
    assert all(c.cluster == -1 and c.die == 0 for c in t.cpus)
    assert t.cpus[0].thread_siblings == (0, 40)
    assert t.cpus[40].thread_siblings == (0, 40)
    assert t.cpus[65].thread_siblings == (25, 65)
    assert t.cpus[0].core == t.cpus[40].core and t.cpus[0].socket == t.cpus[40].socket
    socket0 = tuple(range(20)) + tuple(range(40, 60))
    socket1 = tuple(range(20, 40)) + tuple(range(60, 80))
    assert tuple(c.id for c in t.cpus if c.socket == 0) == socket0
    assert [n.cpus for n in t.numa_nodes] == [socket0, socket1]
    assert [n.distances for n in t.numa_nodes] == [(10, 21), (21, 10)]
    assert t.cache_sizes_kib() == {"L1d": 32, "L1i": 32, "L2": 1024, "L3": 28160}
    l3 = [c for c in t.caches if c.name == "L3"]
    assert [c.cpus for c in l3] == [socket0, socket1]
    l2 = [c for c in t.caches if c.name == "L2"]
    assert len(l2) == 40 and all(len(c.cpus) == 2 for c in l2)
    assert t.hugepages == (HugePagePool(2048, 4096, 2048), HugePagePool(1048576, 128, 124))
    assert t.numa_nodes[1].hugepages == (HugePagePool(2048, 0, 0), HugePagePool(1048576, 64, 64))
    assert t.memory_total_kib == 394391552


# --------------------------------------------------------------------------- every tree


@pytest.mark.parametrize("tree", ALL_TREES, ids=lambda p: p.name)
def test_native_equals_python_and_serialises(native: None, tree: Path) -> None:
    t = both(tree)
    encoded = json.loads(json.dumps(t.to_dict()))
    assert encoded["sockets"] == t.sockets
    assert len(encoded["cpus"]) == len(t.cpus)
    assert set(encoded["cache_sizes_kib"]) >= {"L1d", "L1i", "L2"}


def test_recorded_vm_tree(native: None) -> None:
    t = both(THIS_VM)
    meta = json.loads((THIS_VM / "recorded.json").read_text())
    assert t.arch == meta["machine"] == "x86_64"
    assert len(t.cpus) == 2 and t.online_cpus == (0, 1)
    assert t.sockets == 1 and t.threads_per_core == 1
    # x86 kernels print cluster_id 65535 when the cluster is unknown
    assert all(c.cluster == -1 for c in t.cpus)
    assert len(t.numa_nodes) == 1 and t.numa_nodes[0].distances == (10,)
    assert t.cache_sizes_kib()["L3"] > 0


def test_native_retries_with_exact_buffer_sizes(native: None) -> None:
    saved = list(topology._native_caps)
    topology._native_caps[:] = [1, 1, 1]
    try:
        small = probe_topology(str(KUNPENG), use_native=True)
        assert topology._native_caps[0] == 96 and topology._native_caps[1] == 96 * 3 + 4
    finally:
        topology._native_caps[:] = saved
    assert small == probe_topology(str(KUNPENG), use_native=False)


# --------------------------------------------------------------------------- degradation


def test_no_cluster_id_no_die_id(native: None, tmp_path: Path) -> None:
    root = copy_tree(KUNPENG, tmp_path)
    for f in root.glob("sys/devices/system/cpu/cpu*/topology/cluster_id"):
        f.unlink()
    t = both(root)
    assert all(c.cluster == -1 for c in t.cpus)
    assert (t.sockets, t.dies_per_socket, t.clusters_per_die, t.cores_per_cluster) == (2, 1, 48, 1)

    xeon = copy_tree(XEON, tmp_path)
    for f in xeon.glob("sys/devices/system/cpu/cpu*/topology/die_id"):
        f.unlink()
    x = both(xeon)
    assert all(c.die == 0 for c in x.cpus) and x.dies_per_socket == 1 and x.threads_per_core == 2


def test_no_numa_sysfs(native: None, tmp_path: Path) -> None:
    root = copy_tree(KUNPENG, tmp_path)
    shutil.rmtree(root / "sys/devices/system/node")
    t = both(root)
    assert len(t.numa_nodes) == 1
    node = t.numa_nodes[0]
    assert node.id == 0 and node.cpus == tuple(range(96)) and node.distances == (10,)
    assert node.memory_total_kib == t.memory_total_kib == 533336064
    assert node.hugepages == t.hugepages
    assert all(c.node == 0 for c in t.cpus)


def test_offline_cpu_and_missing_lists(native: None, tmp_path: Path) -> None:
    root = copy_tree(KUNPENG, tmp_path)
    cpu = root / "sys/devices/system/cpu"
    (cpu / "online").write_text("0-94\n")
    # the kernel removes topology and cache attributes of an offline CPU
    shutil.rmtree(cpu / "cpu95/topology")
    shutil.rmtree(cpu / "cpu95/cache")
    shutil.rmtree(cpu / "cpu95/regs")
    t = both(root)
    assert len(t.cpus) == 96 and t.online_cpus == tuple(range(95))
    c95 = t.cpus[95]
    assert (c95.online, c95.socket, c95.die, c95.cluster, c95.core, c95.thread_siblings) == (False, -1, -1, -1, -1, ())
    assert t.sockets == 2 and len([c for c in t.caches if c.name == "L1d"]) == 95

    (cpu / "possible").unlink()
    (cpu / "online").unlink()
    t2 = both(root)
    assert len(t2.cpus) == 96 and len(t2.online_cpus) == 96  # no online list: present = online


def test_midr_from_cpuinfo_and_no_kvm(native: None, tmp_path: Path) -> None:
    root = copy_tree(KUNPENG, tmp_path)
    for d in root.glob("sys/devices/system/cpu/cpu*/regs"):
        shutil.rmtree(d)
    shutil.rmtree(root / "sys/devices/virtual/misc/kvm")
    t = both(root)
    assert t.midr is not None and t.midr.raw == 0x481FD010 and t.cpu_model.startswith("Kunpeng 920")
    assert t.arch == "aarch64" and t.hw_virt == ""


def test_no_cache_no_hugepages_no_meminfo(native: None, tmp_path: Path) -> None:
    root = copy_tree(XEON, tmp_path)
    for d in root.glob("sys/devices/system/cpu/cpu*/cache"):
        shutil.rmtree(d)
    shutil.rmtree(root / "sys/kernel/mm/hugepages")
    (root / "proc/meminfo").unlink()
    t = both(root)
    assert t.caches == () and t.cache_sizes_kib() == {} and t.hugepages == ()
    assert t.memory_total_kib == sum(n.memory_total_kib for n in t.numa_nodes)


def test_bad_trees_raise_oserror(native: None, tmp_path: Path) -> None:
    for use_native in (False, True):
        with pytest.raises(OSError):
            probe_topology(str(tmp_path / "nothing-here"), use_native=use_native)
    root = copy_tree(XEON, tmp_path)
    (root / "sys/devices/system/cpu/possible").write_text("0-8192\n")  # beyond MAX_CPUS
    for use_native in (False, True):
        with pytest.raises(OSError):
            probe_topology(str(root), use_native=use_native)


def test_force_native_without_module_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "cna_agent._native", None)  # makes the import fail
    with pytest.raises(ImportError):
        probe_topology(str(XEON), use_native=True)


# --------------------------------------------------------------------------- live host


def test_live_host(native: None) -> None:
    py = probe_topology("/", use_native=False)
    c = probe_topology("/", use_native=True)
    assert steady(c) == steady(py)
    assert c.arch == os.uname().machine
    assert len(c.cpus) == os.cpu_count()
    assert len(c.online_cpus) == os.sysconf("SC_NPROCESSORS_ONLN")
    assert set(os.sched_getaffinity(0)) <= set(c.online_cpus)
    assert c.sockets >= 1 and c.threads_per_core >= 1
    assert c.sockets * c.dies_per_socket * c.clusters_per_die * c.cores_per_cluster * c.threads_per_core <= len(c.online_cpus)
    meminfo = Path("/proc/meminfo").read_text().split("\n")
    total = next(int(line.split()[1]) for line in meminfo if line.startswith("MemTotal:"))
    assert c.memory_total_kib == total
    assert {p.size_kib for p in c.hugepages} == {
        int(n[len("hugepages-") : -2]) for n in os.listdir("/sys/kernel/mm/hugepages")}
    assert sorted(cpu for n in c.numa_nodes for cpu in n.cpus) == list(c.online_cpus)


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="cpuid is x86-only")
def test_cpuid_vendor_matches_cpuinfo(native: None) -> None:
    from cna_agent._native import ffi, lib

    regs = ffi.new("uint32_t[4]")
    assert lib.cna_cpuid(0, 0, regs) == 0
    vendor = b"".join(int(regs[i]).to_bytes(4, "little") for i in (1, 3, 2)).decode()
    assert vendor == probe_topology("/").cpu_vendor
    assert lib.cna_cpuid(0xFFFFFFF0, 0, regs) < 0  # beyond the max leaf: refused, not garbage


def test_recorder_captures_what_the_probe_reads(native: None, tmp_path: Path) -> None:
    out = tmp_path / "rec"
    subprocess.run(
        [sys.executable, str(REPO / "tools" / "record-sysfs-tree.py"), "--out", str(out)],
        check=True, capture_output=True, timeout=120,
    )
    recorded = probe_topology(str(out))
    live = probe_topology("/")
    # hw_virt on the live host may also consult cpuid; everything else must match
    assert steady(dataclasses.replace(recorded, hw_virt=live.hw_virt)) == steady(live)


def test_fixture_generator_is_deterministic(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, str(REPO / "tools" / "make-fixture-trees.py"), "--out", str(tmp_path)],
        check=True, capture_output=True, timeout=120,
    )
    for name in ("kunpeng920-2s", "fusionserver-2s"):
        pending = [filecmp.dircmp(tmp_path / name, TREES / name)]
        while pending:
            cmp = pending.pop()
            assert not cmp.left_only and not cmp.right_only and not cmp.diff_files, cmp.left
            pending.extend(cmp.subdirs.values())


def test_8192_cpu_ids_and_long_lists(native: None, tmp_path: Path) -> None:
    """Bounds: the highest CPU id, an 8192-entry list and a ~20 KiB cpulist text."""
    cpu = tmp_path / "sys/devices/system/cpu"
    cpu.mkdir(parents=True)
    (cpu / "possible").write_text("0-8191\n")
    (cpu / "online").write_text("0-8191\n")
    even = ",".join(str(i) for i in range(0, 8192, 2))
    for cid in (0, 4095, 8191):
        topo = cpu / f"cpu{cid}/topology"
        topo.mkdir(parents=True)
        (topo / "physical_package_id").write_text("0\n")
        (topo / "core_id").write_text(f"{cid}\n")
        (topo / "thread_siblings_list").write_text("0-8191\n")
        idx = cpu / f"cpu{cid}/cache/index0"
        idx.mkdir(parents=True)
        (idx / "level").write_text("3\n")
        (idx / "type").write_text("Unified\n")
        (idx / "size").write_text("32M\n")
        (idx / "shared_cpu_list").write_text((even if cid == 0 else "1-8191") + "\n")
    t = both(tmp_path)
    assert tuple(c.id for c in t.cpus) == (0, 4095, 8191)
    assert all(len(c.thread_siblings) == 8192 for c in t.cpus)
    # cpu0 reports the even half; cpu4095 (odd, not covered) reports 1-8191; cpu8191 is covered
    assert [len(c.cpus) for c in t.caches] == [4096, 8191]
    assert t.caches[0].size_kib == 32768
