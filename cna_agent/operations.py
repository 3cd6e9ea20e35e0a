"""Runs long operations: journalled, lock-serialised per resource, pollable and watchable.

A service hands the runner a coroutine function; the runner opens a journal row (or finds
the one an identical earlier request opened), takes the resource lock, runs the work as an
asyncio task, records progress, and closes the row with the result or the error. Callers get
the operation back at once or, for quick work, after waiting up to ``wait`` seconds so they
see it already done.

One lock per resource key ("vm/<uuid>") serialises operations on one VM while different VMs
proceed in parallel (DESIGN.md). A caller that cannot wait gets a ResourceBusy naming the
operation in the way.

Each operation runs in its own cancel scope (cancel.py). Only kinds submitted
``cancellable=True`` take a CancelOperation: their scope's hooks stop the real work, a running
blocking call is waited for, and the lock is released only when the work has ended; the rest,
and a cancellable one past its point of no return, answer FAILED_PRECONDITION saying why.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Awaitable, Callable, Mapping, Protocol

from cna_agent import cancel as cancelling
from cna_agent.cancel import CancelScope, Cancelled
from cna_agent.errors import CODES, AgentError, ResourceBusy
from cna_agent.failpoints import crash_point
from cna_agent.state.eventlog import EventHub
from cna_agent.state.journal import OperationError, OperationJournal, OperationRecord, RUNNING
from cna_agent.state.store import StateStore

log = logging.getLogger(__name__)


class ResultEncoder(Protocol):
    """Turns what an operation's work returned (a service's plain dataclass, or None for
    "done, nothing to return") into the stored response: (type name, bytes). The api layer
    provides it (api/results.py), so services and this runner never see protobuf; the wiring
    hands it in. Every finished operation has exactly one of a response or an error."""

    def __call__(self, kind: str, result: Any) -> tuple[str, bytes]: ...


#: The response of an operation that returns nothing: google.protobuf.Empty (its encoding is
#: no bytes at all), so that a finished operation always has a response or an error.
EMPTY_RESPONSE = ("google.protobuf.Empty", b"")


def _no_results(kind: str, result: Any) -> tuple[str, bytes]:
    if result is None:
        return EMPTY_RESPONSE
    raise TypeError(f"operation returned {type(result).__name__} but this runner has no result encoder")


@dataclass
class OperationContext:
    """Handed to the work so it can report progress."""

    record: OperationRecord
    _runner: "OperationRunner"

    @property
    def id(self) -> str:
        return self.record.id

    async def progress(
        self, percent: int | None = None, stage: str | None = None, *, bytes_done: int | None = None, bytes_total: int | None = None
    ) -> None:
        await self._runner._update(self.record.id, percent=percent, stage=stage, bytes_done=bytes_done, bytes_total=bytes_total)

    async def note(self, **metadata: str) -> None:
        """Record facts in the operation's journal row as they become known (the destination a
        migration reached, the step it got to), for the recovery of a process that dies next."""
        await self._runner._update(self.record.id, metadata=metadata)


Work = Callable[[OperationContext], Awaitable[Any]]
#: Called for each operation found unfinished at start-up; returns the error to close it with,
#: or, when the effect was verified complete, the result the operation would have returned
#: (None: nothing to return), or a Reattach when the work is still going on outside the agent.
RecoveryHandler = Callable[[OperationRecord], Awaitable[Any]]


@dataclass(frozen=True)
class Reattach:
    """A recovery verdict: the operation's real work still runs outside this process (libvirtd
    carries on a peer-to-peer migration job after its client died), so the runner resumes the
    open row with ``work``, which follows that job to its end; it does not redo anything.
    ``lock_key`` is taken again, so nothing else acts on the resource meanwhile."""

    work: "Work"
    lock_key: str | None = None
    #: The re-attached work takes a CancelOperation (see OperationRunner.submit).
    cancellable: bool = False


class ResourceLocks:
    """One asyncio lock per resource key, remembering which operation holds it."""

    def __init__(self) -> None:
        self._locks: dict[str, asyncio.Lock] = {}
        self._holders: dict[str, OperationRecord] = {}

    def holder(self, key: str) -> OperationRecord | None:
        return self._holders.get(key)

    async def acquire(self, key: str, record: OperationRecord, timeout: float) -> None:
        lock = self._locks.setdefault(key, asyncio.Lock())
        try:
            if timeout <= 0:
                if lock.locked():
                    raise asyncio.TimeoutError
                await lock.acquire()
            else:
                await asyncio.wait_for(lock.acquire(), timeout)
        except asyncio.TimeoutError:
            holder = self._holders.get(key)
            what = f"operation {holder.id} ({holder.kind})" if holder else "another operation"
            raise ResourceBusy(f"{key} is busy with {what}; retry later or pass a lock_timeout") from None
        self._holders[key] = record

    def release(self, key: str) -> None:
        self._holders.pop(key, None)
        lock = self._locks.get(key)
        if lock is not None and lock.locked():
            lock.release()
        if lock is not None and not lock.locked() and not getattr(lock, "_waiters", None):
            self._locks.pop(key, None)


class OperationRunner:
    def __init__(self, store: StateStore, journal: OperationJournal, events: EventHub, *, retention_s: float = 7 * 86400,
                 encode: ResultEncoder = _no_results) -> None:
        self._store = store
        self._encode = encode
        self._journal = journal
        self._events = events
        self._retention_s = retention_s
        self.locks = ResourceLocks()
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._scopes: dict[str, CancelScope] = {}
        self._changed = asyncio.Condition()
        self._shutting_down = False

    async def submit(
        self,
        kind: str,
        target: str,
        work: Work,
        *,
        request_id: str = "",
        fingerprint: str = "",
        lock_key: str | None = None,
        lock_timeout: float = 0.0,
        wait: float = 0.0,
        metadata: Mapping[str, str] | None = None,
        cancellable: bool = False,
    ) -> OperationRecord:
        """Start ``work`` as an operation (or return the one a repeated request started).
        ``cancellable``: the work stops for a CancelOperation and leaves nothing behind (it
        registers cancel hooks and marks its point of no return, cancel.py)."""
        record, created = await self._store.run(
            lambda: self._journal.begin(kind, target, request_id=request_id or None, fingerprint=fingerprint, metadata=metadata)
        )
        if not created:
            log.info("event=operation.duplicate op=%s kind=%s request_id=%s", record.id, kind, request_id)
            return await self._maybe_wait(record, wait)
        if lock_key is not None:
            try:
                await self.locks.acquire(lock_key, record, lock_timeout)
            except ResourceBusy as exc:
                # The request was refused, not run: close its row so the id can be retried.
                await self._finish(record.id, error=_to_operation_error(exc))
                raise
        self._start(record, work, lock_key, cancellable, f"op-{kind}-{record.id}")
        return await self._maybe_wait(record, wait)

    def _start(self, record: OperationRecord, work: Work, lock_key: str | None, cancellable: bool, name: str) -> None:
        scope = CancelScope(f"operation {record.id} ({record.kind})", cancellable=cancellable,
                            refusal=f"{record.kind} operations cannot be cancelled once started")
        self._scopes[record.id] = scope
        self._tasks[record.id] = asyncio.get_running_loop().create_task(self._run(record, work, lock_key, scope), name=name)

    async def _maybe_wait(self, record: OperationRecord, wait: float) -> OperationRecord:
        if wait > 0 and not record.done:
            task = self._tasks.get(record.id)
            if task is not None:
                await asyncio.wait({task}, timeout=wait)
        return await self.get(record.id) or record

    async def _run(self, record: OperationRecord, work: Work, lock_key: str | None, scope: CancelScope) -> None:
        started = time.monotonic()
        cancelling.enter(scope)  # this task's own context: its pool calls carry it to their threads
        try:
            await self._update(record.id, state=RUNNING)
            crash_point(f"{record.kind}:started")  # journalled, nothing done yet
            result = await work(OperationContext(record, self))
            response_type, response = self._encode(record.kind, result)
            crash_point(f"{record.kind}:done")  # all done, not yet recorded
            await self._finish(record.id, response_type=response_type, response=response)
            log.info("event=operation.done op=%s kind=%s target=%s duration_ms=%.0f", record.id, record.kind, record.target, (time.monotonic() - started) * 1000)
        except Cancelled:  # the work saw the cancel first (a thread's check) and stopped
            await asyncio.shield(self._finish(record.id, cancelled=True))
            log.info("event=operation.cancelled op=%s kind=%s", record.id, record.kind)
        except asyncio.CancelledError:
            if self._shutting_down and not scope.cancelled:
                # Cut short by the agent stopping: leave the row open so the next start
                # verifies what really happened instead of recording a guess.
                log.warning("event=operation.interrupted op=%s kind=%s", record.id, record.kind)
                raise
            await asyncio.shield(self._finish(record.id, cancelled=True))
            log.info("event=operation.cancelled op=%s kind=%s", record.id, record.kind)
        except AgentError as exc:
            await self._finish(record.id, error=_to_operation_error(exc))
            log.warning("event=operation.failed op=%s kind=%s target=%s code=%s error=%r", record.id, record.kind, record.target, exc.code, exc.message)
        except Exception as exc:  # a bug or an unexpected library error: keep the agent alive
            log.exception("event=operation.crashed op=%s kind=%s", record.id, record.kind)
            await self._finish(record.id, error=OperationError(CODES["INTERNAL"], f"{type(exc).__name__}: {exc}"))
        finally:
            if lock_key is not None:
                self.locks.release(lock_key)
            self._tasks.pop(record.id, None)
            self._scopes.pop(record.id, None)

    async def _update(self, op_id: str, **changes: Any) -> None:
        await self._store.run(lambda: self._journal.update(op_id, **changes))
        async with self._changed:
            self._changed.notify_all()

    async def _finish(self, op_id: str, **result: Any) -> OperationRecord:
        record = await self._store.run(lambda: self._journal.finish(op_id, **result))
        async with self._changed:
            self._changed.notify_all()
        severity = "info" if record.state == "succeeded" else "warning"
        attrs = {"kind": record.kind, "state": record.state}
        if record.error is not None:
            attrs["error"] = record.error.message
        await self._events.publish(
            "operation.done", severity=severity, resource_kind="operation", resource_id=record.id,
            resource_name=record.target, message=f"{record.kind} {record.state}", attributes=attrs, operation_id=record.id,
        )
        return record

    async def by_request_id(self, request_id: str) -> OperationRecord | None:
        """The operation a request id opened (a retry of a request whose answer was lost)."""
        return await self._store.run(self._journal.by_request_id, request_id) if request_id else None

    async def get(self, op_id: str) -> OperationRecord | None:
        return await self._store.run(self._journal.get, op_id)

    async def list(self, **filters: Any) -> list[OperationRecord]:
        return await self._store.run(lambda: self._journal.list(**filters))

    async def finished(self, op_id: str, started: OperationRecord | None = None) -> OperationRecord | None:
        """Operation ``op_id``'s record once it is done, for an operation that awaits another
        (a deploy's create, an evacuation's migration); ``started`` (its record as submitted)
        when the journal no longer has it, else None."""
        final = started
        async for final in self.watch(op_id):
            pass
        return final

    async def watch(self, op_id: str) -> AsyncIterator[OperationRecord]:
        """Yield the operation now and after each change, ending once it is done."""
        last_update: float | None = None
        while True:
            async with self._changed:
                record = await self.get(op_id)
                if record is None:
                    return
                if record.update_time == last_update and not record.done:
                    await self._changed.wait()
                    continue
            last_update = record.update_time
            yield record
            if record.done:
                return

    async def cancel(self, op_id: str, *, wait: float = 30.0) -> OperationRecord | None:
        """Stop a running operation: FailedPrecondition (naming why) when its kind cannot be
        cancelled or it is past its point of no return; otherwise its cancel hooks run, its
        coroutine is cancelled, and this waits up to ``wait`` seconds for it to end (its lock is
        held until then, however long its work takes to stop)."""
        task, scope = self._tasks.get(op_id), self._scopes.get(op_id)
        if task is None or scope is None:
            return await self.get(op_id)
        scope.request()
        log.info("event=operation.cancel op=%s", op_id)
        task.cancel()
        await asyncio.wait({task}, timeout=wait)
        return await self.get(op_id)

    def cancel_refusal(self, op_id: str) -> str:
        """Why a cancel of running operation ``op_id`` would be refused now ("" if it would not)."""
        scope = self._scopes.get(op_id)
        return scope.refusal if scope is not None else ""

    def is_running(self, op_id: str) -> bool:
        return op_id in self._tasks

    async def recover(self, handlers: Mapping[str, RecoveryHandler] | None = None) -> list[OperationRecord]:
        """Close every operation a previous agent process left open; never re-run them."""
        handlers = handlers or {}
        closed: list[OperationRecord] = []
        for record in await self._store.run(self._journal.unfinished):
            handler = handlers.get(record.kind)
            outcome: Any
            if handler is None:
                outcome = OperationError(
                    CODES["ABORTED"],
                    f"the agent stopped while {record.kind} ran; it was not redone and its effect was not verified",
                )
            else:
                try:
                    outcome = await handler(record)
                except Exception as exc:  # recovery must not stop the agent from starting
                    log.exception("event=operation.recovery_failed op=%s", record.id)
                    outcome = OperationError(CODES["UNKNOWN"], f"recovery check failed: {exc}")
            if isinstance(outcome, Reattach):
                await self._reattach(record, outcome)
                continue
            if isinstance(outcome, OperationError):
                done = await self._finish(record.id, error=outcome, metadata={"recovered": "true"})
            else:
                response_type, response = self._encode(record.kind, outcome)
                done = await self._finish(record.id, response_type=response_type, response=response,
                                          metadata={"recovered": "true"})
            closed.append(done)
            log.warning("event=operation.recovered op=%s kind=%s state=%s", record.id, record.kind, closed[-1].state)
        return closed

    async def _reattach(self, record: OperationRecord, how: Reattach) -> None:
        await self._update(record.id, metadata={"reattached": "true"})
        if how.lock_key is not None:
            await self.locks.acquire(how.lock_key, record, 0.0)
        self._start(record, how.work, how.lock_key, how.cancellable, f"op-{record.kind}-{record.id}-reattached")
        log.warning("event=operation.reattached op=%s kind=%s target=%s", record.id, record.kind, record.target)

    async def prune(self) -> int:
        return await self._store.run(self._journal.prune, self._retention_s)

    async def count(self) -> int:
        return await self._store.run(self._journal.count)

    async def shutdown(self, timeout: float = 10.0) -> None:
        """Give running operations a moment, then cancel the rest.

        Cancelled ones stay open in the journal; recovery on the next start closes them after
        checking the hypervisor.
        """
        tasks = list(self._tasks.values())
        if tasks:
            await asyncio.wait(tasks, timeout=timeout)
        self._shutting_down = True
        tasks = [t for t in self._tasks.values() if not t.done()]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=5)


def _to_operation_error(exc: AgentError) -> OperationError:
    return OperationError(exc.code_number, exc.message, exc.fields)


