"""More planner properties on hypothesis topologies (sockets x nodes x clusters x cores x
threads) and VM mixes: node locality, cluster packing next to existing VMs, release. No daemons."""

from __future__ import annotations

import asyncio
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as stg

from cna_agent.errors import FailedPrecondition
from cna_agent.host.placement import Placement, Planner, VmRequest
from cna_agent.host.placer import HostPlacer
from cna_agent.state.store import StateStore
from support.placement import topologies, vm_requests

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "sysfs"


def _place_all(planner: Planner, reqs) -> list[Placement]:
    placed: list[Placement] = []
    for i, (vcpus, mem, dedicated, huge) in enumerate(reqs):
        try:
            placed.append(planner.plan(VmRequest(f"vm{i}", vcpus, mem, dedicated=dedicated, hugepages=huge), placed))
        except FailedPrecondition:
            continue
    return placed


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(topo=topologies(), reqs=vm_requests, reserve=stg.integers(0, 2))
def test_property_vcpus_run_on_their_memory_nodes_and_cells_mirror_host_nodes(topo, reqs, reserve):
    planner = Planner(topo, reserved_cpus=range(reserve), node_reserve_mib=256)
    placed = _place_all(planner, reqs)
    node_of = {c.id: c.node for c in topo.cpus}
    current = planner.current_plans(placed)
    owned = {c for p in placed if p.dedicated for c in p.owned_cpus}
    for p in placed:
        plan = current[p.uuid]
        for vcpu, cpus in plan.vcpu_pins.items():
            assert {node_of[c] for c in cpus} <= set(plan.memory_nodes), (p.uuid, vcpu, cpus, plan.memory_nodes)
        for cell in plan.guest_cells:
            assert cell.host_node in plan.memory_nodes
            if p.dedicated:
                assert {node_of[c] for v in cell.vcpus for c in plan.vcpu_pins[v]} == {cell.host_node}
        assert set(p.memory_mib) == set(plan.memory_nodes)
        # The shared pool and the dedicated CPUs never overlap; reserved CPUs are in neither.
        pool = set(planner.shared_pool(placed))
        assert not pool & owned and not pool & set(range(reserve)) and not owned & set(range(reserve))


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(topo=topologies(), reqs=vm_requests, vcpus=stg.integers(1, 4))
def test_property_a_small_dedicated_vm_takes_one_cluster_whenever_a_cluster_has_room(topo, reqs, vcpus):
    planner = Planner(topo, node_reserve_mib=0)
    placed = _place_all(planner, reqs)
    taken = planner.owned(placed)
    tpc = topo.threads_per_core
    need = -(-vcpus // tpc)
    free_by_cluster: dict[tuple, int] = {}
    node_of_group: dict[tuple, int] = {}
    for core in planner.cores:
        if not set(core.threads) & taken:
            free_by_cluster[core.group] = free_by_cluster.get(core.group, 0) + 1
            node_of_group[core.group] = core.node

    def room(group: tuple) -> bool:
        # Room = enough free whole cores, memory on that node, and taking the cores leaves
        # the node's shared VMs a CPU.
        node = node_of_group[group]
        shared_vms = any(not p.dedicated and node in p.plan.memory_nodes for p in placed)
        free_mem = planner.node_capacity_mib(node) - sum(p.memory_mib.get(node, 0) for p in placed)
        return (free_by_cluster[group] >= need and free_mem >= 64
                and (not shared_vms or len(planner.shared_pool(placed, [node])) > need * tpc))

    if not any(room(g) for g in free_by_cluster):
        return  # no cluster has room: splitting is allowed
    try:
        vm = planner.plan(VmRequest("new", vcpus, 64, dedicated=True), placed)
    except FailedPrecondition:
        return  # e.g. no CPU left for the emulator threads, or no memory: a refusal, not a split
    groups = {core.group for core in planner.cores if set(core.threads) & set(vm.owned_cpus)}
    assert len(groups) == 1, f"{vcpus} vCPUs split over clusters {groups} while one had room"


def test_release_gives_back_cpus_memory_and_hugepages(tmp_path):
    from cna_agent.host.topology import probe_topology

    topo = probe_topology(str(FIXTURES / "kunpeng920-2s"))

    async def scenario() -> None:
        store = StateStore(tmp_path / "p.db")
        placer = HostPlacer(Planner(topo), store)
        await placer.load()
        pool_before = placer.planner.shared_pool(placer.placements())
        a = await placer.plan("a", 8, 4096, dedicated=True, hugepages=True, numa_cells=0)
        assert set(placer.planner.shared_pool(placer.placements())) == set(pool_before) - set(placer.get("a").owned_cpus)
        await placer.release("a")
        assert placer.planner.shared_pool(placer.placements()) == pool_before
        again = await placer.plan("b", 8, 4096, dedicated=True, hugepages=True, numa_cells=0)
        assert again.vcpu_pins == a.vcpu_pins and again.hugepage_kib == a.hugepage_kib  # all of it came back
        store.close()
        restored = HostPlacer(Planner(topo), StateStore(tmp_path / "p.db"))
        assert await restored.load() == 1 and restored.get("a") is None and restored.get("b").plan == again

    asyncio.run(scenario())


def test_kunpeng_small_vm_prefers_a_node_with_a_free_cluster_over_a_fragmented_best_fit(tmp_path):
    """Node 0 fragmented (one free core in each of 3 clusters, fewest free cores: the best
    fit), other nodes with whole free clusters: a 2-vCPU dedicated VM goes whole into one
    cluster elsewhere instead of being split on node 0."""
    from cna_agent.host.topology import probe_topology

    topo = probe_topology(str(FIXTURES / "kunpeng920-2s"))
    planner = Planner(topo)
    node0 = [c for c in planner.cores if c.node == 0]
    groups: dict[tuple, list] = {}
    for core in node0:
        groups.setdefault(core.group, []).append(core)
    keep = {cores[0].threads[0] for cores in list(groups.values())[:3]}  # one free core in 3 clusters
    filler = tuple(t for c in node0 for t in c.threads if t not in keep)
    placed = [Placement("filler", True, filler, {0: 1024})]
    vm = planner.plan(VmRequest("small", 2, 1024, dedicated=True), placed)
    assert len({c.group for c in planner.cores if set(c.threads) & set(vm.owned_cpus)}) == 1
    assert vm.plan.memory_nodes != (0,)


def test_dedicated_vm_does_not_take_the_last_shared_cpu_of_a_node_with_shared_vms():
    """Two nodes of one CPU each (found by hypothesis): a shared VM floats on node 0; a
    dedicated VM must go to node 1 rather than push the shared VM's vCPU off its memory node."""
    from cna_agent.host.topology import CpuInfo, HostTopology, NumaNode

    cpus = tuple(CpuInfo(i, True, 0, 0, i, i, i, (i,)) for i in range(2))
    nodes = tuple(NumaNode(i, (i,), 4 << 20, 4 << 20, (10, 12) if i == 0 else (12, 10), ()) for i in range(2))
    topo = HostTopology("x86_64", "GenuineIntel", "synthetic", None, "vmx", 1, 1, 2, 1, 1, cpus, (0, 1), nodes, (), (), 8 << 20)
    planner = Planner(topo, node_reserve_mib=0)
    shared = planner.plan(VmRequest("shared", 1, 64), [])
    assert shared.plan.memory_nodes == (0,)
    ded = planner.plan(VmRequest("ded", 1, 64, dedicated=True), [shared])
    assert ded.plan.memory_nodes == (1,) and ded.owned_cpus == (1,)
    assert planner.current_plans([shared, ded])["shared"].vcpu_pins[0] == (0,)
