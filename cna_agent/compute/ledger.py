"""The last state the agent saw for each of its VMs, kept across restarts, so that what changed
while nobody watched becomes events.

Why: libvirt's lifecycle events reach only a connected client. A VM stopped, crashed, paused
on an I/O error, started by virsh or undefined while the agent was down (or while libvirtd was
restarting) produced no event, and the VRM kept believing the old state until its next full
listing. The ledger holds, per managed VM, the state and reason last published (the event
monitor records every lifecycle event it publishes). At start-up, after adoption, and after
every reconnect to libvirt, :meth:`VmStateLedger.compare` reads every VM's state now and
publishes one event per difference, with libvirt's own reason:

* ``vm.lifecycle`` with ``observed = "at start" | "after reconnect"`` and ``previous_state``,
  the same event type a live change produces, so a VRM needs nothing new to follow it;
* ``vm.vanished`` for a VM the ledger knew that libvirt no longer has (undefined outside the
  agent, or moved away while its agent was down), then the ledger forgets it.

A VM seen for the first time (an adoption, a ledger from before this existed) is recorded
without an event: there is no earlier state to differ from. Comparing is idempotent: a second
pass with nothing changed publishes nothing.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Awaitable, Callable, Iterable

from cna_agent.compute import state as st
from cna_agent.state.eventlog import EventHub
from cna_agent.state.store import StateStore

log = logging.getLogger(__name__)

KEY_PREFIX = "vm.seen."


@dataclass(frozen=True)
class Seen:
    """One VM as last seen: its name, state and reason (compute/state.py's words), and when."""

    name: str
    state: str
    reason: str
    time: float = 0.0

    def to_json(self) -> str:
        return json.dumps({"name": self.name, "state": self.state, "reason": self.reason, "time": self.time})

    @classmethod
    def from_json(cls, text: str) -> "Seen":
        d = json.loads(text)
        return cls(str(d.get("name", "")), str(d.get("state", "")), str(d.get("reason", "")), float(d.get("time", 0.0)))


@dataclass(frozen=True)
class Now:
    """A managed VM as libvirt shows it now (what compare() is given)."""

    uuid: str
    name: str
    state: str
    reason: str
    managed: bool = True


class VmStateLedger:
    """``managed(uuid)`` says whether the agent owns a VM (its cached definition): only those
    are followed; domains an admin defined by hand are left to the admin."""

    def __init__(self, store: StateStore, events: EventHub, managed: Callable[[str], Awaitable[bool]]) -> None:
        self.store = store
        self.events = events
        self._managed = managed
        self._seen: dict[str, Seen] | None = None

    async def _load(self) -> dict[str, Seen]:
        if self._seen is None:
            rows = await self.store.run(self.store.query, "SELECT key, value FROM kv WHERE key LIKE ?", (KEY_PREFIX + "%",))
            seen: dict[str, Seen] = {}
            for row in rows:
                try:
                    seen[row["key"][len(KEY_PREFIX):]] = Seen.from_json(row["value"])
                except (ValueError, TypeError):
                    log.warning("event=vm_ledger.unreadable key=%s", row["key"])
            self._seen = seen
        return self._seen

    async def seen(self, uuid: str) -> Seen | None:
        return (await self._load()).get(uuid)

    async def record(self, uuid: str, name: str, state: str, reason: str) -> None:
        """The state just published for ``uuid`` (a ``deleted`` state forgets the VM)."""
        await self.record_many([(uuid, name, state, reason)])

    async def record_many(self, states: Iterable[tuple[str, str, str, str]]) -> None:
        """The (uuid, name, state, reason) states just published, in order (a VM's last one
        counts), written in one transaction: the event monitor records a burst at once."""
        seen = await self._load()
        writes: dict[str, str | None] = {}
        for uuid, name, state, reason in states:
            if state == "deleted":
                if seen.pop(uuid, None) is not None:  # also when recorded earlier in this batch
                    writes[uuid] = None
                continue
            try:
                if not await self._managed(uuid):
                    continue
            except Exception:  # gone meanwhile, or libvirt away: the next compare catches up
                continue
            now = Seen(name, state, reason, time.time())
            old = seen.get(uuid)
            if old is not None and (old.name, old.state, old.reason) == (now.name, now.state, now.reason):
                continue
            seen[uuid] = now
            writes[uuid] = now.to_json()
        if writes:
            await self.store.run(self.store.transaction, lambda conn: _write(conn, list(writes.items())))

    async def compare(self, vms: Iterable[Now], *, observed: str) -> int:
        """Publish what changed since each VM was last seen (``observed``: "at start" or "after
        reconnect"), record the states now, and forget VMs that are gone; returns the number of
        events published. ``vms`` is every VM libvirt has now (unmanaged ones are not followed)."""
        seen = await self._load()
        present: dict[str, Now] = {v.uuid: v for v in vms}
        published = 0
        writes: list[tuple[str, str | None]] = []
        for uuid, now in present.items():
            old = seen.get(uuid)
            if not now.managed:
                if old is not None:
                    del seen[uuid]
                    writes.append((uuid, None))
                continue
            record = Seen(now.name, now.state, now.reason, time.time())
            if old is not None and old.state != now.state:
                await self.events.publish(
                    "vm.lifecycle", severity="error" if now.state == st.CRASHED else "warning",
                    resource_kind="vm", resource_id=uuid, resource_name=now.name,
                    message=f"{now.name}: {old.state} -> {now.state} ({now.reason}) while the agent was not watching "
                            f"(seen {observed})",
                    attributes={"state": now.state, "reason": now.reason, "previous_state": old.state,
                                "previous_reason": old.reason, "observed": observed})
                published += 1
            if old is None or (old.name, old.state, old.reason) != (record.name, record.state, record.reason):
                seen[uuid] = record
                writes.append((uuid, record.to_json()))
        for uuid in [u for u in seen if u not in present]:
            old = seen.pop(uuid)
            writes.append((uuid, None))
            await self.events.publish(
                "vm.vanished", severity="warning", resource_kind="vm", resource_id=uuid, resource_name=old.name,
                message=f"{old.name} is no longer defined on this host (it was {old.state}); it was removed or moved "
                        f"while the agent was not watching (seen {observed})",
                attributes={"previous_state": old.state, "previous_reason": old.reason, "observed": observed})
            published += 1
        if writes:
            await self.store.run(self.store.transaction, lambda conn: _write(conn, writes))
        if published:
            log.warning("event=vm_ledger.drift observed=%r events=%d", observed, published)
        return published


def _write(conn, writes: list[tuple[str, str | None]]) -> None:
    for uuid, value in writes:
        if value is None:
            conn.execute("DELETE FROM kv WHERE key = ?", (KEY_PREFIX + uuid,))
        else:
            conn.execute("INSERT INTO kv(key, value) VALUES(?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                         (KEY_PREFIX + uuid, value))
