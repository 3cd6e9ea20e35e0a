"""The placement planner on the recorded Kunpeng 920 and FusionServer trees, and on
hypothesis-generated topologies and VM mixes (no daemons)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as stg

from cna_agent.errors import FailedPrecondition
from cna_agent.host.placement import Placement, Planner, VmRequest
from cna_agent.host.placer import HostPlacer
from cna_agent.host.topology import HostTopology, probe_topology
from cna_agent.state.store import StateStore
from support.placement import topologies, vm_requests

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "sysfs"


@pytest.fixture(scope="module")
def kunpeng() -> HostTopology:
    return probe_topology(str(FIXTURES / "kunpeng920-2s"))


@pytest.fixture(scope="module")
def xeon() -> HostTopology:
    return probe_topology(str(FIXTURES / "fusionserver-2s"))


def _cluster(topo: HostTopology, cpu: int) -> tuple[int, int, int]:
    c = topo.cpus[cpu]
    return (c.socket, c.die, c.cluster)


def test_kunpeng_small_vm_fits_one_cluster_and_skips_reserved(kunpeng):
    planner = Planner(kunpeng, reserved_cpus=[0, 1])
    a = planner.plan(VmRequest("a", 4, 4096, dedicated=True), [])
    pinned = [cpus[0] for cpus in a.plan.vcpu_pins.values()]
    assert len(set(pinned)) == 4 and not set(pinned) & {0, 1}
    assert len({_cluster(kunpeng, c) for c in pinned}) == 1  # one L3-tag cluster
    assert {kunpeng.cpus[c].node for c in pinned} == {0} and a.plan.memory_nodes == (0,)
    assert not set(a.plan.emulator_cpus) & set(pinned) and not set(a.plan.emulator_cpus) & {0, 1}
    # The partly reserved cluster (cores 2-3 free) is the best fit for a 2-vCPU VM.
    b = planner.plan(VmRequest("b", 2, 2048, dedicated=True), [a])
    assert sorted(c[0] for c in b.plan.vcpu_pins.values()) == [2, 3]


def test_kunpeng_large_dedicated_vm_spans_the_nearest_nodes_with_mirrored_cells(kunpeng):
    planner = Planner(kunpeng)
    big = planner.plan(VmRequest("big", 40, 65536, dedicated=True), [])
    assert len(big.plan.memory_nodes) == 2
    n0, n1 = big.plan.memory_nodes
    assert kunpeng.numa_nodes[n0].distances[n1] == min(d for i, d in enumerate(kunpeng.numa_nodes[n0].distances) if i != n0)
    assert [(c.host_node, len(c.vcpus), c.memory_mib) for c in big.plan.guest_cells] == [(n0, 20, 32768), (n1, 20, 32768)]
    for cell in big.plan.guest_cells:
        assert {kunpeng.cpus[big.plan.vcpu_pins[v][0]].node for v in cell.vcpus} == {cell.host_node}


def test_kunpeng_hugepages_use_the_trees_512m_pages(kunpeng):
    planner = Planner(kunpeng)
    vm = planner.plan(VmRequest("h", 2, 2048, hugepages=True), [])
    assert vm.plan.hugepage_kib == 524288
    (node, (size, count)), = vm.hugepages.items()
    assert size == 524288 and count == 4
    with pytest.raises(FailedPrecondition, match="hugepages"):
        planner.plan(VmRequest("h2", 2, 1000 * 1024, hugepages=True), [vm])


def test_xeon_dedicated_takes_whole_cores_and_isolates_the_odd_sibling(xeon):
    planner = Planner(xeon)
    vm = planner.plan(VmRequest("x", 3, 4096, dedicated=True), [])
    pinned = [c[0] for c in vm.plan.vcpu_pins.values()]
    cores = {(xeon.cpus[c].socket, xeon.cpus[c].core) for c in vm.owned_cpus}
    assert len(cores) == 2 and len(vm.owned_cpus) == 4 and set(pinned) <= set(vm.owned_cpus)
    other = planner.plan(VmRequest("y", 2, 4096, dedicated=True), [vm])
    assert not set(other.owned_cpus) & set(vm.owned_cpus)  # the spare sibling stays isolated


def test_refusal_names_the_resource(xeon):
    planner = Planner(xeon)
    with pytest.raises(FailedPrecondition, match="free whole cores"):
        planner.plan(VmRequest("z", 200, 4096, dedicated=True), [])
    with pytest.raises(FailedPrecondition, match="MiB of memory free"):
        planner.plan(VmRequest("m", 2, 10_000_000), [])


def test_shared_pins_follow_the_pool_when_dedicated_vms_arrive(xeon):
    planner = Planner(xeon, reserved_cpus=[0, 40])
    shared = planner.plan(VmRequest("s", 2, 2048), [])
    node = shared.plan.memory_nodes[0]
    ded = planner.plan(VmRequest("d", 4, 2048, dedicated=True, numa_cells=1), [shared])
    pins = planner.current_plans([shared, ded])["s"]
    for cpus in pins.vcpu_pins.values():
        assert not set(cpus) & set(ded.owned_cpus) and not set(cpus) & {0, 40}
        assert {xeon.cpus[c].node for c in cpus} == {node}


def test_placement_json_round_trips(kunpeng):
    vm = Planner(kunpeng).plan(VmRequest("r", 30, 30000, dedicated=True, hugepages=False), [])
    assert Placement.from_json(vm.to_json()) == vm


def test_host_placer_persists_and_is_idempotent(tmp_path, xeon):
    async def scenario():
        store = StateStore(tmp_path / "a.db")
        placer = HostPlacer(Planner(xeon), store)
        await placer.load()
        first = await placer.plan("vm-1", 4, 2048, dedicated=True, hugepages=False, numa_cells=0)
        again = await placer.plan("vm-1", 4, 2048, dedicated=True, hugepages=False, numa_cells=0)
        assert first == again
        store.close()
        store2 = StateStore(tmp_path / "a.db")
        restored = HostPlacer(Planner(xeon), store2)
        assert await restored.load() == 1
        assert restored.get("vm-1").plan == first
        other = await restored.plan("vm-2", 4, 2048, dedicated=True, hugepages=False, numa_cells=0)
        assert not {c[0] for c in other.vcpu_pins.values()} & {c[0] for c in first.vcpu_pins.values()}
        await restored.release("vm-1")
        assert restored.get("vm-1") is None
        store2.close()

    asyncio.run(scenario())


# -- properties on generated topologies (support/placement.py) ------------------------------------


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(topo=topologies(), reqs=vm_requests, reserve=stg.integers(0, 2))
def test_properties_no_double_booking_memory_within_nodes(topo, reqs, reserve):
    planner = Planner(topo, reserved_cpus=range(reserve), node_reserve_mib=256)
    placed: list[Placement] = []
    for i, (vcpus, mem, dedicated, huge) in enumerate(reqs):
        try:
            placed.append(planner.plan(VmRequest(f"vm{i}", vcpus, mem, dedicated=dedicated, hugepages=huge), placed))
        except FailedPrecondition:
            continue
        if i % 4 == 3 and placed:
            placed.pop(0)  # releases happen too
    owned: list[int] = [c for p in placed if p.dedicated for c in p.owned_cpus]
    assert len(owned) == len(set(owned)), "a dedicated CPU was booked twice"
    assert not set(owned) & set(range(reserve)), "a reserved CPU was given to a guest"
    current = planner.current_plans(placed)
    for p in placed:
        pinned = [c for cpus in p.plan.vcpu_pins.values() for c in cpus]
        now = current[p.uuid]
        # Floating threads never sit on anyone's dedicated CPU once re-derived, and always
        # have somewhere to run.
        assert not set(now.emulator_cpus) & set(owned)
        assert now.emulator_cpus
        if not p.dedicated:
            assert not {c for cpus in now.vcpu_pins.values() for c in cpus} & set(owned)
        if p.dedicated:
            assert set(pinned) <= set(p.owned_cpus) and len(set(pinned)) == len(pinned)
            # whole cores: every sibling of a pinned thread belongs to this VM
            for c in p.owned_cpus:
                assert set(topo.cpus[c].thread_siblings) <= set(p.owned_cpus)
        assert sum(p.memory_mib.values()) == reqs[int(p.uuid[2:])][1]
    for node in topo.numa_nodes:
        used = sum(p.memory_mib.get(node.id, 0) for p in placed)
        assert used <= planner.node_capacity_mib(node.id)
        pages = sum(cnt for p in placed for n, (size, cnt) in p.hugepages.items() if n == node.id)
        assert pages <= 512


@settings(max_examples=40, deadline=None)
@given(topo=topologies(), vcpus=stg.integers(1, 4))
def test_property_a_small_dedicated_vm_stays_in_one_cluster_when_one_has_room(topo, vcpus):
    planner = Planner(topo)
    tpc = topo.threads_per_core
    need_cores = -(-vcpus // tpc)
    if need_cores > topo.cores_per_cluster or need_cores * tpc >= len(topo.online_cpus):
        return  # too big for a cluster, or it would leave no CPU for its emulator threads
    vm = planner.plan(VmRequest("s", vcpus, 128, dedicated=True), [])
    assert len({_cluster(topo, c) for c in vm.owned_cpus}) == 1
    assert len(vm.plan.memory_nodes) == 1
