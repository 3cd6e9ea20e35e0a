"""The drift monitor on a real process: a spawned child whose threads are named as QEMU names
them ("CPU 0/TCG" = vCPU 0), a real HostPlacer + StateStore + EventHub, plans from the planner
on the recorded tree of this machine's shape. Affinity is checked from /proc. No daemons."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from cna_agent.contracts import PlacementPlan
from cna_agent.errors import InvalidArgument, NotFound
from cna_agent.host import affinity
from cna_agent.host.drift import PlacementMonitor, classify, host_report, inspect, planned_cpus
from cna_agent.host.placement import Planner
from cna_agent.host.placer import HostPlacer
from cna_agent.host.topology import probe_topology
from cna_agent.state.eventlog import EventHub, EventLog
from cna_agent.state.store import StateStore
from support.procs import Child, proc_allowed, proc_tids

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "sysfs"
pytestmark = pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2 or not affinity.native_available(),
                                reason="needs 2 usable CPUs and the native extension")


def test_thread_roles_from_qemu_thread_names():
    assert classify("CPU 3/KVM") == ("vcpu", 3)
    assert classify("CPU 0/TCG") == ("vcpu", 0)
    assert classify("IO iothread1") == ("iothread", 1)
    assert classify("qemu-system-x86") == ("emulator", -1)
    assert classify("IO mon_iothread") == ("emulator", -1)
    plan = PlacementPlan(vcpu_pins={0: (1,)}, emulator_cpus=(0,), iothread_cpus={})
    assert planned_cpus(plan, "vcpu", 0) == (1,)
    assert planned_cpus(plan, "vcpu", 5) == ()  # not planned: never called drift
    assert planned_cpus(plan, "iothread", 1) == (0,)  # no own pin: with the emulator


def _setup(tmp_path: Path):
    store = StateStore(tmp_path / "agent.db")
    events = EventHub(store, EventLog(store))
    placer = HostPlacer(Planner(probe_topology(str(FIXTURES / "this-vm-x86_64"))), store)
    return store, events, placer


def test_drift_is_reported_once_repaired_and_reported_again_after_a_manual_repin(tmp_path):
    async def scenario() -> None:
        store, events, placer = _setup(tmp_path)
        child = Child(threads=2)
        try:
            await placer.load()
            plan = await placer.plan("vm-a", 1, 128, dedicated=True, hugepages=False, numa_cells=0)
            (vcpu_cpu,) = plan.vcpu_pins[0]
            emulator = tuple(plan.emulator_cpus)
            assert vcpu_cpu not in emulator

            async def locate(uuid: str) -> tuple[str, str, int]:
                return "a", "running", child.pid

            monitor = PlacementMonitor(placer, events, locate, interval_s=0, repair=False)
            vcpu0 = child.workers[0]  # worker i is named "CPU i/TCG"
            # The child starts unpinned: its vCPU thread may run anywhere -> drift.
            (view,) = await monitor.report()
            assert view.pid == child.pid and view.drift
            roles = {t.tid: (t.role, t.index) for t in view.threads}
            assert roles[vcpu0] == ("vcpu", 0) and roles[child.pid] == ("emulator", -1)
            assert set(roles) == set(proc_tids(child.pid))

            start = await events.last_sequence()
            await monitor.check_once()
            await monitor.check_once()  # unchanged drift is not re-published
            drift_events = [e for e in await events.list(start) if e.type == "placement.drift"]
            assert len(drift_events) == 1 and drift_events[0].resource_id == "vm-a"
            assert "CPU 0/TCG" in drift_events[0].message
            assert proc_allowed(child.pid, vcpu0) != (vcpu_cpu,)  # report only: nothing moved

            monitor.repair = True
            await monitor.check_once()
            assert proc_allowed(child.pid, vcpu0) == (vcpu_cpu,)
            assert proc_allowed(child.pid, child.pid) == emulator
            # vCPU 1 has no planned pin (1-vCPU plan): it is an unplanned vCPU, flagged, not moved.
            assert any(e.type == "placement.repaired" for e in await events.list(start))

            seq = await events.last_sequence()
            (view,) = await monitor.report()
            assert not any(t.drifted for t in view.threads)
            await monitor.check_once()
            assert [e.type for e in await events.list(seq)] == []  # clean (thread-wise) and quiet

            # Someone re-pins the vCPU by hand (a live re-pin through the native batch call).
            assert affinity.set_affinity({vcpu0: emulator}) == {}
            assert proc_allowed(child.pid, vcpu0) == emulator
            await monitor.check_once()
            types = [e.type for e in await events.list(seq)]
            assert types[:2] == ["placement.drift", "placement.repaired"], types
            assert proc_allowed(child.pid, vcpu0) == (vcpu_cpu,)
        finally:
            child.close()
            store.close()

    asyncio.run(scenario())


def test_unplanned_vcpu_threads_are_flagged():
    child = Child(threads=2)  # "CPU 0/TCG" and "CPU 1/TCG"
    try:
        plan = PlacementPlan(vcpu_pins={0: (0,)}, emulator_cpus=(1,))
        view = inspect("u", "n", "running", child.pid, plan)
        assert any("have no planned pin" in d and "[1]" in d for d in view.drift), view.drift
    finally:
        child.close()


def test_memory_on_an_unplanned_node_is_drift_and_on_the_planned_node_is_not():
    child = Child(threads=1, alloc_mib=96)
    try:
        here = sorted(affinity.numa_memory_kib(child.pid))
        cpus = tuple(sorted(os.sched_getaffinity(child.pid)))
        ok = inspect("u", "n", "running", child.pid, PlacementPlan(emulator_cpus=cpus, memory_nodes=tuple(here)))
        assert not [d for d in ok.drift if d.startswith("memory")]
        elsewhere = max(here) + 1
        bad = inspect("u", "n", "running", child.pid, PlacementPlan(emulator_cpus=cpus, memory_nodes=(elsewhere,)))
        (reason,) = [d for d in bad.drift if d.startswith("memory")]
        assert f"node {here[0]}:" in reason and sum(bad.memory_kib.values()) >= 96 * 1024
    finally:
        child.close()


def test_report_names_missing_vms_and_validates_the_vm_argument(tmp_path):
    async def scenario() -> None:
        store, events, placer = _setup(tmp_path)
        try:
            await placer.load()
            await placer.plan("vm-gone", 1, 128, dedicated=True, hugepages=False, numa_cells=0)

            async def locate(uuid: str) -> tuple[str, str, int]:
                raise LookupError(uuid)

            monitor = PlacementMonitor(placer, events, locate, interval_s=0)
            report = await host_report(monitor)
            (view,) = report.vms
            assert (view.uuid, view.state, view.pid, view.threads) == ("vm-gone", "missing", 0, ())
            owned = {c for pins in view.plan.vcpu_pins.values() for c in pins}
            assert not owned & set(report.shared_cpus)
            with pytest.raises(NotFound):
                await host_report(monitor, "no-such-vm")
            with pytest.raises(InvalidArgument) as exc:
                await host_report(monitor, "bad\nname")
            assert exc.value.fields[0][0] == "vm"
        finally:
            store.close()

    asyncio.run(scenario())
