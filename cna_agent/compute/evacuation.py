"""Host evacuation: turning maintenance on and draining this host's VMs to the destinations given,
one "host.evacuate" operation whose response is the per-VM report.

How the VMs are spread, and why:

* **Least-loaded by RAM, decided per VM when its move starts.** Each destination's load is the
  guest RAM this evacuation has sent or is sending there; a VM goes to the least-loaded
  destination (ties: the order given). VMs differ in size far more than in count, and this
  host has no view of the destinations' free memory (the peer contract only prepares), so
  balancing RAM beats round-robin by count; deciding at start time (not up front) lets a
  destination that refused or went away drop out for the VMs still waiting. The largest VMs
  start first, so the small ones fill in (the usual greedy packing).
* **Every VM is tried, nothing is shut down.** Each VM goes through ``VmMigrations.migrate``
  as the VRM's MigrateVm would (a running VM live; a stopped one cold once compute's migrate
  does that, otherwise migrate refuses it and the report says why). A VM whose move failed on
  one destination is tried on the next (a failed pre-copy leaves it running here, so that is
  safe); one that migrate refuses for a reason of its own ("not running", "not created by
  cna-agent") is not retried elsewhere. Whatever stays here stays as it was.
* **Within the limits.** At most ``max_parallel`` moves at once (the wiring passes
  [migration] max_outgoing); when other migrations hold the outgoing slots, migrate's retryable
  refusal is retried every few seconds, up to ``busy_give_up_s``.
* **Cancel** (CancelOperation on the evacuation, or maintenance off) stops starting new moves and
  cancels the VM migrations that run (their own cancel aborts libvirt's job and leaves the VM
  here); the host stays in maintenance until it is turned off.

Progress of the evacuation = VMs done / total; the stage names the ones moving.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Protocol, Sequence

from cna_agent.compute import state as st
from cna_agent.compute.maintenance import (CANCELLED, MOVED, NOT_MOVED, PENDING, EvacuatedVm, EvacuationReport,
                                           MaintenanceMode, MaintenanceStatus)
from cna_agent.compute.migration import MigrationPolicy, check_destination
from cna_agent.errors import AgentError, CODES, FailedPrecondition, InvalidArgument, ResourceBusy
from cna_agent.operations import OperationContext, OperationRunner
from cna_agent.state.eventlog import EventHub
from cna_agent.state.journal import OperationError, OperationRecord, SUCCEEDED

log = logging.getLogger(__name__)

MAX_DESTINATIONS = 16
LOCK_KEY = "host/maintenance"
#: A destination answering UNAVAILABLE is not tried again in the same evacuation.
_UNREACHABLE = CODES["UNAVAILABLE"]


class Migrator(Protocol):
    """compute's VmMigrations, as the evacuation uses it."""

    max_outgoing: int

    async def migrate(self, ref: str, destination: str, policy: MigrationPolicy, *, request_id: str = "",
                      fingerprint: str = "") -> OperationRecord: ...


class VmLister(Protocol):
    async def list(self, *, states: Sequence[str] = (), include_unmanaged: bool = False,
                   status_only: bool = False) -> list[Any]: ...


def check_destinations(destinations: Sequence[str]) -> tuple[str, ...]:
    """Each "host:port" well-formed and given once; the field named by its index."""
    if len(destinations) > MAX_DESTINATIONS:
        raise InvalidArgument("destinations", f"{len(destinations)} given; at most {MAX_DESTINATIONS}")
    seen: list[str] = []
    for i, d in enumerate(destinations):
        try:
            check_destination(d)
        except InvalidArgument:
            raise InvalidArgument(f"destinations[{i}]", f"{d!r:.80} is not host:port") from None
        if d in seen:
            raise InvalidArgument(f"destinations[{i}]", f"{d!r} is given twice")
        seen.append(d)
    return tuple(seen)


def pick_destination(destinations: Sequence[str], load_mib: dict[str, int], exclude: set[str]) -> str | None:
    """The least-loaded destination (RAM this evacuation sent or is sending there) not in
    ``exclude``; ties go to the one given first. None when every destination is excluded."""
    candidates = [(load_mib.get(d, 0), i, d) for i, d in enumerate(destinations) if d not in exclude]
    return min(candidates)[2] if candidates else None


