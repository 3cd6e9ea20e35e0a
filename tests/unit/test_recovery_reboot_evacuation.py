"""Recovery of the operation kinds whose effect leaves little in libvirt's state: a reboot (only
libvirt's reboot event, kept in the event log, or a reset libvirt answered), an evacuation and
maintenance off (the persisted mode and report, and which VMs are still here), and a datastore
rescan (a read: nothing to undo). Each is cut short for real: the operation is left open in the
state database the way a SIGKILLed agent leaves it (the process's runner is abandoned, not shut
down), and a new runner on the same database closes it through the handler, as at start-up.
The reboot cases run on libvirt's test:///default driver (a real driver, in memory)."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal
from types import SimpleNamespace

import libvirt

from cna_agent.compute import state as st
from cna_agent.compute.evacuation import HostEvacuation
from cna_agent.compute.inventory import VmInfo, VmInventory
from cna_agent.compute.maintenance import MaintenanceMode
from cna_agent.compute.migration import MigrationPolicy
from cna_agent.compute.recovery import VmRecovery
from cna_agent.errors import CODES
from cna_agent.operations import OperationRunner, ResourceLocks
from cna_agent.state.eventlog import EventHub, EventLog
from cna_agent.state.journal import OperationError, OperationJournal
from cna_agent.state.store import StateStore
from support.libvirt import ConnHypervisor
from test_maintenance import D1, FakeInventory, FakeMigrations, FakeVm


def _runner(store: StateStore) -> OperationRunner:
    return OperationRunner(store, OperationJournal(store), EventHub(store, EventLog(store)),
                           encode=lambda kind, result: ("google.protobuf.Empty", b""))


def _aborted(outcome, *words: str) -> None:
    assert isinstance(outcome, OperationError) and outcome.code == CODES["ABORTED"], outcome
    for w in words:
        assert w in outcome.message, outcome.message


# -- vm.reboot ----------------------------------------------------------------------------------


def test_a_reboot_is_done_only_when_a_reboot_event_or_an_answered_reset_shows_it(tmp_path) -> None:
    conn = libvirt.open("test:///default")
    dom = conn.lookupByName("test")
    uuid = dom.UUIDString()
    store = StateStore(tmp_path / "agent.db")
    hub = EventHub(store, EventLog(store))
    hv = ConnHypervisor(conn)
    rec = VmRecovery(hv, VmInventory(hv, ResourceLocks()), hub)  # type: ignore[arg-type]

    def record(created: float, **meta: str):
        return SimpleNamespace(target=uuid, create_time=created, metadata=meta)

    async def run() -> None:
        _aborted(await rec.recover_reboot(record(0.0)), "before libvirt was seen to take the reboot", "the VM runs")
        soft = record(0.0, hard="false", asked_at="1.0")
        _aborted(await rec.recover_reboot(soft), "power button was pressed", "no reboot was seen")
        assert isinstance(await rec.recover_reboot(record(0.0, hard="true", asked_at="1.0")), VmInfo)
        # libvirt's reboot event, as compute/events.py records it: now the soft one is done too
        await hub.publish("vm.reboot", resource_kind="vm", resource_id=uuid, resource_name="test", message="test: guest rebooted")
        assert isinstance(await rec.recover_reboot(soft), VmInfo)
        # an event from before the request does not count
        later = record(10 ** 10, hard="false", asked_at="1.0")
        _aborted(await rec.recover_reboot(later), "no reboot was seen")
        dom.destroy()
        _aborted(await rec.recover_reboot(soft), "shows the VM defined and stopped")

    try:
        asyncio.run(run())
    finally:
        store.close()
        conn.close()


# -- host.evacuate and host.maintenance.exit -----------------------------------------------------


def _world(store: StateStore, vms: list[FakeVm], behaviour):
    runner = _runner(store)
    inv = FakeInventory(vms)
    mode = MaintenanceMode(store)
    evac = HostEvacuation(mode, FakeMigrations(runner, inv, behaviour), inv, runner, events=runner._events,
                          busy_retry_s=0.01, busy_give_up_s=5)
    return runner, mode, evac


def test_an_evacuation_cut_short_ends_aborted_saying_how_far_it_got_and_what_is_still_here(tmp_path) -> None:
    vms = [FakeVm("u1", "quick", st.RUNNING, 1024), FakeVm("u2", "stuck", st.RUNNING, 512)]

    def crash() -> None:  # in a child process, SIGKILLed mid-evacuation like the agent
        async def scenario() -> None:
            store = StateStore(tmp_path / "agent.db")
            runner, mode, evac = _world(store, vms, lambda vm, dest: "hang" if vm.name == "stuck" else "ok")
            await evac.set_maintenance(True, [D1], MigrationPolicy())
            for _ in range(500):  # "quick" has moved, "stuck" hangs in its move
                if mode.report is not None and mode.report.moved == 1:
                    os.kill(os.getpid(), signal.SIGKILL)
                await asyncio.sleep(0.02)

        asyncio.run(scenario())

    child = multiprocessing.get_context("fork").Process(target=crash)
    child.start()
    child.join(60)
    assert child.exitcode == -signal.SIGKILL
    still_here = [v for v in vms if v.name == "stuck"]

    async def restart():
        store = StateStore(tmp_path / "agent.db")
        runner, mode, evac = _world(store, still_here, lambda vm, dest: "ok")
        await mode.load()
        closed = await runner.recover(evac.recovery_handlers())
        return {r.kind: r for r in closed}, mode

    closed, mode = asyncio.run(restart())
    done = closed["host.evacuate"]
    assert done.state == "failed" and done.error.code == CODES["ABORTED"]
    for words in ("1 of 2 VMs moved", "still on this host: stuck", "maintenance is still on", "nothing was redone"):
        assert words in done.error.message, done.error.message
    assert mode.enabled  # nothing was turned off behind the manager's back
    # the hung VM's own migration has no handler here: closed by the generic verdict
    assert closed["vm.migrate"].error.code == CODES["ABORTED"]


def test_maintenance_off_cut_short_is_done_exactly_when_the_persisted_mode_is_off(tmp_path) -> None:
    async def run():
        store = StateStore(tmp_path / "agent.db")
        runner, mode, evac = _world(store, [], lambda vm, dest: "ok")
        await mode.set(True, (D1,))
        record = SimpleNamespace(id="op-x", target="host", metadata={})
        still_on = await evac.recover_exit(record)
        await mode.set(False)
        now_off = await evac.recover_exit(record)
        store.close()
        return still_on, now_off

    still_on, now_off = asyncio.run(run())
    _aborted(still_on, "still on")
    assert not isinstance(now_off, OperationError) and now_off.enabled is False
