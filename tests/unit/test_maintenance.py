"""Maintenance mode and host evacuation, without daemons: the real operation runner and state
database, a stand-in for compute's migrations (each move an operation of the runner that
succeeds, fails or hangs as the test says) and for the VM inventory.

What is judged: the destination each VM is given (least-loaded by RAM), that at most
max_parallel moves run at once, the per-VM report (outcome, reason, the VM's own operation),
progress = VMs done / total, cancel (no new moves, running ones cancelled, the host stays in
maintenance), the mode and report surviving a restart, and the refusals of compute's create,
start and incoming preparation while the mode is on.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from types import SimpleNamespace

import pytest

from cna_agent.compute import state as st
from cna_agent.compute.evacuation import HostEvacuation, check_destinations, evacuation_order, pick_destination
from cna_agent.compute.maintenance import (CANCELLED, MOVED, NOT_MOVED, PENDING, EvacuatedVm, EvacuationReport,
                                           MaintenanceMode)
from cna_agent.compute.migration import MigrationPolicy
from cna_agent.compute.spec import VmSpec
from cna_agent.compute.spec_validation import ValidationContext
from cna_agent.errors import Aborted, FailedPrecondition, InvalidArgument, ResourceBusy, Unavailable
from cna_agent.operations import OperationRunner
from cna_agent.state.eventlog import EventHub, EventLog
from cna_agent.state.journal import OperationJournal
from cna_agent.state.store import StateStore

D1, D2, D3 = "10.0.0.1:7001", "10.0.0.2:7001", "10.0.0.3:7001"


# -- pure planning ----------------------------------------------------------------------------


@pytest.mark.parametrize("dests, field", [
    (["nowhere"], "destinations[0]"),
    ([D1, "http://x:1/"], "destinations[1]"),
    ([D1, "a b:1"], "destinations[1]"),
    ([D1, "h:0"], "destinations[1]"),
    ([D1, D1], "destinations[1]"),
    ([f"h{i}:1" for i in range(17)], "destinations"),
])
def test_bad_destinations_are_refused_naming_the_entry(dests, field) -> None:
    with pytest.raises(InvalidArgument) as err:
        check_destinations(dests)
    assert err.value.field == field


def test_least_loaded_destination_ties_to_the_order_given() -> None:
    assert pick_destination([D1, D2], {}, set()) == D1
    assert pick_destination([D1, D2], {D1: 512}, set()) == D2
    assert pick_destination([D1, D2], {D1: 512, D2: 512}, set()) == D1
    assert pick_destination([D1, D2], {D1: 2048, D2: 256}, {D2}) == D1
    assert pick_destination([D1, D2], {}, {D1, D2}) is None


def test_running_vms_go_first_largest_first() -> None:
    vms = [EvacuatedVm("1", "small", st.RUNNING, 128), EvacuatedVm("2", "off", st.STOPPED, 4096),
           EvacuatedVm("3", "big", st.RUNNING, 2048), EvacuatedVm("4", "paused", st.PAUSED, 512)]
    assert [v.name for v in evacuation_order(vms)] == ["big", "paused", "small", "off"]


# -- the drain against the real runner --------------------------------------------------------


@dataclass
class FakeVm:
    uuid: str
    name: str
    state: str
    memory_mib: int = 256
    managed: bool = True
    hibernated: object = None

    @property
    def spec(self):
        return SimpleNamespace(memory_mib=self.memory_mib) if self.managed else None


class FakeInventory:
    def __init__(self, vms: list[FakeVm]) -> None:
        self.vms = vms

    async def list(self, **kw):
        return list(self.vms)


class FakeMigrations:
    """compute's VmMigrations as the evacuation sees it: each accepted move is a "vm.migrate"
    operation of the real runner. ``behaviour(vm, destination)`` -> "ok" | "fail" | "hang" |
    "unreachable", or an AgentError to raise at once (a refusal by migrate)."""

    def __init__(self, runner: OperationRunner, inventory: FakeInventory, behaviour, max_outgoing: int = 2) -> None:
        self.runner, self.inventory, self.behaviour = runner, inventory, behaviour
        self.max_outgoing = max_outgoing
        self.calls: list[tuple[str, str]] = []
        self.active = 0
        self.peak = 0

    async def migrate(self, ref, destination, policy, *, request_id="", fingerprint=""):
        vm = next(v for v in self.inventory.vms if v.uuid == ref)
        self.calls.append((vm.name, destination))
        what = self.behaviour(vm, destination)
        if isinstance(what, Exception):
            raise what

        async def work(op):
            self.active += 1
            self.peak = max(self.peak, self.active)
            try:
                await op.progress(50, "migrating")
                if what == "hang":
                    await asyncio.sleep(3600)
                await asyncio.sleep(0.05)
                if what == "fail":
                    raise Aborted("libvirt's migration job failed: no route")
                if what == "unreachable":
                    raise Unavailable(f"destination {destination}: connection refused")
                if what == "left-but-failed":
                    self.inventory.vms.remove(vm)
                    raise Unavailable("libvirt's job completed but the destination agent did not confirm it")
                self.inventory.vms.remove(vm)
                return None
            finally:
                self.active -= 1

        return await self.runner.submit("vm.migrate", vm.uuid, work, lock_key=f"vm/{vm.uuid}", cancellable=True)


def _world(tmp_path, vms, behaviour, *, max_parallel=2):
    store = StateStore(tmp_path / "agent.db")
    runner = OperationRunner(store, OperationJournal(store), EventHub(store, EventLog(store)),
                             encode=lambda kind, result: ("google.protobuf.Empty", b""))
    inv = FakeInventory(vms)
    mig = FakeMigrations(runner, inv, behaviour, max_outgoing=max_parallel)
    mode = MaintenanceMode(store)
    evac = HostEvacuation(mode, mig, inv, runner, events=runner._events, busy_retry_s=0.01, busy_give_up_s=5)
    return store, runner, mode, mig, evac


async def _finish(runner: OperationRunner, op_id: str):
    seen = []
    async for rec in runner.watch(op_id):
        seen.append(rec)
    return seen


def _by_name(report: EvacuationReport) -> dict[str, EvacuatedVm]:
    return {v.name: v for v in report.vms}


def test_three_vms_drain_spread_by_ram_within_the_limit_and_stopped_ones_are_reported(tmp_path) -> None:
    vms = [FakeVm("u1", "big", st.RUNNING, 1024), FakeVm("u2", "mid", st.RUNNING, 512), FakeVm("u3", "small", st.RUNNING, 256),
           FakeVm("u4", "off", st.STOPPED, 128), FakeVm("u5", "foreign", st.RUNNING, managed=False),
           FakeVm("u6", "asleep", st.HIBERNATED, 128, hibernated=SimpleNamespace(datastore="shared"))]

    def behaviour(vm, dest):
        if vm.state == st.STOPPED:
            return FailedPrecondition("vm 'off' is not running; live migration moves running VMs", field="vm")
        return "ok"

    async def scenario():
        store, runner, mode, mig, evac = _world(tmp_path, vms, behaviour, max_parallel=2)
        rec = await evac.set_maintenance(True, [D1, D2], MigrationPolicy())
        assert rec.kind == "host.evacuate" and mode.enabled
        seen = await _finish(runner, rec.id)
        return mode, mig, seen, evac.status()

    mode, mig, seen, status = asyncio.run(scenario())
    assert seen[-1].state == "succeeded"
    percents = [r.percent for r in seen if r.percent >= 0]
    assert percents == sorted(percents) and percents[-1] == 100
    report = status.last_report
    lines = _by_name(report)
    # big -> D1, mid -> D2 (D1 has 1024), small -> D2 (512 < 1024)
    assert (lines["big"].outcome, lines["big"].destination) == (MOVED, D1)
    assert (lines["mid"].outcome, lines["mid"].destination) == (MOVED, D2)
    assert (lines["small"].outcome, lines["small"].destination) == (MOVED, D2)
    assert lines["off"].outcome == NOT_MOVED and "not running" in lines["off"].error
    assert lines["foreign"].outcome == NOT_MOVED and "not created by cna-agent" in lines["foreign"].error
    assert lines["asleep"].outcome == NOT_MOVED and "hibernated on datastore 'shared'" in lines["asleep"].error
    assert [c for c in mig.calls if c[0] in ("off", "foreign", "asleep")] == [("off", D2)]  # a refusal by migrate is not retried elsewhere
    assert all(lines[n].operation_id and lines[n].operation_kind == "vm.migrate" for n in ("big", "mid", "small"))
    assert mig.peak <= 2
    assert (report.moved, report.not_moved, report.complete) == (3, 3, False)
    assert status.enabled and status.destinations == (D1, D2) and not status.evacuation_operation_id


def test_a_vm_that_fails_on_one_destination_is_tried_on_the_next_and_an_unreachable_one_is_dropped(tmp_path) -> None:
    vms = [FakeVm("u1", "a", st.RUNNING, 512), FakeVm("u2", "b", st.RUNNING, 256), FakeVm("u3", "c", st.RUNNING, 128)]

    def behaviour(vm, dest):
        if dest == D1:
            return "unreachable"
        if dest == D2 and vm.name == "a":
            return "fail"
        return "ok"

    async def scenario():
        store, runner, mode, mig, evac = _world(tmp_path, vms, behaviour, max_parallel=1)
        rec = await evac.set_maintenance(True, [D1, D2, D3], MigrationPolicy())
        await _finish(runner, rec.id)
        return mig, mode.report

    mig, report = asyncio.run(scenario())
    lines = _by_name(report)
    assert (lines["a"].outcome, lines["a"].destination) == (MOVED, D3)
    assert [x.split(": ", 1)[0] for x in lines["a"].attempts] == [D1, D2, D3]
    assert "connection refused" in lines["a"].attempts[0] and "no route" in lines["a"].attempts[1]
    assert all(dest != D1 for name, dest in mig.calls if name != "a")  # D1 dropped after it was unreachable
    assert report.complete


def test_every_destination_failing_leaves_the_vm_here_with_each_reason(tmp_path) -> None:
    vms = [FakeVm("u1", "a", st.RUNNING)]

    async def scenario():
        store, runner, mode, mig, evac = _world(tmp_path, vms, lambda vm, dest: "fail")
        rec = await evac.set_maintenance(True, [D1, D2], MigrationPolicy())
        seen = await _finish(runner, rec.id)
        return seen[-1], mode.report

    last, report = asyncio.run(scenario())
    assert last.state == "succeeded"  # the evacuation ran; the report says what did not move
    line = report.vms[0]
    assert line.outcome == NOT_MOVED and line.error.startswith(D2) and len(line.attempts) == 2
    assert not report.complete and vms[0] in vms


def test_busy_outgoing_slots_are_waited_for_not_reported(tmp_path) -> None:
    vms = [FakeVm("u1", "a", st.RUNNING)]
    refusals = [ResourceBusy("2 outgoing migrations already run on this host (limit 2)", field="vm")] * 3

    def behaviour(vm, dest):
        return refusals.pop() if refusals else "ok"

    async def scenario():
        store, runner, mode, mig, evac = _world(tmp_path, vms, behaviour)
        rec = await evac.set_maintenance(True, [D1], MigrationPolicy())
        await _finish(runner, rec.id)
        return mig, mode.report

    mig, report = asyncio.run(scenario())
    assert report.vms[0].outcome == MOVED and len(mig.calls) == 4


def test_cancel_stops_new_moves_cancels_running_ones_and_keeps_maintenance_on(tmp_path) -> None:
    vms = [FakeVm(f"u{i}", f"vm{i}", st.RUNNING, 1024 - i) for i in range(4)]

    async def scenario():
        store, runner, mode, mig, evac = _world(tmp_path, vms, lambda vm, dest: "hang", max_parallel=2)
        rec = await evac.set_maintenance(True, [D1, D2], MigrationPolicy())
        for _ in range(200):
            if mig.active == 2:
                break
            await asyncio.sleep(0.01)
        assert evac.status().evacuation_operation_id == rec.id
        with pytest.raises(ResourceBusy):  # one evacuation at a time
            await evac.set_maintenance(True, [D1], MigrationPolicy())
        done = await runner.cancel(rec.id)
        ops = await runner.list(kinds=("vm.migrate",))
        return done, ops, mig, mode, evac.status()

    done, ops, mig, mode, status = asyncio.run(scenario())
    assert done.state == "cancelled"
    assert len(mig.calls) == 2 and all(o.state == "cancelled" for o in ops)
    outcomes = sorted(v.outcome for v in status.last_report.vms)
    assert outcomes == [CANCELLED] * 4 and all(v.error for v in status.last_report.vms)
    assert mode.enabled and not status.evacuation_operation_id and status.last_report.end_time is not None


def test_off_cancels_a_running_evacuation_and_lifts_the_refusals(tmp_path) -> None:
    vms = [FakeVm("u1", "a", st.RUNNING)]

    async def scenario():
        store, runner, mode, mig, evac = _world(tmp_path, vms, lambda vm, dest: "hang")
        rec = await evac.set_maintenance(True, [D1], MigrationPolicy())
        with pytest.raises(FailedPrecondition) as err:
            mode.check_admission("new VMs", field="spec")
        off = await evac.set_maintenance(False, [], MigrationPolicy())
        mode.check_admission("new VMs", field="spec")  # no longer raises
        events = await runner._events.list(types=["host.maintenance"])
        return err.value, off, await runner.get(rec.id), mode.report, events

    err, off, evac_op, report, events = asyncio.run(scenario())
    assert [e.attributes["enabled"] for e in events] == ["true", "false"] and D1 in events[0].message
    assert "maintenance" in err.message and err.field == "spec"
    assert off.kind == "host.maintenance.exit" and off.state == "succeeded"
    assert evac_op.state == "cancelled" and report.vms[0].outcome == CANCELLED


def test_mode_and_report_survive_a_restart(tmp_path) -> None:
    async def first():
        store = StateStore(tmp_path / "agent.db")
        mode = MaintenanceMode(store)
        await mode.set(True, (D1,))
        report = EvacuationReport("op-1", 1.0, vms=[EvacuatedVm("u1", "a", st.RUNNING, destination=D1, outcome=MOVED),
                                                    EvacuatedVm("u2", "b", st.RUNNING, operation_id="op-2"),
                                                    EvacuatedVm("u3", "c", st.STOPPED)])
        await mode.save_report(report)
        store.close()

    async def second():
        store = StateStore(tmp_path / "agent.db")
        mode = MaintenanceMode(store)
        await mode.load()
        return mode

    asyncio.run(first())
    mode = asyncio.run(second())
    assert mode.enabled and mode.state.destinations == (D1,) and mode.state.since
    with pytest.raises(FailedPrecondition):
        mode.check_admission("incoming migrations", field="destination")
    lines = _by_name(mode.report)
    assert lines["a"].outcome == MOVED
    assert lines["b"].outcome == NOT_MOVED and "op-2" in lines["b"].error
    assert lines["c"].outcome == NOT_MOVED and "before this VM's move started" in lines["c"].error
    assert mode.report.end_time is not None and PENDING not in {v.outcome for v in mode.report.vms}


def test_no_destinations_only_refuses_new_vms(tmp_path) -> None:
    vms = [FakeVm("u1", "a", st.RUNNING)]

    async def scenario():
        store, runner, mode, mig, evac = _world(tmp_path, vms, lambda vm, dest: "ok")
        rec = await evac.set_maintenance(True, [], MigrationPolicy())
        await _finish(runner, rec.id)
        return mig, mode

    mig, mode = asyncio.run(scenario())
    assert not mig.calls and mode.enabled
    assert mode.report.vms[0].outcome == NOT_MOVED and "no destination" in mode.report.vms[0].error


def test_bad_input_changes_nothing(tmp_path) -> None:
    async def scenario():
        store, runner, mode, mig, evac = _world(tmp_path, [], lambda vm, dest: "ok")
        with pytest.raises(InvalidArgument) as e1:
            await evac.set_maintenance(True, ["x"], MigrationPolicy())
        with pytest.raises(InvalidArgument) as e2:
            await evac.set_maintenance(True, [D1], MigrationPolicy(completion_action="explode"))
        return e1.value, e2.value, mode.enabled, await runner.list()

    e1, e2, enabled, ops = asyncio.run(scenario())
    assert e1.field == "destinations[0]" and e2.field == "policy.completion_action"
    assert not enabled and not ops


# -- compute's refusals while the mode is on ------------------------------------------------


class _On:
    def check_admission(self, what: str, *, field: str) -> None:
        raise FailedPrecondition(f"this host is in maintenance mode and refuses {what}", field=field)


def _renderer():
    return SimpleNamespace(validation=lambda have_placer: ValidationContext(host_arch="x86_64", virt_type="qemu", host_cpus=2))


def test_create_and_start_of_a_stopped_vm_are_refused_and_a_running_one_is_not() -> None:
    from cna_agent.compute.lifecycle import VmLifecycle

    states = {"u-off": st.STOPPED, "u-on": st.RUNNING}
    submitted = []

    async def lookup_uuid(ref, **_kw):
        return ref, f"name-{ref}"

    async def state(uuid):
        return states[uuid]

    async def submit(kind, uuid, work, **kw):
        submitted.append((kind, uuid))
        return "op"

    inv = SimpleNamespace(lookup_uuid=lookup_uuid, state=state)
    ops = SimpleNamespace(hv=None, inventory=inv, submit=submit)
    life = VmLifecycle(ops, SimpleNamespace(placer=None), _renderer(), None, admission=_On())

    async def scenario():
        with pytest.raises(FailedPrecondition) as create:
            await life.create(VmSpec(name="new-vm", vcpus=1, memory_mib=128))
        with pytest.raises(FailedPrecondition) as start:
            await life.start_vm("u-off")
        await life.start_vm("u-on")  # already running: nothing new lands on the host
        return create.value, start.value

    create, start = asyncio.run(scenario())
    assert "maintenance" in create.message and create.field == "spec"
    assert "maintenance" in start.message and "name-u-off" in start.message and start.field == "vm"
    assert submitted == [("vm.start", "u-on")]


def test_incoming_migration_is_refused_before_anything_is_claimed() -> None:
    from cna_agent.compute.migration_incoming import IncomingMigrations

    claimed = []

    async def bindings(spec):
        claimed.append(spec.uuid)

    binder = SimpleNamespace(placer=None, bindings=bindings)
    ops = SimpleNamespace(hv=None)
    incoming = IncomingMigrations(ops, binder, _renderer(), libvirt_uri="qemu+tcp://x/system", admission=_On())
    spec = VmSpec(name="arriving", uuid="0b5c2f8e-3d41-4a9b-8c7e-6f5a4b3c2d99", vcpus=1, memory_mib=128)

    async def scenario():
        with pytest.raises(FailedPrecondition) as err:
            await incoming.prepare("mig-1", spec, "<domain/>")
        return err.value

    err = asyncio.run(scenario())
    assert "maintenance" in err.message and err.field == "destination"
    assert not claimed and not incoming.pending()


def test_the_report_and_status_are_the_operations_declared_responses() -> None:
    from cna_agent.api import pb
    from cna_agent.api.results import encode_result
    from cna_agent.compute.maintenance import MaintenanceStatus

    report = EvacuationReport("op-1", 10.0, 12.5, vms=[
        EvacuatedVm("u1", "a", st.RUNNING, destination=D1, outcome=MOVED, operation_id="op-2", operation_kind="vm.migrate",
                     attempts=[f"{D1}: moved"], duration_ms=2500),
        EvacuatedVm("u2", "b", st.STOPPED, outcome=NOT_MOVED, error="not running")])
    kind, body = encode_result("host.evacuate", report)
    msg = pb.host_pb2.EvacuationReport.FromString(body)
    assert kind == "cna.v1.EvacuationReport" and (msg.moved, msg.not_moved, msg.complete) == (1, 1, False)
    assert [(v.vm_name, v.outcome, v.destination, v.error) for v in msg.vms] == [
        ("a", pb.host_pb2.EVACUATION_OUTCOME_MOVED, D1, ""), ("b", pb.host_pb2.EVACUATION_OUTCOME_NOT_MOVED, "", "not running")]
    assert msg.vms[0].attempts == [f"{D1}: moved"] and msg.end_time.seconds == 12
    kind, body = encode_result("host.maintenance.exit", MaintenanceStatus(False, None, (), "", report))
    status = pb.host_pb2.MaintenanceStatus.FromString(body)
    assert kind == "cna.v1.MaintenanceStatus" and not status.enabled and status.last_report.operation_id == "op-1"


def test_a_vm_whose_operation_failed_after_it_left_is_reported_moved_and_not_retried(tmp_path) -> None:
    vms = [FakeVm("u1", "a", st.RUNNING)]

    async def scenario():
        store, runner, mode, mig, evac = _world(tmp_path, vms, lambda vm, dest: "left-but-failed")
        rec = await evac.set_maintenance(True, [D1, D2], MigrationPolicy())
        await _finish(runner, rec.id)
        return mig, mode.report

    mig, report = asyncio.run(scenario())
    line = report.vms[0]
    assert mig.calls == [("a", D1)] and (line.outcome, line.destination) == (MOVED, D1)
    assert "no longer defined on this host" in line.error and "did not confirm" in line.error
