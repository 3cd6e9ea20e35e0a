"""Live migration, the destination's side: prepare before any memory moves, then finish or abort.

Why the destination decides (VDSM's ``migrationCreate``, nova's pre_live_migration): only this
host knows which of its CPUs are free, which bridges its port groups map to, whether its LUN
sessions and volumes are there and whether its CPU can run the guest's model. So PrepareIncoming
claims everything here the way a create would (binder: placement plan, LUN claims, port groups),
checks the CPU with libvirt's compareHypervisorCPU, writes the destination's definition
(migration_xml.py) and makes the VM's directories; anything that does not fit is refused with
the reason before the source's libvirt starts the job.

A preparation is held for ``ttl_s``: a source that dies or loses the destination before it
finishes or aborts cannot leave claims behind here (the expiry releases them unless the VM
really arrived). It is also written to the state database (kv ``migration.incoming.<id>``), so
an agent restarted mid-migration still knows it: at start-up (``restore``) a VM that arrived
meanwhile is adopted, one still arriving keeps its preparation (and its placement claim, which
the placements table kept) until its source finishes or aborts, and an expired one is released.
FinishIncoming for a preparation this host no longer holds is answered from libvirt's state:
a VM running and persistent here arrived, whatever happened to the preparation.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Callable
from xml.etree import ElementTree as ET

import libvirt

from cna_agent.compute.binder import Binder
from cna_agent.compute.inventory import VmInfo
from cna_agent.compute.lifecycle import DomainRenderer
from cna_agent.compute.migration_xml import destination_xml
from cna_agent.compute.reservations import ReservationAdmission
from cna_agent.compute.spec import VmSpec
from cna_agent.compute.spec_validation import validate
from cna_agent.compute.vmops import VmOps
from cna_agent.contracts import HostAdmission, IncomingPlan
from cna_agent.errors import AlreadyExists, FailedPrecondition, NotFound, ResourceBusy
from cna_agent.failpoints import crash_point
from cna_agent.qemu_access import post_copy_blocker
from cna_agent.state.store import StateStore

log = logging.getLogger(__name__)

KV_PREFIX = "migration.incoming."


@dataclass
class Pending:
    migration_id: str
    spec: VmSpec
    plan: IncomingPlan
    source_host_uuid: str
    #: Wall-clock time (it must survive a restart) when the preparation lapses.
    expires: float
    expiry: "asyncio.TimerHandle | None" = field(default=None, repr=False)

    def to_json(self) -> str:
        return json.dumps({"migration_id": self.migration_id, "spec": self.spec.to_dict(), "source_host_uuid": self.source_host_uuid,
                           "expires": self.expires, "plan": {"libvirt_uri": self.plan.libvirt_uri, "migrate_uri": self.plan.migrate_uri,
                                                             "domain_xml": self.plan.domain_xml, "ttl_s": self.plan.ttl_s}})

    @classmethod
    def from_json(cls, text: str) -> "Pending":
        d = json.loads(text)
        return cls(d["migration_id"], VmSpec.from_dict(d["spec"]), IncomingPlan(**d["plan"]), d["source_host_uuid"], d["expires"])


class IncomingMigrations:
    """PrepareIncoming / FinishIncoming / AbortIncoming (migration.proto) for this host."""

    def __init__(self, ops: VmOps, binder: Binder, renderer: DomainRenderer, *, libvirt_uri: str, migrate_host: str = "",
                 max_incoming: int = 2, ttl_s: int = 600, store: StateStore | None = None,
                 admission: HostAdmission | None = None, reservations: ReservationAdmission | None = None) -> None:
        self.ops = ops
        #: The VM's CPU and memory reservations must fit beside those running and arriving here.
        self.reservations = reservations
        #: A host in maintenance takes no incoming VMs (contracts.HostAdmission).
        self.admission = admission
        self.hv = ops.hv
        self.binder = binder
        self.renderer = renderer
        self.libvirt_uri = libvirt_uri
        self.migrate_host = migrate_host
        self.max_incoming = max_incoming
        self.ttl_s = ttl_s
        self.store = store
        self._pending: dict[str, Pending] = {}
        #: vm uuid -> the migration it arrived with (answers a repeated FinishIncoming).
        self._arrivals: dict[str, str] = {}
        self._lock = asyncio.Lock()
        #: Incoming cold migrations prepared here (the wiring sets it): max_incoming counts both kinds.
        self.busy_elsewhere: Callable[[], int] = lambda: 0

    def pending(self) -> list[str]:
        return sorted(self._pending)

    def arriving(self) -> set[str]:
        """UUIDs of the VMs prepared to arrive (their claims are held for them)."""
        return {p.spec.uuid for p in self._pending.values()}

    async def prepare(self, migration_id: str, spec: VmSpec, source_xml: str, source_host_uuid: str = "", *,
                      post_copy: bool = False) -> IncomingPlan:
        async with self._lock:
            if migration_id in self._pending:  # the source retried: same answer, nothing claimed twice
                return self._pending[migration_id].plan
            spec = spec.copy()
            validate(spec, self.renderer.validation(self.binder.placer is not None))
            if self.admission is not None:
                self.admission.check_admission("incoming migrations", field="destination")
            if not self.libvirt_uri:
                raise FailedPrecondition("this host takes no incoming migrations: [migration] libvirt_uri (the URI the "
                                         "source's libvirtd dials to reach this host's) is not set", field="destination")
            if len(self._pending) + self.busy_elsewhere() >= self.max_incoming:
                raise ResourceBusy(f"{len(self._pending) + self.busy_elsewhere()} incoming migrations already prepared on this host (limit "
                                   f"{self.max_incoming}); retry when one has finished", field="destination")
            blocker = post_copy_blocker(self.hv.qemu_user()) if post_copy else ""
            if blocker:
                raise FailedPrecondition(f"this host cannot take a post-copy migration: {blocker}", field="policy.permit_post_copy")
            await self._refuse_conflicts(spec)
            if self.reservations is not None:
                await self.reservations.check(spec.uuid, spec, f"taking vm {spec.name!r}",
                                              arriving=[(p.spec.name, p.spec) for p in self._pending.values()])
            await self._check_cpu(source_xml)
            bindings = await self.binder.bindings(spec)
            try:
                xml = destination_xml(source_xml, self.renderer.build(spec, bindings))
                self.renderer.prepare_dirs(spec, self.hv.qemu_user())
            except BaseException:
                await self._release(spec)
                raise
            migrate_uri = f"tcp://{self.migrate_host}" if self.migrate_host else ""
            plan = IncomingPlan(libvirt_uri=self.libvirt_uri, migrate_uri=migrate_uri, domain_xml=xml, ttl_s=self.ttl_s)
            p = Pending(migration_id, spec, plan, source_host_uuid, time.time() + self.ttl_s)
            crash_point("migration.incoming.claimed")
            try:
                await self._save(p)
            except BaseException:
                await self._release(spec)
                raise
            self._hold(p)
        crash_point("migration.incoming.prepared")
        await self.ops.events.publish("vm.migration_incoming", resource_kind="vm", resource_id=spec.uuid, resource_name=spec.name,
                                      message=f"{spec.name} prepared to arrive from {source_host_uuid or 'another host'}",
                                      attributes={"migration_id": migration_id, "source_host_uuid": source_host_uuid})
        log.info("event=migration.prepared vm=%s migration=%s source=%s", spec.uuid, migration_id, source_host_uuid)
        return plan

    async def restore(self) -> int:
        """At start-up: the preparations a previous process held (see the module's docstring)."""
        if self.store is None:
            return 0
        rows = await self.store.run(self.store.query, "SELECT key, value FROM kv WHERE key LIKE ?", (KV_PREFIX + "%",))
        for row in rows:
            try:
                p = Pending.from_json(row["value"])
            except (ValueError, KeyError, TypeError) as exc:
                log.error("event=migration.incoming_unreadable key=%s error=%r", row["key"], str(exc))
                await self.store.run(self.store.execute, "DELETE FROM kv WHERE key = ?", (row["key"],))
                continue
            here = await self.hv.call(lambda c: _presence(c, p.spec.uuid), timeout=15)
            log.warning("event=migration.incoming_restored vm=%s migration=%s here=%s", p.spec.uuid, p.migration_id, here)
            if here == "persistent-running":  # arrived while the agent was down: it is ours now
                await self._forget(p.migration_id)
                await self._arrived(p)
            elif time.time() >= p.expires and here == "absent":
                await self._forget(p.migration_id)
                await self._release(p.spec)
            else:
                self._hold(p)
        return len(rows)

    async def finish(self, migration_id: str, completed: bool) -> VmInfo | None:
        try:
            p = await self._take(migration_id)
        except NotFound:
            return await self._finish_unheld(migration_id, completed)
        uuid = p.spec.uuid
        here = await self.hv.call(lambda c: _presence(c, uuid), timeout=15)
        if not completed or here != "persistent-running":
            if here == "absent":
                await self._release(p.spec)
            if completed:
                raise FailedPrecondition(f"the source reported the migration of {p.spec.name} complete, but the VM "
                                         f"is {here.replace('-', ' ')} here", field="migration_id")
            return None
        await self._arrived(p)
        return await self.ops.inventory.get(uuid)

    async def _finish_unheld(self, migration_id: str, completed: bool) -> VmInfo | None:
        """FinishIncoming for a preparation not held (any more): adopted at restart, or retried
        by a source whose first FinishIncoming got no answer. The VM arrived iff a managed domain
        recorded with this migration runs persistent here."""
        if completed:
            for info in await self.ops.inventory.list():
                if self._arrivals.get(info.uuid) == migration_id:
                    return info
        raise NotFound(f"no incoming migration {migration_id!r} is prepared on this host", field="migration_id")

    async def _arrived(self, p: Pending) -> None:
        self.ops.inventory.remember(p.spec.uuid, p.spec)
        self._arrivals[p.spec.uuid] = p.migration_id
        await self.ops.events.publish("vm.migrated_in", resource_kind="vm", resource_id=p.spec.uuid, resource_name=p.spec.name,
                                      message=f"{p.spec.name} arrived from {p.source_host_uuid or 'another host'}",
                                      attributes={"migration_id": p.migration_id, "source_host_uuid": p.source_host_uuid})

    async def abort(self, migration_id: str, reason: str) -> None:
        try:
            p = await self._take(migration_id)
        except NotFound:
            return  # finished, aborted or expired already: nothing is held for it
        here = await self.hv.call(lambda c: _presence(c, p.spec.uuid), timeout=15)
        if here == "transient-incoming":
            # The source said the job failed and its VM runs there: what is here is only the
            # paused shell QEMU started for the incoming stream (a hung one, e.g. SIGSTOPped,
            # keeps libvirt's own clean-up waiting). Never a running guest: that is kept below.
            await self.hv.call(lambda c: _destroy_incoming(c, p.spec.uuid), timeout=60)
            here = await self.hv.call(lambda c: _presence(c, p.spec.uuid), timeout=15)
        if here == "absent":
            await self._release(p.spec)
        else:
            # libvirt had already switched the VM over (or is still cleaning up): what runs here is
            # kept and adopted, never destroyed on the source's word.
            self.ops.inventory.remember(p.spec.uuid, p.spec)
        log.warning("event=migration.incoming_aborted vm=%s migration=%s reason=%r here=%s", p.spec.uuid, migration_id, reason, here)
        await self.ops.events.publish("vm.migration_incoming_aborted", severity="warning", resource_kind="vm",
                                      resource_id=p.spec.uuid, resource_name=p.spec.name,
                                      message=f"incoming {p.spec.name} aborted: {reason}", attributes={"migration_id": migration_id})

    # -- helpers -----------------------------------------------------------------------------------

    def _hold(self, p: Pending) -> None:
        delay = max(0.0, p.expires - time.time())
        p.expiry = asyncio.get_running_loop().call_later(delay, lambda: asyncio.ensure_future(
            self.abort(p.migration_id, f"not finished within {p.plan.ttl_s} s")))
        self._pending[p.migration_id] = p

    async def _take(self, migration_id: str) -> Pending:
        p = self._pending.pop(migration_id, None)
        if p is None:
            raise NotFound(f"no incoming migration {migration_id!r} is prepared on this host", field="migration_id")
        if p.expiry is not None:
            p.expiry.cancel()
        await self._forget(migration_id)
        return p

    async def _save(self, p: Pending) -> None:
        if self.store is not None:
            await self.store.run(self.store.set_value, KV_PREFIX + p.migration_id, p.to_json())

    async def _forget(self, migration_id: str) -> None:
        if self.store is not None:
            await self.store.run(self.store.execute, "DELETE FROM kv WHERE key = ?", (KV_PREFIX + migration_id,))

    async def _release(self, spec: VmSpec) -> None:
        await self.binder.release_placement(spec.uuid)
        await self.binder.release_luns(spec, range(len(spec.disks)))
        self.renderer.run_dirs.remove(spec.uuid)

    async def _refuse_conflicts(self, spec: VmSpec) -> None:
        def check(conn: libvirt.virConnect) -> str:
            for ref, what in ((spec.uuid, "uuid"), (spec.name, "name")):
                try:
                    dom = conn.lookupByUUIDString(ref) if what == "uuid" else conn.lookupByName(ref)
                except libvirt.libvirtError:
                    continue
                return f"a VM with {what} {ref!r} already exists on the destination ({dom.name()})"
            return ""

        problem = await self.hv.call(check, timeout=15)
        if problem:
            raise AlreadyExists(problem, field="spec")

    async def _check_cpu(self, source_xml: str) -> None:
        """The guest's CPU model must run here (FusionCompute's cluster CPU compatibility)."""
        root = ET.fromstring(source_xml)
        cpu = root.find("cpu")
        if cpu is None or cpu.get("mode") in ("host-passthrough", "maximum"):
            return  # nothing to compare: such guests only move between identical hosts (the VRM's rule)
        os_type = root.find("os/type")
        arch = os_type.get("arch") if os_type is not None else None
        machine = os_type.get("machine") if os_type is not None else None
        virt = root.get("type")
        xml = ET.tostring(cpu, encoding="unicode")

        def compare(conn: libvirt.virConnect) -> int:
            return conn.compareHypervisorCPU(None, arch, machine, virt, xml, 0)

        try:
            result = await self.hv.call(compare, timeout=30)
        except libvirt.libvirtError as exc:
            raise FailedPrecondition(f"this host cannot run the guest's CPU: {exc.get_error_message()}", field="spec") from None
        if result == libvirt.VIR_CPU_COMPARE_INCOMPATIBLE:
            raise FailedPrecondition("this host's CPU is incompatible with the guest's CPU model", field="spec")


def _presence(conn: libvirt.virConnect, uuid: str) -> str:
    """"absent", "transient-incoming" (the paused QEMU waiting for a migration stream), or
    "<persistent|transient>-<running|stopped>" for the domain with ``uuid``."""
    try:
        dom = conn.lookupByUUIDString(uuid)
        persistent, active = dom.isPersistent(), dom.isActive()
        state, reason = dom.state() if active else (0, 0)
    except libvirt.libvirtError:
        return "absent"
    if active and not persistent and state == libvirt.VIR_DOMAIN_PAUSED and reason == libvirt.VIR_DOMAIN_PAUSED_MIGRATION:
        return "transient-incoming"
    return f"{'persistent' if persistent else 'transient'}-{'running' if active else 'stopped'}"


def _destroy_incoming(conn: libvirt.virConnect, uuid: str) -> None:
    try:
        conn.lookupByUUIDString(uuid).destroy()
    except libvirt.libvirtError as exc:  # gone meanwhile (libvirt's own clean-up won)
        log.info("event=migration.incoming_destroy vm=%s error=%r", uuid, exc.get_error_message())
