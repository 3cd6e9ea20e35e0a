"""A ``vm.migrate`` the previous agent process left open, decided from libvirt's state now.

Why it can be decided: the source agent is not in the data path. With peer-to-peer migration
the source's libvirtd drives the whole job and carries on when its client (this agent) dies
(seen here: a job whose client was SIGKILLed went on and completed, the domain persistent on
the destination and undefined on the source); and libvirt undefines the source only after the
destination is persistent. So after a restart, what this host's libvirt shows is the truth:

* the domain is gone from here: the job completed; the VM is on the destination. The
  operation is re-attached to tell the destination (FinishIncoming, retried while it may be
  restarting too) and free this host's claims; it ends with the VM as the destination reports it.
* a migration job still runs: the operation is re-attached to it (the same monitor as a live
  one: progress, the policy's limits, cancel) and ends with the job.
* the domain is here with no job: it did not move (the agent died before the job started, or
  the job failed meanwhile). The operation ends ABORTED saying so, and the destination is told
  to drop its preparation (in the background: it may be down as well; it also expires there).
* the domain is paused after a failed post-copy: its memory is split between the hosts, so it
  is never resumed here; the operation ends saying where it is and what is left to decide.

Nothing is redone: the agent never starts a second job for an operation found open.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import libvirt

from cna_agent import cancel as cancelling
from cna_agent.compute.inventory import vm_lock
from cna_agent.compute.migration import (ABORT_WAIT_S, JOB_BOUNDED, JOB_UNBOUNDED, MONITOR_INTERVAL_S, MigrationPolicy,
                                         VmMigrations, _completed_stats, stopped_as_migrated)
from cna_agent.errors import CODES, Aborted
from cna_agent.operations import OperationContext, Reattach
from cna_agent.state.journal import OperationError, OperationRecord

log = logging.getLogger(__name__)

#: libvirt's paused reasons after post-copy started (virDomainPausedReason).
PAUSED_POSTCOPY = getattr(libvirt, "VIR_DOMAIN_PAUSED_POSTCOPY", 12)
PAUSED_POSTCOPY_FAILED = getattr(libvirt, "VIR_DOMAIN_PAUSED_POSTCOPY_FAILED", 13)
#: After a job ends, how long the domain may stay here in between (libvirt clears the job,
#: then stops and undefines the source) before "still here" is believed.
SETTLE_S = 5.0


def job_state(conn: libvirt.virConnect, uuid: str) -> tuple[str, int, int, int]:
    """("gone" | "job" | "idle", domain state, reason, memory KiB) of ``uuid`` on this host.

    Any read may meet the domain being stopped and undefined by a job that just completed
    (seen under load: jobStats failed as "not running", then state() found no domain), so
    "no such domain" at any step means it left; another failure of the job read counts as
    no job, and the state is read again."""
    def gone(exc: libvirt.libvirtError) -> bool:
        return exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN

    try:
        dom = conn.lookupByUUIDString(uuid)
        try:
            job = int(dom.jobStats(0).get("type", 0))
        except libvirt.libvirtError as exc:
            if gone(exc):
                raise
            job = 0
        state, reason = dom.state()
        try:
            memory = int(dom.info()[1])
        except libvirt.libvirtError as exc:
            if gone(exc):
                raise
            memory = 0
    except libvirt.libvirtError as exc:
        if gone(exc):
            return "gone", 0, 0, 0
        raise
    if job in (JOB_BOUNDED, JOB_UNBOUNDED):
        return "job", state, reason, memory
    if stopped_as_migrated(state, reason):
        return "gone", state, reason, memory  # it left: stopped here as migrated, being undefined
    return "idle", state, reason, memory


async def settled_state(hv: Any, uuid: str) -> tuple[str, int, int, int]:
    """``job_state`` once it is stable: "idle" is re-read for up to SETTLE_S, because a job
    that just completed leaves the domain here for a moment with no job (paused at the
    switch-over) before libvirt stops and undefines it (seen under load: read in that moment,
    a completed move looked failed)."""
    deadline = time.monotonic() + SETTLE_S
    while True:
        now = await hv.call(lambda c: job_state(c, uuid), timeout=30)
        if now[0] != "idle" or now[1] not in (libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_PAUSED) \
                or time.monotonic() > deadline:
            return now
        await asyncio.sleep(0.5)


class MigrationRecovery:
    def __init__(self, migrations: VmMigrations) -> None:
        self.m = migrations
        self.hv = migrations.hv

    async def recover(self, record: OperationRecord) -> Any:
        uuid = record.target
        md = record.metadata
        destination = md.get("destination", "")
        name = md.get("vm_name", uuid)
        policy = MigrationPolicy.from_json(md.get("policy", "{}"))
        where, state, reason, memory_kib = await settled_state(self.hv, uuid)
        log.warning("event=migration.recovering op=%s vm=%s stage=%s here=%s state=%d reason=%d", record.id, uuid,
                    md.get("stage", ""), where, state, reason)
        if where == "gone":
            if not md.get("stage"):
                return OperationError(CODES["ABORTED"], f"the agent stopped before {name} was prepared on {destination}, "
                                                        "and the VM is no longer defined here (removed outside the agent)")
            dest_uri = md.get("destination_libvirt_uri", "")

            async def finish(op: OperationContext) -> Any:
                stats = await self.hv.call(lambda c: _completed_stats(c, uuid, dest_uri), timeout=30) if dest_uri else {}
                return await self.m.finish(op, uuid, name, destination, stats)

            return Reattach(finish, vm_lock(uuid))
        if where == "job":
            return Reattach(lambda op: self._follow(op, uuid, name, destination, policy, memory_kib), vm_lock(uuid),
                            cancellable=True)
        if state == libvirt.VIR_DOMAIN_PAUSED and reason in (PAUSED_POSTCOPY, PAUSED_POSTCOPY_FAILED):
            return OperationError(CODES["ABORTED"], f"post-copy of {name} to {destination} did not complete while the agent "
                                                    "was down; the VM is paused here and is not resumed here (part of its "
                                                    "memory is on the destination): check the destination before acting")
        self._tell_failed(record.id, uuid, name, destination, "the source agent restarted; the VM did not move")
        shows = "running" if state == libvirt.VIR_DOMAIN_RUNNING else "paused" if state == libvirt.VIR_DOMAIN_PAUSED else "stopped"
        return OperationError(CODES["ABORTED"], f"the agent stopped while {name} was migrating to {destination}; libvirt "
                                                f"shows no migration job and the VM {shows} here: it did not move and "
                                                "stays on this host (the destination was told to drop its preparation)")

    def _tell_failed(self, op_id: str, uuid: str, name: str, destination: str, reason: str) -> None:
        """At start-up nothing may wait on an unreachable destination: tell it in the background."""
        if not destination:
            return
        task = asyncio.get_running_loop().create_task(self.m.failed(op_id, uuid, name, destination, reason),
                                                      name=f"migration-recovered-abort-{op_id}")
        self.m._background.add(task)
        task.add_done_callback(self.m._background.discard)

    async def _follow(self, op: OperationContext, uuid: str, name: str, destination: str, policy: MigrationPolicy,
                      memory_kib: int) -> Any:
        """Follow the job the previous process started until it ends, with the same limits."""
        self.m._outgoing.add(uuid)
        last = ["job"]

        async def ended() -> bool:
            await asyncio.sleep(MONITOR_INTERVAL_S)
            last[0] = (await self.hv.call(lambda c: job_state(c, uuid), timeout=30))[0]
            return last[0] != "job"

        async def wind_down() -> None:
            deadline = time.monotonic() + ABORT_WAIT_S
            while time.monotonic() < deadline and (await self.hv.call(lambda c: job_state(c, uuid), timeout=30))[0] == "job":
                await asyncio.sleep(MONITOR_INTERVAL_S)

        try:
            await op.progress(5, "migrating (re-attached after an agent restart)")
            try:
                await self.m.monitor(op, uuid, policy, max(1.0, memory_kib / (1 << 20)), ended, wind_down)
            except BaseException as exc:
                cancelled = isinstance(exc, asyncio.CancelledError)
                if not (cancelled and (await settled_state(self.hv, uuid))[0] == "gone"):
                    await self.m.failed(op.id, uuid, name, destination, "cancelled" if cancelled else str(exc))
                    raise
                task = asyncio.current_task()  # the cancel came as libvirt switched over: it moved
                if task is not None:
                    task.uncancel()
                last[0] = "gone"
            if last[0] != "gone":
                last[0] = (await settled_state(self.hv, uuid))[0]
            if last[0] == "gone":
                cancelling.refuse(f"{name} has moved to {destination}; the migration is finishing")
                return await self.m.finish(op, uuid, name, destination, {})
            await self.m.failed(op.id, uuid, name, destination, "libvirt's job ended without completing")
            raise Aborted(f"libvirt's migration job of {name} ended without completing while the agent was re-attached; "
                          "the VM stays on this host")
        finally:
            self.m._outgoing.discard(uuid)
