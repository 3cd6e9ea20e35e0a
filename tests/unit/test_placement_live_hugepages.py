"""Hugepage accounting from the kernel's pools at planning time (host/placement.py, placer.py).

Why: the topology the planner is built from is read once at agent start. Pages reserved
later were invisible (every hugepage VM refused until a restart), and after a restart with
hugepage guests running their pages were counted twice (not free in sysfs, and held by their
placements), so VMs that fit were refused. The recorded FusionServer tree stands in for the
host; the live pools are what a HostPlacer's reader returns.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from cna_agent.errors import FailedPrecondition
from cna_agent.host.placement import Planner, VmRequest
from cna_agent.host.placer import HostPlacer
from cna_agent.host.topology import HugePagePool, probe_topology
from cna_agent.host.topology.hostfiles import hugetlbfs_page_sizes, node_hugepage_pools
from cna_agent.state.store import StateStore

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "sysfs"
TWO_MIB = 2048


def _live(free0: int, total0: int = 512, free1: int = 0, total1: int = 0) -> dict[int, tuple[HugePagePool, ...]]:
    return {0: (HugePagePool(TWO_MIB, total0, free0),), 1: (HugePagePool(TWO_MIB, total1, free1),)}


@pytest.fixture(scope="module")
def xeon():
    return probe_topology(str(FIXTURES / "fusionserver-2s"))


def test_pages_reserved_after_start_up_are_used_and_too_few_are_refused_naming_them(xeon):
    planner = Planner(xeon)
    planner.live_hugepages = _live(free0=96)
    vm = planner.plan(VmRequest("a", 1, 192, hugepages=True), [])
    assert vm.plan.hugepage_kib == TWO_MIB and vm.hugepages == {vm.plan.memory_nodes[0]: (TWO_MIB, 96)}
    planner.live_hugepages = _live(free0=95)
    with pytest.raises(FailedPrecondition, match=r"not enough free hugepages.*2048: 95"):
        planner.plan(VmRequest("b", 1, 192, hugepages=True, numa_cells=1), [])


def test_running_guests_pages_are_not_counted_twice(xeon):
    planner = Planner(xeon)
    planner.live_hugepages = _live(free0=200, total0=200)
    first = planner.plan(VmRequest("a", 1, 192, hugepages=True, numa_cells=1), [])
    # "a" runs: the kernel counts its 96 pages as used; its placement holds the same 96
    planner.live_hugepages = _live(free0=104, total0=200)
    second = planner.plan(VmRequest("b", 1, 192, hugepages=True, numa_cells=1), [first])
    assert second.plan.hugepage_kib == TWO_MIB
    # a stopped VM's claim still counts (the pool minus what placements hold): 200 - 96 - 96 = 8 left
    planner.live_hugepages = _live(free0=200, total0=200)
    with pytest.raises(FailedPrecondition, match="not enough free hugepages"):
        planner.plan(VmRequest("c", 1, 32, hugepages=True, numa_cells=1), [first, second])


def test_the_placer_reads_the_pools_for_hugepage_vms_only(xeon, tmp_path):
    reads: list[int] = []

    async def reader():
        reads.append(1)
        return _live(free0=96), frozenset({TWO_MIB})

    async def go():
        placer = HostPlacer(Planner(xeon), StateStore(tmp_path / "p.db"), live_hugepages=reader)
        await placer.plan("shared", 1, 192, dedicated=False, hugepages=False, numa_cells=0)
        assert reads == []
        plan = await placer.plan("huge", 1, 192, dedicated=False, hugepages=True, numa_cells=0)
        assert reads == [1] and plan.hugepage_kib == TWO_MIB

    asyncio.run(go())


def test_node_pools_are_read_from_the_recorded_tree():
    pools = node_hugepage_pools(str(FIXTURES / "kunpeng920-2s"))
    topo = probe_topology(str(FIXTURES / "kunpeng920-2s"))
    assert pools == {n.id: n.hugepages for n in topo.numa_nodes}


def test_pages_another_mapping_reserved_are_not_free(tmp_path):
    """HugePages_Rsvd: counted in free_hugepages, yet QEMU cannot map them."""
    host = tmp_path / "sys/kernel/mm/hugepages/hugepages-2048kB"
    node = tmp_path / "sys/devices/system/node/node0/hugepages/hugepages-2048kB"
    for d, files in ((host, {"nr_hugepages": 100, "free_hugepages": 100, "resv_hugepages": 60}),
                     (node, {"nr_hugepages": 100, "free_hugepages": 100})):
        d.mkdir(parents=True)
        for name, value in files.items():
            (d / name).write_text(f"{value}\n")
    assert node_hugepage_pools(str(tmp_path)) == {0: (HugePagePool(TWO_MIB, 100, 40),)}


def test_without_a_hugetlbfs_mount_of_the_size_the_vm_is_refused_saying_what_to_mount(xeon):
    planner = Planner(xeon)
    planner.live_hugepages = _live(free0=512)
    planner.hugetlbfs_sizes = frozenset({1048576})
    with pytest.raises(FailedPrecondition, match=r"no hugetlbfs is mounted for the host's page sizes \(2048 KiB\).*mount -t hugetlbfs"):
        planner.plan(VmRequest("a", 1, 192, hugepages=True, numa_cells=1), [])
    planner.hugetlbfs_sizes = frozenset({TWO_MIB})
    assert planner.plan(VmRequest("a", 1, 192, hugepages=True, numa_cells=1), []).plan.hugepage_kib == TWO_MIB


def test_hugetlbfs_mounts_give_their_page_sizes(tmp_path):
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc/meminfo").write_text("MemTotal: 100 kB\nHugepagesize:       2048 kB\n")
    (tmp_path / "proc/self").mkdir()
    (tmp_path / "proc/self/mounts").write_text(
        "proc /proc proc rw 0 0\nhugetlbfs /dev/hugepages hugetlbfs rw,relatime 0 0\n"
        "none /mnt/huge1g hugetlbfs rw,relatime,pagesize=1024M 0 0\n")
    assert hugetlbfs_page_sizes(str(tmp_path)) == frozenset({2048, 1048576})
    (tmp_path / "proc/self/mounts").write_text("hugetlbfs /dev/hugepages hugetlbfs rw,relatime,pagesize=2M 0 0\n")
    assert hugetlbfs_page_sizes(str(tmp_path)) == frozenset({2048})
