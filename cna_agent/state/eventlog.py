"""The event log: every state change the VRM must hear about, with a sequence number.

Sequence numbers come from SQLite's AUTOINCREMENT rowid, which is strictly increasing and
never reused, not even after old events are pruned or the agent restarts. Watchers do not
hold queues (a slow watcher would either grow one without bound or lose events); they read
the log after the last sequence they saw and sleep on :class:`EventHub` until something new is
appended. That makes "resume from sequence N" and "live" the same code path.

The hub also keeps the newest events it published in memory, and a watcher that is caught up
reads them from there: otherwise every watcher re-reads the store after every event, all on
the store's one thread behind the operations' journal writes (10 watchers: 2,188 store reads
for 451 events). The store stays the record: a watcher whose next event is not in memory (it
resumes from further back, is behind pruning, or another writer's event left a gap) reads
the store, as before.
"""

from __future__ import annotations

import asyncio
import bisect
import json
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Iterable, Mapping

from cna_agent.state.store import StateStore

SEVERITIES = ("info", "warning", "error")


@dataclass(frozen=True)
class EventRecord:
    sequence: int
    time: float
    type: str
    severity: str
    resource_kind: str = ""
    resource_id: str = ""
    resource_name: str = ""
    message: str = ""
    attributes: Mapping[str, str] = field(default_factory=dict)
    operation_id: str = ""

    def to_dict(self) -> dict[str, object]:
        return {
            "sequence": self.sequence,
            "time": self.time,
            "type": self.type,
            "severity": self.severity,
            "resource_kind": self.resource_kind,
            "resource_id": self.resource_id,
            "resource_name": self.resource_name,
            "message": self.message,
            "attributes": dict(self.attributes),
            "operation_id": self.operation_id,
        }


class ResumePointTooOld(Exception):
    """The caller asked to resume after events that were already pruned."""

    def __init__(self, after: int, oldest: int) -> None:
        super().__init__(
            f"events after sequence {after} are no longer kept (oldest kept: {oldest}); resync from now"
        )
        self.after = after
        self.oldest = oldest


