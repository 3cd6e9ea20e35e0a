"""Cold migration, the destination's side: prepare, receive volumes, define; or abort clean.

Why the destination decides (as for live migration, migration_incoming.py): only this host knows
its free CPUs, port groups, LUN sessions, datastores and free space. PrepareColdIncoming claims
placement, LUNs and port groups the way a create would (binder.bindings over the disks that
already exist here), refuses a name or uuid this host already has, and answers per file disk
whether this host already sees that very file (shared datastore) or where the copy goes.

Only at FinishColdIncoming, when every copy is in place, is the VM rendered for this host
(render.build_domain with this host's bindings: its paths, its pins, its bridges; a stopped VM
has no guest ABI to preserve, so unlike the live path nothing of the source's XML is kept) and
defined persistently. A preparation that is neither finished nor aborted within ``ttl_s`` is
aborted here (its copies removed, its claims released), so a source that died leaves nothing.

After a successful finish nothing is held for the migration any more: an abort that arrives
later (the source lost the reply) finds nothing and leaves the defined VM alone, so the VM can
end up defined on both hosts (both stopped) but never on neither. An abort after a finish that
failed (e.g. libvirt's define call ran past its deadline but happened) undefines the stopped VM
again: the prepare refused any VM with that uuid, so one here now is this migration's.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import AsyncIterable, Callable

import libvirt

from cna_agent.compute.binder import Binder
from cna_agent.compute.inventory import VmInfo
from cna_agent.compute.lifecycle import DomainRenderer
from cna_agent.compute.spec import VmSpec
from cna_agent.compute.spec_validation import validate
from cna_agent.compute.vmops import VmOps
from cna_agent.contracts import FileIdentity, HostAdmission, ReceivePlan, TransferChunk, VolumeTransfer
from cna_agent.errors import AlreadyExists, FailedPrecondition, Internal, InvalidArgument, NotFound, ResourceBusy

log = logging.getLogger(__name__)


@dataclass
class ColdPending:
    migration_id: str
    spec: VmSpec
    #: disk index -> the plan for it (file disks only).
    plans: dict[int, ReceivePlan]
    source_host_uuid: str
    identities: dict[int, FileIdentity] = field(default_factory=dict)
    #: Copies finished (linked under their final name) and in progress.
    received: set[int] = field(default_factory=set)
    receiving: set[int] = field(default_factory=set)
    #: FinishColdIncoming got as far as defining (libvirt may have the VM even if the call failed).
    finishing: bool = False
    expiry: "asyncio.TimerHandle | None" = field(default=None, repr=False)


class ColdIncoming:
    """PrepareColdIncoming / PushVolume / FinishColdIncoming / AbortColdIncoming for this host.
    ``busy_elsewhere``: how many incoming live migrations are prepared (the per-host limit
    ``max_incoming`` counts both kinds)."""

    def __init__(self, ops: VmOps, binder: Binder, renderer: DomainRenderer, transfer: VolumeTransfer | None, *,
                 max_incoming: int = 2, ttl_s: int = 600, busy_elsewhere: Callable[[], int] = lambda: 0,
                 admission: HostAdmission | None = None) -> None:
        self.ops = ops
        self.admission = admission
        self.hv = ops.hv
        self.binder = binder
        self.renderer = renderer
        self.transfer = transfer
        self.max_incoming = max_incoming
        self.ttl_s = ttl_s
        self.busy_elsewhere = busy_elsewhere
        self._pending: dict[str, ColdPending] = {}
        self._lock = asyncio.Lock()

    def pending(self) -> list[str]:
        return sorted(self._pending)

    # -- prepare -----------------------------------------------------------------------------------

    async def prepare(self, migration_id: str, spec: VmSpec, disks: dict[int, FileIdentity],
                      source_host_uuid: str = "") -> dict[int, ReceivePlan]:
        spec = spec.copy()
        validate(spec, self.renderer.validation(self.binder.placer is not None))
        async with self._lock:
            known = self._pending.get(migration_id)
            if known is not None:  # the source retried: same answer, nothing claimed twice
                if known.spec != spec or known.identities != disks:
                    raise AlreadyExists(f"migration {migration_id!r} is already prepared here for another request",
                                        field="migration_id")
                return known.plans
            if self.admission is not None:
                self.admission.check_admission("incoming migrations", field="destination")
            if self.transfer is None:
                raise FailedPrecondition("this host takes no cold migrations: its storage subsystem is not running",
                                         field="destination")
            if len(self._pending) + self.busy_elsewhere() >= self.max_incoming:
                raise ResourceBusy(f"{len(self._pending) + self.busy_elsewhere()} incoming migrations already prepared on "
                                   f"this host (limit {self.max_incoming}); retry when one has finished", field="destination")
            files = [i for i, d in enumerate(spec.disks) if d.volume]
            if sorted(disks) != files:
                raise InvalidArgument("disks", f"the source must describe exactly the file disks {files}, not {sorted(disks)}")
            await self._refuse_conflicts(spec)
            wanted = []
            for i in files:
                vol, fld = spec.disks[i].volume, f"spec.disks[{i}].volume"
                # Host paths outside the datastores are confined to this host's image_dirs first.
                wanted.append((self.binder.local_files.confine(vol, field=fld) if vol.startswith("/") else vol, disks[i], fld))
            plans = dict(zip(files, await self.transfer.plan_receive(wanted)))
            # Claim now what exists here (placement, LUNs, port groups, shared volumes, boot
            # files): the copies are bound at finish, once they are in place.
            probe = spec.copy()
            probe.disks = [d for i, d in enumerate(spec.disks) if not (i in plans and plans[i].copy)]
            try:
                await self.binder.bindings(probe)
            except BaseException:
                await self._release(spec)
                raise
            p = ColdPending(migration_id, spec, plans, source_host_uuid, dict(disks))
            p.expiry = asyncio.get_running_loop().call_later(self.ttl_s, lambda: asyncio.ensure_future(
                self.abort(migration_id, f"not finished within {self.ttl_s} s")))
            self._pending[migration_id] = p
        copies = sum(1 for pl in plans.values() if pl.copy)
        await self.ops.events.publish("vm.migration_incoming", resource_kind="vm", resource_id=spec.uuid, resource_name=spec.name,
                                      message=f"{spec.name} (shut off) prepared to arrive from {source_host_uuid or 'another host'}",
                                      attributes={"migration_id": migration_id, "source_host_uuid": source_host_uuid,
                                                  "cold": "true", "disks_copied": str(copies)})
        log.info("event=migration.cold_prepared vm=%s migration=%s copies=%d", spec.uuid, migration_id, copies)
        return plans

    # -- receive -----------------------------------------------------------------------------------

    async def receive(self, migration_id: str, index: int, size: int, chunks: AsyncIterable[TransferChunk]) -> int:
        p = self._get(migration_id)
        plan = p.plans.get(index)
        if plan is None or not plan.copy:
            raise InvalidArgument("disk_index", f"disk {index} of {p.spec.name} is not one this host receives")
        ident = p.identities.get(index)
        if ident is not None and not ident.has_backing and size != ident.size:  # a flattened file has its own size
            raise InvalidArgument("size_bytes", f"{size} is not the {ident.size} bytes the source announced for disk {index}")
        if index in p.received or index in p.receiving:
            raise AlreadyExists(f"disk {index} of {p.spec.name} is already received or being received", field="disk_index")
        assert self.transfer is not None
        p.receiving.add(index)
        try:
            written = await self.transfer.receive(plan.path, size, chunks)
        finally:
            p.receiving.discard(index)
        if self._pending.get(migration_id) is not p:  # aborted meanwhile: the abort did not know this file yet
            await self.transfer.remove(plan.path)
            raise NotFound(f"the incoming migration {migration_id!r} was aborted during the copy", field="migration_id")
        p.received.add(index)
        log.info("event=migration.cold_received vm=%s disk=%d bytes=%d", p.spec.uuid, index, written)
        return written

    # -- finish / abort ----------------------------------------------------------------------------

    async def finish(self, migration_id: str) -> VmInfo:
        p = self._get(migration_id)
        spec = p.spec
        missing = [i for i, pl in p.plans.items() if pl.copy and i not in p.received]
        if missing or p.receiving:
            raise FailedPrecondition(f"disks {sorted(set(missing) | p.receiving)} of {spec.name} have not arrived", field="migration_id")
        bindings = await self.binder.bindings(spec)
        xml = self.renderer.render(spec, bindings)
        self.renderer.prepare_dirs(spec, self.hv.qemu_user())

        def define(conn: libvirt.virConnect) -> None:
            problem = name_conflict(conn, spec)
            if problem:
                raise AlreadyExists(problem, field="spec")
            try:
                dom = conn.defineXML(xml)
            except libvirt.libvirtError as exc:
                raise Internal(f"libvirt refused the domain definition: {exc.get_error_message()}") from None
            if spec.autostart:
                dom.setAutostart(1)

        p.finishing = True
        await self.hv.call(define, timeout=30)
        # Done: from here nothing of the migration is held (an abort finds nothing, the expiry is off).
        self._take(migration_id)
        self.ops.inventory.remember(spec.uuid, spec)
        await self.ops.events.publish("vm.migrated_in", resource_kind="vm", resource_id=spec.uuid, resource_name=spec.name,
                                      message=f"{spec.name} arrived (shut off) from {p.source_host_uuid or 'another host'}",
                                      attributes={"migration_id": migration_id, "source_host_uuid": p.source_host_uuid,
                                                  "cold": "true"})
        return await self.ops.inventory.get(spec.uuid)

    async def abort(self, migration_id: str, reason: str) -> None:
        try:
            p = self._take(migration_id)
        except NotFound:
            return  # finished, aborted or expired already: nothing is held for it
        if p.finishing:
            await self.hv.call(lambda c: _undefine_stopped(c, p.spec.uuid), timeout=30)
        assert self.transfer is not None
        for i in sorted(p.received):
            await self.transfer.remove(p.plans[i].path)
        await self._release(p.spec)
        log.warning("event=migration.cold_incoming_aborted vm=%s migration=%s reason=%r", p.spec.uuid, migration_id, reason)
        await self.ops.events.publish("vm.migration_incoming_aborted", severity="warning", resource_kind="vm",
                                      resource_id=p.spec.uuid, resource_name=p.spec.name,
                                      message=f"incoming {p.spec.name} aborted: {reason}",
                                      attributes={"migration_id": migration_id, "cold": "true"})

    # -- helpers -----------------------------------------------------------------------------------

    def _get(self, migration_id: str) -> ColdPending:
        p = self._pending.get(migration_id)
        if p is None:
            raise NotFound(f"no incoming cold migration {migration_id!r} is prepared on this host", field="migration_id")
        return p

    def _take(self, migration_id: str) -> ColdPending:
        p = self._get(migration_id)
        del self._pending[migration_id]
        if p.expiry is not None:
            p.expiry.cancel()
        return p

    async def _release(self, spec: VmSpec) -> None:
        await self.binder.release_placement(spec.uuid)
        await self.binder.release_luns(spec, range(len(spec.disks)))
        self.renderer.run_dirs.remove(spec.uuid)

    async def _refuse_conflicts(self, spec: VmSpec) -> None:
        problem = await self.hv.call(lambda c: name_conflict(c, spec), timeout=15)
        if problem:
            raise AlreadyExists(problem, field="spec")


def name_conflict(conn: libvirt.virConnect, spec: VmSpec) -> str:
    for ref, what in ((spec.uuid, "uuid"), (spec.name, "name")):
        try:
            dom = conn.lookupByUUIDString(ref) if what == "uuid" else conn.lookupByName(ref)
        except libvirt.libvirtError:
            continue
        return f"a VM with {what} {ref!r} already exists on the destination ({dom.name()})"
    return ""


def _undefine_stopped(conn: libvirt.virConnect, uuid: str) -> None:
    """Undo a definition this host made for an aborted move, unless the VM was started here meanwhile."""
    try:
        dom = conn.lookupByUUIDString(uuid)
        if not dom.isActive():
            dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_NVRAM)
    except libvirt.libvirtError as exc:
        log.info("event=migration.cold_undefine vm=%s error=%r", uuid, exc.get_error_message())

