"""Live migration, the source's side: one ``vm.migrate`` operation that asks the destination
agent to prepare, drives libvirt's peer-to-peer job, watches it, and tidies up on the right side.

Why this shape (VDSM's migration source, nova's libvirt driver, KubeVirt's migration monitor):

* The destination prepares *before* any memory moves (migration_incoming.py): placement on its
  own topology, its ports and LUNs, its own definition; what does not fit is refused there.
* libvirt's peer-to-peer job with ``PERSIST_DEST | UNDEFINE_SOURCE``: libvirt makes the VM
  persistent on the destination before it undefines it here, and only once the job completed,
  so a failure at any point leaves it defined somewhere (never on neither host).
* The agent, not the manager, enforces the hard limits while the job runs: no progress for
  ``progress_timeout_s`` aborts; the downtime limit is stepped up while iterations stall; past
  the completion timeout the policy's action (abort, post-copy, pause) is taken. These hold
  while the VRM is unreachable.
* A cancel (CancelOperation) aborts libvirt's job and waits for it to end: the VM's lock is
  not released while the job could still switch the VM over.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

import libvirt

from cna_agent import cancel as cancelling
from cna_agent.compute import state as st
from cna_agent.compute.binder import Binder
from cna_agent.compute.customization_mark import refuse_while_pending
from cna_agent.compute.pending_changes import refuse_while_pending as refuse_while_changes_pending
from cna_agent.compute.migration_cold import ColdMigrations
from cna_agent.compute.rundirs import QemuRunDirs
from cna_agent.compute.vmops import VmOps
from cna_agent.contracts import IncomingPlan, MigrationPeer
from cna_agent.errors import (AgentError, Aborted, DeadlineExceeded, FailedPrecondition, InvalidArgument, ResourceBusy,
                              Unavailable)
from cna_agent.failpoints import crash_point
from cna_agent.operations import OperationContext
from cna_agent.state.journal import OperationRecord

log = logging.getLogger(__name__)

COMPLETION_ACTIONS = ("abort", "post-copy", "pause")
#: How often the job is read (progress on the operation and the events, the limits).
MONITOR_INTERVAL_S = 1.0
#: Downtime steps: x1.5 per stalled iteration, at most this many times.
DOWNTIME_STEPS = 4
#: How long a cancelled or timed-out job may take to wind down before the agent gives up waiting.
ABORT_WAIT_S = 60.0
#: How long the source keeps telling an unreachable destination the outcome (it may be
#: restarting): FinishIncoming after the VM moved, AbortIncoming after it did not.
TELL_DESTINATION_S = 120.0
TELL_RETRY_S = 2.0
#: How long the early release of a hung destination waits for its agent's answer (failed()
#: tells it again, retried, when this one does not get through).
RELEASE_WAIT_S = 20.0
#: libvirt's job types (virDomainJobType) the monitor tells apart.
JOB_NONE, JOB_BOUNDED, JOB_UNBOUNDED = 0, 1, 2


@dataclass(frozen=True)
class MigrationPolicy:
    """How one live migration runs (MigrationPolicy in vm.proto); the defaults are the anchors'."""

    max_downtime_ms: int = 300
    bandwidth_mib_s: int = 0
    #: On by default (oVirt's default "Minimal downtime" policy, Incus for every live move): QEMU
    #: throttles the vCPUs only once an iteration shows the guest dirtying faster than the stream
    #: sends, so an idle guest is not touched, and a busy one converges with the source still
    #: authoritative (nova and KubeVirt leave it off and let such guests time out).
    auto_converge: bool = True
    #: Off by default (nova, KubeVirt, oVirt): a failure during post-copy loses the guest.
    permit_post_copy: bool = False
    progress_timeout_s: int = 60
    completion_timeout_s_per_gib: int = 120
    completion_action: str = "abort"

    def validated(self) -> "MigrationPolicy":
        def bounded(value: int, field: str, low: int, high: int) -> None:
            if not low <= value <= high:
                raise InvalidArgument(f"policy.{field}", f"{value} is not in {low}..{high}")

        bounded(self.max_downtime_ms, "max_downtime_ms", 10, 60_000)
        bounded(self.bandwidth_mib_s, "bandwidth_mib_s", 0, 1_000_000)
        bounded(self.progress_timeout_s, "progress_timeout_s", 5, 3600)
        bounded(self.completion_timeout_s_per_gib, "completion_timeout_s_per_gib", 5, 3600)
        if self.completion_action not in COMPLETION_ACTIONS:
            raise InvalidArgument("policy.completion_action", f"{self.completion_action!r} is not one of {', '.join(COMPLETION_ACTIONS)}")
        if self.completion_action == "post-copy" and not self.permit_post_copy:
            raise InvalidArgument("policy.completion_action", "post-copy needs permit_post_copy")
        return self

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "MigrationPolicy":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in json.loads(text or "{}").items() if k in known})