class EventLog:
    """Synchronous access to the events table (call through StateStore.run from async code)."""

    def __init__(self, store: StateStore, retention: int = 100_000) -> None:
        self._store = store
        self._retention = retention
        #: Events up to this sequence were pruned by this process (EventHub's memory must not
        #: serve them either: a watcher that far behind is told to resync).
        self.pruned_through = 0

    def append(
        self,
        type: str,
        *,
        severity: str = "info",
        resource_kind: str = "",
        resource_id: str = "",
        resource_name: str = "",
        message: str = "",
        attributes: Mapping[str, object] | None = None,
        operation_id: str = "",
        when: float | None = None,
    ) -> EventRecord:
        record = self._insert(self._store.execute, type, severity=severity, resource_kind=resource_kind,
                              resource_id=resource_id, resource_name=resource_name, message=message,
                              attributes=attributes, operation_id=operation_id, when=when)
        if record.sequence % 1000 == 0:
            self.prune()
        return record

    def append_many(self, events: Iterable[tuple[str, Mapping[str, object]]]) -> list[EventRecord]:
        """Append (type, fields as for :meth:`append`) events in one transaction: a burst of
        lifecycle events costs one commit, not one per event. All or none are appended: an
        event that cannot be (a bad severity, a wrong field) rolls the transaction back."""
        items = list(events)
        records = self._store.transaction(
            lambda conn: [self._insert(conn.execute, t, **fields) for t, fields in items])  # type: ignore[arg-type]
        if records and records[-1].sequence // 1000 != (records[0].sequence - 1) // 1000:
            self.prune()  # the batch passed a multiple of 1,000, where append prunes
        return records

    @staticmethod
    def _insert(execute, type: str, *, severity: str = "info", resource_kind: str = "", resource_id: str = "",
                resource_name: str = "", message: str = "", attributes: Mapping[str, object] | None = None,
                operation_id: str = "", when: float | None = None) -> EventRecord:
        if severity not in SEVERITIES:
            raise ValueError(f"severity {severity!r} is not one of {SEVERITIES}")
        attrs = {str(k): str(v) for k, v in (attributes or {}).items()}
        now = time.time() if when is None else when
        cur = execute(
            "INSERT INTO events(time, type, severity, resource_kind, resource_id, resource_name,"
            " message, attributes, operation_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (now, type, severity, resource_kind, resource_id, resource_name, message, json.dumps(attrs), operation_id),
        )
        return EventRecord(int(cur.lastrowid), now, type, severity, resource_kind, resource_id, resource_name, message,
                           attrs, operation_id)

    def list(
        self,
        after: int = 0,
        *,
        types: Iterable[str] = (),
        resource_id: str = "",
        limit: int = 100,
    ) -> list[EventRecord]:
        """Events after ``after`` in sequence order; ``types`` are prefixes ("vm." matches "vm.x")."""
        oldest = self.oldest_sequence()
        if after and oldest and after < oldest - 1:
            raise ResumePointTooOld(after, oldest)
        sql = "SELECT * FROM events WHERE sequence > ?"
        params: list[object] = [after]
        prefixes = [t for t in types if t]
        if prefixes:
            sql += " AND (" + " OR ".join("type = ? OR type LIKE ? ESCAPE '\\'" for _ in prefixes) + ")"
            for p in prefixes:
                escaped = p.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
                params += [p, escaped + ("%" if p.endswith(".") else ".%")]
        if resource_id:
            sql += " AND resource_id = ?"
            params.append(resource_id)
        sql += " ORDER BY sequence LIMIT ?"
        params.append(max(1, min(limit, 10_000)))
        return [_row_to_event(r) for r in self._store.query(sql, tuple(params))]

    def last_sequence(self) -> int:
        row = self._store.query("SELECT seq FROM sqlite_sequence WHERE name = 'events'")
        return int(row[0]["seq"]) if row else 0

    def oldest_sequence(self) -> int:
        row = self._store.query("SELECT MIN(sequence) AS s FROM events")
        return int(row[0]["s"] or 0)

    def prune(self) -> int:
        """Drop the oldest events beyond the retention count; returns how many went."""
        last = self.last_sequence()
        cur = self._store.execute("DELETE FROM events WHERE sequence <= ?", (last - self._retention,))
        self.pruned_through = max(self.pruned_through, last - self._retention)
        return cur.rowcount


def _row_to_event(row) -> EventRecord:
    return EventRecord(
        sequence=row["sequence"],
        time=row["time"],
        type=row["type"],
        severity=row["severity"],
        resource_kind=row["resource_kind"],
        resource_id=row["resource_id"],
        resource_name=row["resource_name"],
        message=row["message"],
        attributes=json.loads(row["attributes"]),
        operation_id=row["operation_id"],
    )


def _matches(record: EventRecord, types: tuple[str, ...], resource_id: str) -> bool:
    """EventLog.list's SQL filter, in memory (test_state pins the two to the same answers): a
    type prefix ending in "." matches any type under it, any other names a type and its
    sub-types."""
    if resource_id and record.resource_id != resource_id:
        return False
    prefixes = [t for t in types if t]
    if not prefixes:
        return True
    t = record.type
    return any(t == p or t.startswith(p if p.endswith(".") else p + ".") for p in prefixes)


