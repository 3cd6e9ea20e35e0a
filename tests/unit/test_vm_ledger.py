"""compute/ledger.py on a real state database: what changed while nobody watched becomes one
event per difference (libvirt's reason, the previous state), vanished VMs are reported once and
forgotten, unmanaged domains are not followed, and a second pass with nothing new is silent."""

from __future__ import annotations

import asyncio

from cna_agent.compute.ledger import Now, VmStateLedger
from cna_agent.state.eventlog import EventHub, EventLog
from cna_agent.state.store import StateStore


def _ledger(path, unmanaged=()) -> tuple[VmStateLedger, EventHub, StateStore]:
    store = StateStore(path)
    hub = EventHub(store, EventLog(store))

    async def managed(uuid: str) -> bool:
        return uuid not in unmanaged

    return VmStateLedger(store, hub, managed), hub, store


def test_differences_since_the_last_state_seen_become_events(tmp_path) -> None:
    async def scenario():
        ledger, hub, store = _ledger(tmp_path / "s.db", unmanaged={"u-hand"})
        await ledger.record("u-a", "a", "running", "booted")
        await ledger.record("u-b", "b", "stopped", "shutdown")
        await ledger.record("u-c", "c", "running", "booted")
        await ledger.record("u-d", "d", "running", "booted")
        await ledger.record("u-hand", "hand", "running", "booted")  # not ours: not recorded
        store.close()
        # a new process: the ledger is read back from the database
        ledger, hub, store = _ledger(tmp_path / "s.db")
        first = await ledger.compare([Now("u-a", "a", "stopped", "destroyed"), Now("u-b", "b", "running", "booted"),
                                      Now("u-d", "d", "running", "booted"), Now("u-new", "new", "running", "booted"),
                                      Now("u-hand", "hand", "stopped", "destroyed", managed=False)], observed="at start")
        events = [(e.type, e.resource_id, dict(e.attributes)) for e in await hub.list()]
        second = await ledger.compare([Now("u-a", "a", "stopped", "destroyed"), Now("u-b", "b", "running", "booted"),
                                       Now("u-d", "d", "running", "booted"), Now("u-new", "new", "running", "booted")],
                                      observed="at start")
        return first, events, second, await ledger.seen("u-c"), await ledger.seen("u-new")

    first, events, second, c_after, new_after = asyncio.run(scenario())
    assert first == 3 and second == 0
    by_vm = {vm: (kind, attrs) for kind, vm, attrs in events}
    assert set(by_vm) == {"u-a", "u-b", "u-c"}  # unchanged d, first-seen new, unmanaged hand: nothing
    assert by_vm["u-a"] == ("vm.lifecycle", {"state": "stopped", "reason": "destroyed", "previous_state": "running",
                                             "previous_reason": "booted", "observed": "at start"})
    assert by_vm["u-b"][1]["state"] == "running" and by_vm["u-b"][1]["previous_state"] == "stopped"
    assert by_vm["u-c"] == ("vm.vanished", {"previous_state": "running", "previous_reason": "booted", "observed": "at start"})
    assert c_after is None and new_after is not None and new_after.state == "running"


def test_a_deleted_vm_is_forgotten_without_an_event(tmp_path) -> None:
    async def scenario():
        ledger, hub, _ = _ledger(tmp_path / "s.db")
        await ledger.record("u-a", "a", "running", "booted")
        await ledger.record("u-a", "a", "deleted", "undefined")
        return await ledger.compare([], observed="after reconnect"), await hub.list()

    published, events = asyncio.run(scenario())
    assert published == 0 and events == []