def evacuation_order(vms: Sequence[EvacuatedVm]) -> list[EvacuatedVm]:
    """Running VMs first (they are what a drain is for), largest first; then the rest."""
    active = (st.RUNNING, st.PAUSED)
    return sorted(vms, key=lambda v: (v.state not in active, -v.memory_mib, v.name))


class HostEvacuation:
    """SetMaintenance / GetMaintenance (host.proto) over the maintenance mode, compute's
    migrations and the operation runner."""

    def __init__(self, mode: MaintenanceMode, migrations: Migrator, vms: VmLister, runner: OperationRunner, *,
                 events: EventHub | None = None, max_parallel: int | None = None, busy_retry_s: float = 3.0,
                 busy_give_up_s: float = 600.0) -> None:
        self.mode = mode
        #: The mode's changes go out as "host.maintenance" events (the VRM stops placing VMs here).
        self.events = events
        self.migrations = migrations
        self.vms = vms
        self.runner = runner
        self.max_parallel = max(1, max_parallel or migrations.max_outgoing)
        self.busy_retry_s = busy_retry_s
        self.busy_give_up_s = busy_give_up_s
        self._evacuation: str = ""

    def _running(self) -> str:
        return self._evacuation if self._evacuation and self.runner.is_running(self._evacuation) else ""

    def status(self) -> MaintenanceStatus:
        s = self.mode.state
        return MaintenanceStatus(s.enabled, s.since, s.destinations, self._running(), self.mode.report)

    async def set_maintenance(self, enabled: bool, destinations: Sequence[str], policy: MigrationPolicy, *,
                              request_id: str = "", fingerprint: str = "") -> OperationRecord:
        dests = check_destinations(destinations)
        policy = policy.validated()
        if not enabled:
            return await self._exit(request_id, fingerprint)
        running = self._running()
        if running:
            raise ResourceBusy(f"evacuation {running} is still running; cancel it (CancelOperation) or wait for it",
                               field="enabled")
        # On at once, before the first VM moves: from here nothing new lands on this host.
        await self.mode.set(True, dests)
        await self._announce(True, dests)

        async def work(op: OperationContext) -> EvacuationReport:
            return await self._evacuate(op, dests, policy)

        record = await self.runner.submit("host.evacuate", "host", work, request_id=request_id, fingerprint=fingerprint,
                                          lock_key=LOCK_KEY, wait=1.0, cancellable=True)
        if not record.done:
            self._evacuation = record.id
        return record

    async def _exit(self, request_id: str, fingerprint: str) -> OperationRecord:
        async def work(op: OperationContext) -> MaintenanceStatus:
            running = self._running()
            if running:
                await op.progress(10, f"cancelling evacuation {running}")
                await self.runner.cancel(running)
            await self.mode.set(False)
            await self._announce(False, ())
            return self.status()

        return await self.runner.submit("host.maintenance.exit", "host", work, request_id=request_id,
                                        fingerprint=fingerprint, wait=60.0)

    # -- after a crash: decided from the persisted mode and report, and libvirt's VMs ---------------

    def recovery_handlers(self) -> dict[str, Any]:
        return {"host.evacuate": self.recover_evacuate, "host.maintenance.exit": self.recover_exit}

    async def recover_evacuate(self, record: OperationRecord) -> Any:
        """An evacuation cut short is never resumed (the VRM decides whether to drain again):
        it ends ABORTED saying how far it got, from the report it kept (MaintenanceMode.load
        closed its unfinished lines) and which managed VMs libvirt still shows on this host.
        Maintenance stays as it is (on: the host took nothing new meanwhile)."""
        report = self.mode.report if self.mode.report is not None and self.mode.report.operation_id == record.id else None
        here = [v.name for v in await self.vms.list(include_unmanaged=False)]
        moved = f"{report.moved} of {len(report.vms)} VMs moved" if report is not None else "no VM's move was recorded"
        still = f"still on this host: {', '.join(sorted(here)[:20])}" + (" ..." if len(here) > 20 else "") if here \
            else "no VM of the agent is left on this host"
        mode = "maintenance is still on" if self.mode.state.enabled else "maintenance is off"
        return OperationError(CODES["ABORTED"], f"the agent stopped during the evacuation: {moved}; {still}; {mode} "
                                                "(nothing was redone; SetMaintenance on drains the rest)")

    async def recover_exit(self, record: OperationRecord) -> Any:
        """Maintenance off cut short: done exactly when the persisted mode says off."""
        if not self.mode.state.enabled:
            return self.status()
        return OperationError(CODES["ABORTED"], "the agent stopped before maintenance was turned off; it is still on "
                                                "(SetMaintenance off turns it off)")

    async def _announce(self, enabled: bool, destinations: tuple[str, ...]) -> None:
        if self.events is not None:
            await self.events.publish(
                "host.maintenance", severity="warning" if enabled else "info", resource_kind="host",
                message="maintenance on: no new VMs; draining to " + (", ".join(destinations) or "nowhere (none given)")
                if enabled else "maintenance off: this host takes new VMs again",
                attributes={"enabled": str(enabled).lower(), "destinations": ",".join(destinations)})

    # -- the drain ------------------------------------------------------------------------------

    async def _evacuate(self, op: OperationContext, destinations: tuple[str, ...], policy: MigrationPolicy) -> EvacuationReport:
        vms = await self.vms.list(include_unmanaged=True)
        entries = [EvacuatedVm(v.uuid, v.name, v.state, memory_mib=v.spec.memory_mib if v.spec is not None else 0)
                   for v in vms]
        report = EvacuationReport(op.id, time.time(), vms=evacuation_order(entries))
        for e, v in zip(entries, vms):
            if not v.managed:
                self._close(e, NOT_MOVED, "not created by cna-agent; the agent does not move it")
            elif not destinations:
                self._close(e, NOT_MOVED, "no destination was given; the VM stays here")
            elif v.hibernated is not None:
                # It holds nothing here, and any host seeing its datastore resumes it
                # (UnhibernateVm there); moving its definition would leave its state behind.
                self._close(e, NOT_MOVED, f"hibernated on datastore {v.hibernated.datastore!r}: it holds nothing on this "
                                          "host; resume it on another host that sees that datastore")
        await self._report(op, report)
        log.warning("event=evacuation.started op=%s vms=%d destinations=%s", op.id, len(report.vms), ",".join(destinations))
        load: dict[str, int] = {}
        unreachable: set[str] = set()
        slots = asyncio.Semaphore(self.max_parallel)

        async def one(e: EvacuatedVm) -> None:
            try:
                async with slots:
                    await self._move(op, report, e, destinations, policy, load, unreachable)
            except asyncio.CancelledError:
                if e.outcome == PENDING:
                    self._close(e, CANCELLED, e.error or "the evacuation was cancelled before this VM moved")
                raise
            except Exception as exc:  # a bug must not leave the line open nor stop the others
                log.exception("event=evacuation.vm_crashed vm=%s", e.uuid)
                self._close(e, NOT_MOVED, f"{type(exc).__name__}: {exc}")
            await self._report(op, report)

        tasks = [asyncio.ensure_future(one(e)) for e in report.vms if e.outcome == PENDING]
        try:
            if tasks:
                await asyncio.gather(*tasks)
        except asyncio.CancelledError:
            for t in tasks:
                t.cancel()
            await asyncio.shield(asyncio.wait(tasks))
            report.end_time = time.time()
            await asyncio.shield(self.mode.save_report(report))
            log.warning("event=evacuation.cancelled op=%s moved=%d", op.id, report.moved)
            raise
        report.end_time = time.time()
        await self.mode.save_report(report)
        log.warning("event=evacuation.done op=%s moved=%d not_moved=%d", op.id, report.moved, report.not_moved)
        return report

    async def _move(self, op: OperationContext, report: EvacuationReport, e: EvacuatedVm, destinations: tuple[str, ...],
                    policy: MigrationPolicy, load: dict[str, int], unreachable: set[str]) -> None:
        started = time.monotonic()
        tried: set[str] = set()
        while True:
            dest = pick_destination(destinations, load, tried | unreachable)
            if dest is None:
                self._close(e, NOT_MOVED, e.error or "no destination is left to try", started)
                return
            tried.add(dest)
            e.destination = dest
            load[dest] = load.get(dest, 0) + e.memory_mib
            await self._report(op, report)
            outcome, code, message = await self._attempt(e, dest, policy)
            e.attempts.append(f"{dest}: {message}")
            if outcome == MOVED:
                self._close(e, MOVED, "", started)
                return
            if outcome == "failed" and not await self._still_here(e.uuid):
                # The operation failed after libvirt's job had switched the VM over (it is
                # defined here no more): it went, whatever its operation says; never retried.
                self._close(e, MOVED, f"its migration operation failed ({message}), but the VM is no longer "
                                      f"defined on this host: check it on {dest}", started)
                return
            load[dest] -= e.memory_mib
            e.error = f"{dest}: {message}"
            if code == _UNREACHABLE:
                unreachable.add(dest)
            if outcome == "refused":  # this VM cannot move from here, whatever the destination
                e.destination = ""  # nothing reached it
                self._close(e, NOT_MOVED, message, started)
                return

    async def _still_here(self, uuid: str) -> bool:
        return any(v.uuid == uuid for v in await self.vms.list(include_unmanaged=True))

    async def _attempt(self, e: EvacuatedVm, dest: str, policy: MigrationPolicy) -> tuple[str, int, str]:
        """One move of ``e`` to ``dest``: ("moved" | "failed" | "refused", status code, message)."""
        give_up = time.monotonic() + self.busy_give_up_s
        while True:
            try:
                record = await self.migrations.migrate(e.uuid, dest, policy)
                break
            except ResourceBusy as exc:  # the outgoing slots (or the VM) are busy: retryable
                if time.monotonic() > give_up:
                    return "refused", exc.code_number, exc.message
                await asyncio.sleep(self.busy_retry_s)
            except AgentError as exc:
                return "refused", exc.code_number, exc.message
        e.operation_id, e.operation_kind = record.id, record.kind
        try:
            final = await self.runner.finished(record.id, record)
        except asyncio.CancelledError:
            # Cancel the VM's own migration and wait for it: libvirt's job must be over before
            # the line can say the VM stayed here.
            try:
                final = await asyncio.shield(self.runner.cancel(record.id)) or record
            except FailedPrecondition:  # past its point of no return (post-copy, finishing): it ends by itself
                final = await asyncio.shield(self.runner.finished(record.id, record))
            if final.state == SUCCEEDED:
                self._close(e, MOVED, "")  # it switched over before the cancel reached it
            else:
                self._close(e, CANCELLED, "the evacuation was cancelled while this VM moved; it stays here")
            raise
        if final.state == SUCCEEDED:
            return MOVED, 0, "moved"
        if final.error is not None:
            return "failed", final.error.code, final.error.message
        return "failed", CODES["CANCELLED"], f"its migration operation ended {final.state}"

    @staticmethod
    def _close(e: EvacuatedVm, outcome: str, error: str, started: float | None = None) -> None:
        e.outcome, e.error = outcome, error
        if started is not None:
            e.duration_ms = int((time.monotonic() - started) * 1000)
        log.info("event=evacuation.vm vm=%s name=%s outcome=%s destination=%s error=%r", e.uuid, e.name, outcome,
                 e.destination, error)

    async def _report(self, op: OperationContext, report: EvacuationReport) -> None:
        total = len(report.vms)
        moving = [v.name for v in report.vms if v.outcome == PENDING and v.operation_id]
        percent = min(99, 100 * report.done // total) if total else 99
        stage = (f"{report.done}/{total} VMs done ({report.moved} moved, {report.not_moved} not moved)" +
                 (f"; moving {', '.join(moving)}" if moving else ""))
        await self.mode.save_report(report)
        await op.progress(percent, stage)