class EventHub:
    """Async front of the event log: append from anywhere on the loop, follow it from watchers."""

    #: Events kept in memory for watchers that are caught up (between this and twice this).
    RECENT = 4096

    def __init__(self, store: StateStore, log: EventLog) -> None:
        self._store = store
        self.log = log
        self._changed = asyncio.Condition()
        self._closed = False
        #: The newest events published here, in sequence order.
        self._recent: list[EventRecord] = []

    async def publish(self, type: str, **fields: object) -> EventRecord:
        record = await self._store.run(lambda: self.log.append(type, **fields))  # type: ignore[arg-type]
        await self._remember([record])
        return record

    async def publish_many(self, events: list[tuple[str, dict[str, object]]]) -> list[EventRecord]:
        """Publish (type, fields) events in one store transaction, in this order (the event
        monitor's batch: one commit and one wake-up of the watchers per burst)."""
        if not events:
            return []
        records = await self._store.run(lambda: self.log.append_many(events))
        await self._remember(records)
        return records

    async def _remember(self, records: list[EventRecord]) -> None:
        recent = self._recent
        for record in records:
            if recent and record.sequence < recent[-1].sequence:  # two publishes resumed out of order
                bisect.insort(recent, record, key=lambda r: r.sequence)
            else:
                recent.append(record)
        if len(recent) > 2 * self.RECENT:
            del recent[: len(recent) - self.RECENT]
        async with self._changed:
            self._changed.notify_all()

    def _tail(self, last: int, types: tuple[str, ...], resource_id: str, batch: int) -> tuple[list[EventRecord], int] | None:
        """(matching events after ``last``, the sequence read up to) from memory, or None when
        the event after ``last`` is not there (read the store). Stops at a gap in the
        sequence: the missing event may be in the store only."""
        recent = self._recent
        if not recent or recent[0].sequence > last + 1 or last < self.log.pruned_through:
            return None
        i = bisect.bisect_right(recent, last, key=lambda r: r.sequence)
        out: list[EventRecord] = []
        upto = last
        for record in recent[i:]:
            if record.sequence != upto + 1 or len(out) >= batch:
                break
            upto = record.sequence
            if _matches(record, types, resource_id):
                out.append(record)
        if upto == last and i < len(recent):
            return None  # a gap right after ``last``
        return out, upto

    def _newest(self) -> int:
        return self._recent[-1].sequence if self._recent else 0

    async def list(self, after: int = 0, **filters: object) -> list[EventRecord]:
        return await self._store.run(lambda: self.log.list(after, **filters))  # type: ignore[arg-type]

    async def last_sequence(self) -> int:
        return await self._store.run(self.log.last_sequence)

    async def follow(
        self, after: int = 0, *, types: Iterable[str] = (), resource_id: str = "", batch: int = 500
    ) -> AsyncIterator[EventRecord]:
        """Yield stored events after ``after``, then new ones as they are appended, forever."""
        async for events in self.follow_batches(after, types=types, resource_id=resource_id, batch=batch):
            for event in events:
                yield event

    async def follow_batches(
        self, after: int = 0, *, types: Iterable[str] = (), resource_id: str = "", batch: int = 500
    ) -> AsyncIterator[list[EventRecord]]:
        """:meth:`follow` a list at a time: whatever matches and is ready (up to ``batch``),
        never an empty list; the next list continues after the last event of this one."""
        types = tuple(types)
        last = after
        while not self._closed:
            tail = self._tail(last, types, resource_id, batch)
            if tail is not None:
                events, upto = tail
                if events:
                    yield events
                if upto > last:
                    last = upto
                    continue
                async with self._changed:
                    # Nothing newer in memory: wait for a publish (checked and waited on with
                    # no await between, so one appended meanwhile cannot be missed).
                    if self._newest() <= last and not self._closed:
                        await self._changed.wait()
                continue
            async with self._changed:
                # Re-read under the condition's lock so an append between the read and the
                # wait cannot be missed (publish notifies only after taking the same lock).
                events = await self._store.run(
                    lambda: self.log.list(last, types=types, resource_id=resource_id, limit=batch)
                )
                if not events:
                    await self._changed.wait()
                    continue
            last = events[-1].sequence
            yield events

    async def close(self) -> None:
        self._closed = True
        async with self._changed:
            self._changed.notify_all()