def check_destination(destination: str) -> str:
    """"host:port" of the destination agent (no scheme, no path, a port in range)."""
    host, sep, port = destination.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536 or len(destination) > 255:
        raise InvalidArgument("destination", f"{destination!r} is not host:port")
    if any(c in host for c in "/@ \t\r\n\0"):
        raise InvalidArgument("destination", f"{destination!r} is not host:port")
    return destination


@dataclass
class JobWatch:
    """What the monitor keeps between reads of libvirt's job: the progress shown never goes
    backwards, and the stall clock restarts only when the remaining data shrinks."""

    started: float
    best_remaining: int | None = None
    last_progress: float = 0.0
    iteration: int = 0
    downtime_ms: int = 0
    steps: int = 0
    percent: int = 0
    acted: str = ""
    throttle: int = 0


class VmMigrations:
    """``vm.migrate`` on the source. Collaborators: the VM operations (lock, journal, events),
    the binder (this host's claims to release after the VM left), the run directories, and
    the peer (the destination agent, contracts.MigrationPeer).

    The journal row carries what a restarted agent needs to finish the story
    (migration_recovery.py): ``destination`` and ``policy`` from the start, ``stage`` =
    ``prepared`` once the destination holds a preparation, ``completed`` once libvirt's job
    returned."""

    def __init__(self, ops: VmOps, binder: Binder, run_dirs: QemuRunDirs, peer: MigrationPeer, *,
                 max_outgoing: int = 2, host_uuid: str = "", cold: ColdMigrations | None = None) -> None:
        self.ops = ops
        self.hv = ops.hv
        self.binder = binder
        self.run_dirs = run_dirs
        self.peer = peer
        self.max_outgoing = max_outgoing
        self.host_uuid = host_uuid
        self._outgoing: set[str] = set()
        self._background: set[asyncio.Task[None]] = set()
        #: A shut-off VM moves cold (migration_cold.ColdMigrations), within the same outgoing limit.
        self.cold = cold

    async def migrate(self, ref: str, destination: str, policy: MigrationPolicy, *, request_id: str = "",
                      fingerprint: str = "", keep_source_volumes: bool = False) -> OperationRecord:
        check_destination(destination)
        policy = policy.validated()
        earlier = await self.ops.earlier(request_id, ("vm.migrate", "vm.migrate_cold"), fingerprint)
        if earlier is not None:  # a retry: found even when the VM has left this host meanwhile
            return earlier
        uuid, _ = await self.ops.inventory.lookup_uuid(ref)
        spec = await self.ops.inventory.spec(uuid)
        state = await self.ops.inventory.state(uuid)
        refuse_while_pending((await self.ops.inventory.definition(uuid)).customization, spec.name, "migrate")
        refuse_while_changes_pending(await self.ops.inventory.pending_changes(uuid, spec.name), spec.name, "migrate")
        if state == st.STOPPED and self.cold is not None:
            return await self.cold.migrate(uuid, spec, destination, self._outgoing, self.max_outgoing, request_id=request_id,
                                           fingerprint=fingerprint, keep_source_volumes=keep_source_volumes,
                                           bandwidth_mib_s=policy.bandwidth_mib_s)
        if state not in (st.RUNNING, st.PAUSED):
            raise FailedPrecondition(f"vm {spec.name!r} is not running; live migration moves running VMs", field="vm")
        self._check_limit(uuid)

        async def work(op: OperationContext) -> Any:
            self._outgoing.add(uuid)
            try:
                return await self._run(op, uuid, spec, destination, policy)
            finally:
                self._outgoing.discard(uuid)

        return await self.ops.submit("vm.migrate", uuid, work, request_id=request_id, fingerprint=fingerprint,
                                     metadata={"destination": destination, "policy": policy.to_json(), "vm_name": spec.name},
                                     cancellable=True)

    def _check_limit(self, uuid: str) -> None:
        if len(self._outgoing) >= self.max_outgoing and uuid not in self._outgoing:
            raise ResourceBusy(f"{len(self._outgoing)} outgoing migrations already run on this host (limit "
                               f"{self.max_outgoing}); retry when one has finished", field="vm")

    async def _run(self, op: OperationContext, uuid: str, spec: Any, destination: str, policy: MigrationPolicy) -> Any:
        await op.progress(2, "preparing the destination")
        xml = await self.hv.call(lambda c: c.lookupByUUIDString(uuid).XMLDesc(
            libvirt.VIR_DOMAIN_XML_MIGRATABLE | libvirt.VIR_DOMAIN_XML_SECURE), timeout=30)
        try:
            plan = await self.peer.prepare(destination, op.id, spec, xml, self.host_uuid, post_copy=policy.permit_post_copy)
        except Unavailable as exc:
            # The destination may have prepared and died before it answered: have it drop that
            # (told until it answers again; its preparation also lapses by itself).
            await self.failed(op.id, uuid, spec.name, destination, f"its preparation got no answer: {exc.message}")
            raise
        await op.note(stage="prepared", destination_libvirt_uri=plan.libvirt_uri)
        crash_point("migration.source.prepared")
        await self.ops.events.publish("vm.migration_started", resource_kind="vm", resource_id=uuid, resource_name=spec.name,
                                      message=f"{spec.name} migrating to {destination}", operation_id=op.id,
                                      attributes={"destination": destination})
        try:
            stats = await self._drive(op, uuid, spec, plan, policy, destination)
        except BaseException as exc:
            cancelled = isinstance(exc, asyncio.CancelledError)
            if not (cancelled and await self.hv.call(lambda c: left_here(c, uuid), timeout=30)):
                await self.failed(op.id, uuid, spec.name, destination, "cancelled" if cancelled else str(exc))
                raise
            # The cancel came as libvirt switched over: the VM moved, and saying CANCELLED
            # would be a lie. The operation goes on to its true end.
            log.warning("event=migration.cancel_too_late op=%s vm=%s", op.id, uuid)
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
            stats = {}
        cancelling.refuse(f"{spec.name} has moved to {destination}; the migration is finishing")
        await op.note(stage="completed")
        crash_point("migration.source.completed")
        return await self.finish(op, uuid, spec.name, destination, stats, luns_of=spec)

    # -- the two endings (also the recovery's) ------------------------------------------------------

    async def finish(self, op: OperationContext, uuid: str, name: str, destination: str, stats: dict, *,
                     luns_of: Any = None) -> Any:
        """The job completed: libvirt made the VM persistent on the destination and undefined
        it here. Tell the destination (retried while it is unreachable: it may be restarting),
        then free this host's claims and say so."""
        await op.progress(99, "finishing on the destination")
        # The VM left: its claims here are free whatever the destination answers.
        await self.binder.release_placement(uuid)
        if luns_of is not None:
            await self.binder.release_luns(luns_of, range(len(luns_of.disks)))
        self.run_dirs.remove(uuid)
        self.ops.inventory.forget(uuid)
        attrs = {"destination": destination, **{k: str(v) for k, v in stats.items()}}
        try:
            vm = await self._tell(lambda: self.peer.finish(destination, op.id, True))
        except AgentError as exc:
            await self.ops.events.publish("vm.migrated", severity="warning", resource_kind="vm", resource_id=uuid,
                                          resource_name=name, operation_id=op.id, attributes=attrs,
                                          message=f"{name} moved to {destination}; its agent did not confirm: {exc.message}")
            raise Unavailable(f"libvirt's job completed: {name} now runs on {destination} and is no longer defined here, "
                              f"but the destination agent did not confirm it: {exc.message}") from None
        await self.ops.events.publish("vm.migrated", resource_kind="vm", resource_id=uuid, resource_name=name,
                                      message=f"{name} moved to {destination}", operation_id=op.id, attributes=attrs)
        return vm

    async def failed(self, op_id: str, uuid: str, name: str, destination: str, reason: str) -> None:
        """The VM stayed here: the destination drops what it prepared (told in the background
        when it does not answer now; its preparation also expires by itself)."""
        try:
            await asyncio.shield(self.peer.abort(destination, op_id, reason))
        except Exception as exc:
            log.warning("event=migration.abort_unreached vm=%s destination=%s error=%r", uuid, destination, str(exc))
            task = asyncio.get_running_loop().create_task(self._tell(lambda: self.peer.abort(destination, op_id, reason)),
                                                          name=f"migration-abort-{op_id}")
            self._background.add(task)
            task.add_done_callback(self._background.discard)
        await self.ops.events.publish("vm.migration_failed", severity="warning", resource_kind="vm", resource_id=uuid,
                                      resource_name=name, message=f"{name} stays on this host: {reason}",
                                      operation_id=op_id, attributes={"destination": destination})

    async def _tell(self, call: Callable[[], Awaitable[Any]]) -> Any:
        """A call to the destination, retried while it is unreachable (UNAVAILABLE), for at most
        TELL_DESTINATION_S; its refusals are final."""
        deadline = time.monotonic() + TELL_DESTINATION_S
        while True:
            try:
                return await call()
            except Unavailable:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(TELL_RETRY_S)

    # -- driving and watching libvirt's job -----------------------------------------------------------

    async def _drive(self, op: OperationContext, uuid: str, spec: Any, plan: IncomingPlan, policy: MigrationPolicy,
                     destination: str) -> dict:
        """Run libvirt's job in a thread and watch it here; returns the completed job's figures."""
        flags = (libvirt.VIR_MIGRATE_LIVE | libvirt.VIR_MIGRATE_PEER2PEER | libvirt.VIR_MIGRATE_PERSIST_DEST
                 | libvirt.VIR_MIGRATE_UNDEFINE_SOURCE | libvirt.VIR_MIGRATE_ABORT_ON_ERROR)
        if policy.auto_converge:
            flags |= libvirt.VIR_MIGRATE_AUTO_CONVERGE
        if policy.permit_post_copy:
            flags |= libvirt.VIR_MIGRATE_POSTCOPY
        params: dict[str, Any] = {libvirt.VIR_MIGRATE_PARAM_DEST_XML: plan.domain_xml,
                                  libvirt.VIR_MIGRATE_PARAM_PERSIST_XML: plan.domain_xml}
        if plan.migrate_uri:
            params[libvirt.VIR_MIGRATE_PARAM_URI] = plan.migrate_uri
        if policy.bandwidth_mib_s:
            params[libvirt.VIR_MIGRATE_PARAM_BANDWIDTH] = policy.bandwidth_mib_s
            if policy.permit_post_copy:
                # The cap is the migration network's share: it holds after the switch to
                # post-copy too (QEMU's post-copy bandwidth is otherwise unlimited).
                params[libvirt.VIR_MIGRATE_PARAM_BANDWIDTH_POSTCOPY] = policy.bandwidth_mib_s << 20

        def run(conn: libvirt.virConnect) -> None:
            conn.lookupByUUIDString(uuid).migrateToURI3(plan.libvirt_uri, params, flags)

        ram_gib = max(1.0, spec.memory_mib / 1024)
        job = asyncio.ensure_future(self.hv.call(run, timeout=policy.completion_timeout_s_per_gib * ram_gib + 3600))

        async def ended() -> bool:
            await asyncio.wait([job], timeout=MONITOR_INTERVAL_S)
            return job.done()

        async def wind_down() -> None:
            deadline = time.monotonic() + ABORT_WAIT_S
            released = False
            while not job.done() and time.monotonic() < deadline:
                await asyncio.wait([job], timeout=MONITOR_INTERVAL_S)
                if job.done() or released or not await self.hv.call(lambda c: source_gave_up(c, uuid), timeout=10):
                    continue
                # libvirt's call now waits for the destination's clean-up, which a hung
                # destination QEMU stalls (its libvirtd's Finish holds that domain's monitor,
                # seen for 75 s). This QEMU has dropped its stream and the guest runs here, so
                # nothing can switch over: the destination may drop its shell now, which ends
                # libvirt's wait, instead of after ABORT_WAIT_S.
                released = True
                log.info("event=migration.release_destination_early vm=%s destination=%s", uuid, destination)
                try:
                    await asyncio.wait_for(self.peer.abort(destination, op.id, "the source aborted its migration job"),
                                           RELEASE_WAIT_S)
                except Exception as exc:  # failed() tells it again, retried
                    log.warning("event=migration.abort_unreached vm=%s destination=%s error=%r", uuid, destination, str(exc))
            if job.done():
                if not job.cancelled():
                    job.exception()  # the abort's error is the expected end of an aborted job
            else:
                # libvirt's call is still in its thread: its error (the abort) comes later and
                # is expected; read it then so it is not reported as an unhandled failure.
                log.warning("event=migration.abort_slow vm=%s waited_s=%.0f", uuid, ABORT_WAIT_S)
                job.add_done_callback(lambda f: f.cancelled() or f.exception())

        watch = await self.monitor(op, uuid, policy, ram_gib, ended, wind_down)
        try:
            job.result()
        except libvirt.libvirtError as exc:
            raise Aborted(f"libvirt's migration job failed: {exc.get_error_message()}") from None
        figures = await self.hv.call(lambda c: _completed_stats(c, uuid, plan.libvirt_uri), timeout=30)
        figures["downtime_steps"] = watch.steps
        if watch.acted:
            figures["completion_action"] = watch.acted
        return figures

    async def monitor(self, op: OperationContext, uuid: str, policy: MigrationPolicy, ram_gib: float,
                      ended: Callable[[], Awaitable[bool]], wind_down: Callable[[], Awaitable[None]], *,
                      started: float | None = None) -> JobWatch:
        """Read the job every MONITOR_INTERVAL_S until ``ended()`` (which waits up to one
        interval) says it is over; the limits abort it (then ``wind_down()`` waits until the
        VM is known not to switch over). Used for a job this process started and for one a
        previous process left running (migration_recovery.py)."""
        now = time.monotonic()
        watch = JobWatch(started=started or now, last_progress=now, downtime_ms=policy.max_downtime_ms)
        try:
            while not await ended():
                await self._watch(op, uuid, policy, watch, ram_gib)
        except BaseException as exc:
            t0 = time.monotonic()
            await self._abort_job(uuid, why=type(exc).__name__)
            t1 = time.monotonic()
            await wind_down()
            log.info("event=migration.aborted vm=%s why=%s abort_ms=%d wind_down_ms=%d", uuid, type(exc).__name__,
                     (t1 - t0) * 1000, (time.monotonic() - t1) * 1000)
            raise
        return watch

    async def _watch(self, op: OperationContext, uuid: str, policy: MigrationPolicy, w: JobWatch, ram_gib: float) -> None:
        try:
            stats = await self.hv.call(lambda c: c.lookupByUUIDString(uuid).jobStats(0), timeout=10)
        except libvirt.libvirtError:
            return  # between the job's phases (or just finished): read again next time
        now = time.monotonic()
        total = int(stats.get("data_total", 0) or stats.get("memory_total", 0))
        remaining = int(stats.get("data_remaining", stats.get("memory_remaining", 0)))
        iteration = int(stats.get("memory_iteration", 0))
        if total:
            w.percent = max(w.percent, min(98, 5 + int(93 * (total - remaining) / total)))
        throttle = int(stats.get("auto_converge_throttle", 0))
        if w.best_remaining is None or remaining < w.best_remaining:
            w.best_remaining, w.last_progress = remaining, now
        else:
            if throttle > w.throttle:
                # Auto-converge at work: the remaining data stays near its first low while QEMU
                # slows the vCPUs step by step (20-30 iterations to 99 %); each step is progress,
                # or a progress timeout would abort the migrations auto-converge is finishing.
                w.last_progress = now
            if iteration > w.iteration and w.steps < DOWNTIME_STEPS:
                w.downtime_ms = int(w.downtime_ms * 1.5)
                w.steps += 1
                await self._set_downtime(uuid, w.downtime_ms)
                log.info("event=migration.downtime vm=%s iteration=%d downtime_ms=%d", uuid, iteration, w.downtime_ms)
        w.throttle = max(w.throttle, throttle)
        if w.steps == 0 and not w.iteration and iteration:
            await self._set_downtime(uuid, w.downtime_ms)
        w.iteration = max(w.iteration, iteration)
        await op.progress(w.percent, f"migrating (iteration {iteration}, {remaining >> 20} MiB left, "
                                     f"{int(stats.get('memory_dirty_rate', 0)) * 4 >> 10} MiB/s dirtied)",
                          bytes_done=max(0, total - remaining) if total else None, bytes_total=total or None)
        if w.acted == "post-copy":
            return  # the VM runs on the destination now: nothing may abort or pause it, only wait
        if now - w.last_progress > policy.progress_timeout_s:
            raise DeadlineExceeded(f"the migration made no progress for {policy.progress_timeout_s} s "
                                   f"({remaining >> 20} MiB still to send); aborted, the VM stays here")
        if now - w.started > policy.completion_timeout_s_per_gib * ram_gib and not w.acted:
            w.acted = policy.completion_action
            if policy.completion_action == "abort":
                raise DeadlineExceeded(f"the migration did not complete within {policy.completion_timeout_s_per_gib} s "
                                       f"per GiB of RAM; aborted, the VM stays here")
            if policy.completion_action == "post-copy":
                # From the switch the VM runs on the destination: an abort would lose it.
                cancelling.commit("post-copy is in flight: the VM runs on the destination while the rest of its "
                                  "memory is pulled; it cannot be moved back")
                await self._job_call(uuid, "switch to post-copy", lambda d: d.migrateStartPostCopy(0))
            else:
                await self._job_call(uuid, "pause the guest", lambda d: d.suspend())
            log.warning("event=migration.completion_action vm=%s action=%s", uuid, policy.completion_action)

    async def _job_call(self, uuid: str, what: str, call: Callable[[libvirt.virDomain], Any]) -> None:
        """A completion action on the running job. When it fails because the job completed
        meanwhile (the domain is gone from this host) the job's own result decides; any other
        failure ends the migration (a monitor that believed in a post-copy that never started
        would stop enforcing its limits)."""

        def act(conn: libvirt.virConnect) -> str:
            try:
                call(conn.lookupByUUIDString(uuid))
                return ""
            except libvirt.libvirtError as exc:
                if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                    return ""
                return exc.get_error_message() or str(exc)

        problem = await self.hv.call(act, timeout=10)
        if problem:
            raise Aborted(f"could not {what} at the completion timeout: {problem}; aborted, the VM stays here")

    async def _set_downtime(self, uuid: str, downtime_ms: int) -> None:
        """Set the job's downtime limit. The job may have completed since its stats were read
        (with UNDEFINE_SOURCE the domain is then gone from this host): that is not a failure of
        the migration, whose own result decides; seen with two migrations at once on 2 cores."""
        try:
            await self.hv.call(lambda c: c.lookupByUUIDString(uuid).migrateSetMaxDowntime(downtime_ms, 0), timeout=10)
        except libvirt.libvirtError as exc:
            log.info("event=migration.downtime_unset vm=%s downtime_ms=%d error=%r", uuid, downtime_ms, exc.get_error_message())

    async def _abort_job(self, uuid: str, *, why: str) -> None:
        """Ask libvirt to abort the job (the caller then waits until it has ended: only then is it
        known that the VM did not switch over)."""
        try:
            await self.hv.call(lambda c: c.lookupByUUIDString(uuid).abortJob(), timeout=30)
        except libvirt.libvirtError as exc:
            log.warning("event=migration.abort vm=%s why=%s error=%r", uuid, why, exc.get_error_message())


