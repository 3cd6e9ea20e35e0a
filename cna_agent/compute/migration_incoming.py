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
really arrived).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from xml.etree import ElementTree as ET

import libvirt

from cna_agent.compute.binder import Binder
from cna_agent.compute.inventory import VmInfo
from cna_agent.compute.lifecycle import DomainRenderer
from cna_agent.compute.migration_xml import destination_xml
from cna_agent.compute.spec import VmSpec, validate
from cna_agent.compute.vmops import VmOps
from cna_agent.contracts import IncomingPlan
from cna_agent.errors import AlreadyExists, FailedPrecondition, NotFound, ResourceBusy

log = logging.getLogger(__name__)


@dataclass
class Pending:
    migration_id: str
    spec: VmSpec
    plan: IncomingPlan
    source_host_uuid: str
    expires: float
    expiry: "asyncio.TimerHandle | None" = field(default=None, repr=False)


class IncomingMigrations:
    """PrepareIncoming / FinishIncoming / AbortIncoming (migration.proto) for this host."""

    def __init__(self, ops: VmOps, binder: Binder, renderer: DomainRenderer, *, libvirt_uri: str, migrate_host: str = "",
                 max_incoming: int = 2, ttl_s: int = 600) -> None:
        self.ops = ops
        self.hv = ops.hv
        self.binder = binder
        self.renderer = renderer
        self.libvirt_uri = libvirt_uri
        self.migrate_host = migrate_host
        self.max_incoming = max_incoming
        self.ttl_s = ttl_s
        self._pending: dict[str, Pending] = {}
        self._lock = asyncio.Lock()

    def pending(self) -> list[str]:
        return sorted(self._pending)

    async def prepare(self, migration_id: str, spec: VmSpec, source_xml: str, source_host_uuid: str = "") -> IncomingPlan:
        async with self._lock:
            if migration_id in self._pending:  # the source retried: same answer, nothing claimed twice
                return self._pending[migration_id].plan
            spec = spec.copy()
            validate(spec, self.renderer.validation(self.binder.placer is not None))
            if not self.libvirt_uri:
                raise FailedPrecondition("this host takes no incoming migrations: [migration] libvirt_uri (the URI the "
                                         "source's libvirtd dials to reach this host's) is not set", field="destination")
            if len(self._pending) >= self.max_incoming:
                raise ResourceBusy(f"{len(self._pending)} incoming migrations already prepared on this host (limit "
                                   f"{self.max_incoming}); retry when one has finished", field="destination")
            await self._refuse_conflicts(spec)
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
            p = Pending(migration_id, spec, plan, source_host_uuid, time.monotonic() + self.ttl_s)
            p.expiry = asyncio.get_running_loop().call_later(self.ttl_s, lambda: asyncio.ensure_future(
                self.abort(migration_id, f"not finished within {self.ttl_s} s")))
            self._pending[migration_id] = p
        await self.ops.events.publish("vm.migration_incoming", resource_kind="vm", resource_id=spec.uuid, resource_name=spec.name,
                                      message=f"{spec.name} prepared to arrive from {source_host_uuid or 'another host'}",
                                      attributes={"migration_id": migration_id, "source_host_uuid": source_host_uuid})
        log.info("event=migration.prepared vm=%s migration=%s source=%s", spec.uuid, migration_id, source_host_uuid)
        return plan

    async def finish(self, migration_id: str, completed: bool) -> VmInfo | None:
        p = self._take(migration_id)
        uuid = p.spec.uuid
        here = await self.hv.call(lambda c: _presence(c, uuid), timeout=15)
        if not completed or here != "persistent-running":
            if here == "absent":
                await self._release(p.spec)
            if completed:
                raise FailedPrecondition(f"the source reported the migration of {p.spec.name} complete, but the VM "
                                         f"is {here.replace('-', ' ')} here", field="migration_id")
            return None
        self.ops.inventory.remember(uuid, p.spec)
        await self.ops.events.publish("vm.migrated_in", resource_kind="vm", resource_id=uuid, resource_name=p.spec.name,
                                      message=f"{p.spec.name} arrived from {p.source_host_uuid or 'another host'}",
                                      attributes={"migration_id": migration_id, "source_host_uuid": p.source_host_uuid})
        return await self.ops.inventory.get(uuid)

    async def abort(self, migration_id: str, reason: str) -> None:
        try:
            p = self._take(migration_id)
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

    def _take(self, migration_id: str) -> Pending:
        p = self._pending.pop(migration_id, None)
        if p is None:
            raise NotFound(f"no incoming migration {migration_id!r} is prepared on this host", field="migration_id")
        if p.expiry is not None:
            p.expiry.cancel()
        return p

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