def _completed_stats(conn: libvirt.virConnect, uuid: str, dest_uri: str) -> dict:
    """The completed job's figures (libvirt keeps them on the source domain object only while it
    exists; after UNDEFINE_SOURCE they are read from the destination). KEEP_COMPLETED: a plain
    read clears them, and an admin's ``virsh domjobinfo --completed`` on the destination should
    still show the job the agent ran."""
    which = libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED | libvirt.VIR_DOMAIN_JOB_STATS_KEEP_COMPLETED
    try:
        dom = conn.lookupByUUIDString(uuid)
        stats = dom.jobStats(which)
    except libvirt.libvirtError:
        try:
            dest = libvirt.open(dest_uri)
        except libvirt.libvirtError:
            return {}
        try:
            stats = dest.lookupByUUIDString(uuid).jobStats(which)
        except libvirt.libvirtError:
            return {}
        finally:
            dest.close()
    return {k: stats[k] for k in ("time_elapsed", "downtime", "memory_transferred", "memory_iteration") if k in stats}


def source_gave_up(conn: libvirt.virConnect, uuid: str) -> bool:
    """Whether this host's QEMU has ended its side of the migration of ``uuid`` without a
    switch-over (libvirt's job cancelled or failed) while the guest runs here: then the
    destination's incoming shell can never become the VM."""
    try:
        dom = conn.lookupByUUIDString(uuid)
        if dom.state()[0] != libvirt.VIR_DOMAIN_RUNNING:
            return False
        kind = dom.jobStats(0).get("type", libvirt.VIR_DOMAIN_JOB_NONE)
    except libvirt.libvirtError:
        return False
    log.debug("event=migration.source_job vm=%s type=%s", uuid, kind)
    return kind in (libvirt.VIR_DOMAIN_JOB_CANCELLED, libvirt.VIR_DOMAIN_JOB_FAILED)


def left_here(conn: libvirt.virConnect, uuid: str) -> bool:
    """Whether domain ``uuid`` has left this host: undefined, or stopped as migrated and about
    to be (what a completed job with UNDEFINE_SOURCE leaves)."""
    try:
        state, reason = conn.lookupByUUIDString(uuid).state()
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
            return True
        raise
    return stopped_as_migrated(state, reason)


def stopped_as_migrated(state: int, reason: int) -> bool:
    """libvirt's state for a source whose job completed and which is about to be undefined."""
    return state == libvirt.VIR_DOMAIN_SHUTOFF and reason == libvirt.VIR_DOMAIN_SHUTOFF_MIGRATED
