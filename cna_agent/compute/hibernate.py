"""Hibernate and resume: a running VM's RAM goes to a datastore and comes back, here or on
another host that sees the datastore.

FusionCompute's hibernate / VDSM's VM.hibernate: the VM keeps nothing of the host while it is
hibernated (no QEMU, no CPU or memory placement), and any host that sees the state can bring
the guest back where it stopped. How, on libvirt 9.0:

* **Save**: virDomainSaveFlags writes the guest's RAM and device state to
  ``memory.save`` in the datastore's state area (hibernate_store.py) beside a record of what
  a host needs to restore it (the agent's spec, the persistent definition) and, for a UEFI
  guest, a copy of its variable store (QEMU's pflash is not in the save image). Only then is
  the hibernate mark written into the definition (the VM shows as HIBERNATED) and its
  placement released. A failed save leaves the guest running here (libvirt resumes it; the
  agent resumes it if libvirt left it paused) and removes what was written.
* **Resume**: the host that resumes claims the state (a file linked into place, so only one host ever
  can), plans its own placement and bindings, splices them into the saved guest's XML
  (migration_xml.destination_xml: the guest ABI stays the saved one, the host side is this
  host's), defines the VM persistently and restores it with virDomainRestoreFlags. The guest
  clock is set to the host's afterwards when the VM has a guest agent (the guest's clock stood
  still while it was saved). A failed resume drops the claim and leaves the state resumable.
* **Elsewhere**: the saving host learns from the claim that another host took the VM (the
  ``hibernation`` check of the per-VM reconcile) and undefines its copy, keeping the disks.

A VM with external snapshots is refused: the restoring host would point its disks at the
spec's volumes rather than at the overlays (the same limit as a placement re-plan).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import TYPE_CHECKING, Any, Awaitable, Callable

import libvirt

from cna_agent import cancel as cancelling
from cna_agent.blocking import BlockingPool
from cna_agent.compute import hibernate_store as hs
from cna_agent.compute import snapshots as snaps
from cna_agent.compute import state as st
from cna_agent.compute.binder import Binder
from cna_agent.compute.migration_cold_incoming import name_conflict
from cna_agent.compute.migration_xml import destination_xml
from cna_agent.compute.pending_changes import refuse_while_pending
from cna_agent.compute.render import nvram_path
from cna_agent.compute.spec import UUID_RE, VmSpec
from cna_agent.compute.spec_validation import validate
from cna_agent.compute.vmops import VmOps
from cna_agent.contracts import HostAdmission
from cna_agent.failpoints import crash_point
from cna_agent.errors import AgentError, AlreadyExists, FailedPrecondition, Internal, InvalidArgument, NotFound, ResourceExhausted
from cna_agent.hypervisor import CHANGE_OUTLAST_S
from cna_agent.operations import OperationContext
from cna_agent.state.journal import OperationRecord

if TYPE_CHECKING:
    from cna_agent.compute.lifecycle import DomainRenderer
    from cna_agent.compute.reservations import ReservationAdmission

log = logging.getLogger(__name__)

MiB = 1 << 20
#: Longest a save or a restore may take (a 64 GiB guest on a slow NFS datastore).
SAVE_TIMEOUT_S = 1800.0
#: Room asked on the datastore beyond the guest's RAM (device state, the record).
SAVE_MARGIN_BYTES = 64 * MiB
INACTIVE_XML = libvirt.VIR_DOMAIN_XML_INACTIVE | libvirt.VIR_DOMAIN_XML_SECURE | libvirt.VIR_DOMAIN_XML_MIGRATABLE


def home_datastore(spec: VmSpec) -> str:
    """The datastore of the VM's first datastore volume ("" when it has none)."""
    for disk in spec.disks:
        if disk.volume and not disk.volume.startswith("/") and "/" in disk.volume and disk.device != "cdrom":
            return disk.volume.split("/", 1)[0]
    return ""


class VmHibernation:
    """HibernateVm / UnhibernateVm (StartVm of a hibernated VM comes here too)."""

    def __init__(self, ops: VmOps, binder: Binder, renderer: "DomainRenderer", files: BlockingPool, *, host_uuid: str,
                 admission: HostAdmission | None = None, reservations: "ReservationAdmission | None" = None) -> None:
        self.ops = ops
        self.hv = ops.hv
        self.inventory = ops.inventory
        self.binder = binder
        self.renderer = renderer
        #: File work on datastores (which may hang): never on the event loop.
        self.files = files
        self.host = host_uuid or "this-host"
        self.admission = admission
        self.reservations = reservations
        #: The guest agent part's clock sync (guest_agent.py), set by the wiring.
        self.clock_sync: Callable[[str, VmSpec], Awaitable[bool]] | None = None

    async def area(self, datastore: str, field: str = "datastore") -> str:
        return await self.binder.volumes.state_area(datastore, field=field)

    async def run_file(self, fn: Any, what: str, timeout: float = 60.0) -> Any:
        return await self.files.run(fn, timeout=timeout, what=what)

    # -- hibernate ---------------------------------------------------------------------------------

    async def hibernate(self, ref: str, datastore: str = "", *, request_id: str = "", fingerprint: str = "",
                        lock_timeout: float = 0.0) -> OperationRecord:
        uuid, name = await self.inventory.lookup_uuid(ref)
        spec = await self.inventory.spec(uuid)
        datastore = datastore or home_datastore(spec)
        if not datastore:
            raise InvalidArgument("datastore", f"vm {name!r} has no disk on a datastore; name the datastore that takes its RAM")
        area = await self.area(datastore)
        token = hs.new_token()

        async def work(op: OperationContext) -> Any:
            state = await self.inventory.state(uuid)
            if state not in (st.RUNNING, st.PAUSED):
                raise FailedPrecondition(f"vm {name!r} is {state}; only a running or paused VM can be hibernated", field="vm")
            await self._refuse_external(uuid)
            # the saved guest resumes as it ran; the definition's next-start changes would be lost
            refuse_while_pending(await self.inventory.pending_changes(uuid, name), name, "hibernate")
            need = spec.memory_mib * MiB + SAVE_MARGIN_BYTES
            free = await self.run_file(lambda: hs.free_bytes(area), f"free space of {datastore}")
            if free < need:
                raise ResourceExhausted(f"datastore {datastore!r} has {free // MiB} MiB free; hibernating vm {name!r} needs up "
                                        f"to {need // MiB} MiB (its RAM and device state)", field="datastore")
            paths = hs.paths_for(area, uuid, token)
            config_xml = await self.hv.call(lambda c: c.lookupByUUIDString(uuid).XMLDesc(INACTIVE_XML), timeout=30)
            paused = state == st.PAUSED
            record = hs.SavedState(uuid=uuid, name=name, spec_json=spec.to_json(), config_xml=config_xml, datastore=datastore,
                                   token=token, saved_at=time.time(), source_host=self.host, paused=paused)
            await self.run_file(lambda: (hs.prepare(paths), hs.write_record(paths, record)), f"the state directory on {datastore}")
            await op.note(paused=str(paused).lower())
            await op.progress(10, "saving memory")
            started = time.monotonic()
            try:
                await self._save(op, uuid, paths, paused)
            except BaseException as exc:
                await self.undo_save(uuid, paused, paths)
                if isinstance(exc, libvirt.libvirtError):
                    raise Internal(f"saving vm {name!r} failed ({exc.get_error_message()}); it runs on here") from None
                if isinstance(exc, AgentError):
                    exc.message = f"{exc.message}; vm {name!r} runs on here"
                raise
            save_ms = (time.monotonic() - started) * 1000
            crash_point("vm.hibernate.saved")  # saved, not yet marked: recovery marks it
            size = await self.finish_save(uuid, spec, paths, hs.HibernateMark(datastore, token, time.time()))
            log.info("event=vm.hibernated vm=%s datastore=%s bytes=%d save_ms=%.0f", uuid, datastore, size, save_ms)
            await self.ops.events.publish("vm.hibernated", resource_kind="vm", resource_id=uuid, resource_name=name,
                                          message=f"{name} hibernated to datastore {datastore} ({size // MiB} MiB)",
                                          attributes={"datastore": datastore, "bytes": str(size), "save_ms": f"{save_ms:.0f}"},
                                          operation_id=op.id)
            return await self.ops.result(uuid, op)

        return await self.ops.submit("vm.hibernate", uuid, work, request_id=request_id, fingerprint=fingerprint,
                                     lock_timeout=lock_timeout, metadata={"datastore": datastore, "token": token},
                                     cancellable=True)

    async def _refuse_external(self, uuid: str) -> None:
        tree = await self.hv.call(lambda c: snaps.list_tree(c.lookupByUUIDString(uuid)), timeout=30)
        external = [x.name for x in tree if x.kind == "external"]
        if external:
            raise FailedPrecondition(f"vm has external snapshots ({', '.join(external)}); a host restoring it would not "
                                     "find its overlays: delete them before hibernating", field="vm")

    async def _save(self, op: OperationContext, uuid: str, paths: hs.StatePaths, paused: bool) -> None:
        flags = libvirt.VIR_DOMAIN_SAVE_PAUSED if paused else libvirt.VIR_DOMAIN_SAVE_RUNNING
        save = asyncio.ensure_future(self.hv.call(lambda c: c.lookupByUUIDString(uuid).saveFlags(paths.memory, None, flags),
                                                  timeout=SAVE_TIMEOUT_S, what="saving the VM", outlast=CHANGE_OUTLAST_S))
        try:
            while not save.done():
                await asyncio.wait({save}, timeout=1.0)
                if save.done():
                    break
                try:
                    stats = await self.hv.call(lambda c: c.lookupByUUIDString(uuid).jobStats(0), timeout=10)
                except (libvirt.libvirtError, AgentError):
                    continue
                total = int(stats.get("memory_total", 0) or stats.get("data_total", 0))
                done = int(stats.get("memory_processed", 0) or stats.get("data_processed", 0))
                if total:
                    await op.progress(10 + int(80 * min(done, total) / total), "saving memory", bytes_done=done, bytes_total=total)
        except asyncio.CancelledError:
            # CancelOperation: libvirt's save job is aborted (the guest runs on here) and its
            # end waited for; a save that completed meanwhile stands (the cancel came too late).
            try:
                await self.hv.call(lambda c: c.lookupByUUIDString(uuid).abortJob(), timeout=30)
            except (libvirt.libvirtError, AgentError) as exc:
                log.info("event=vm.hibernate_abort vm=%s error=%r", uuid, getattr(exc, "message", None) or str(exc))
            await asyncio.wait({save}, timeout=SAVE_TIMEOUT_S)
            if not save.done() or save.cancelled() or save.exception() is not None:
                raise
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
            log.warning("event=vm.hibernate_cancel_too_late vm=%s", uuid)
            cancelling.refuse("the VM is saved; its hibernation is finishing")
        save.result()

    async def undo_save(self, uuid: str, paused: bool, paths: hs.StatePaths) -> None:
        """The save failed: the guest runs on here as it was, and nothing of the save is left."""

        def resume(conn: libvirt.virConnect) -> None:
            dom = conn.lookupByUUIDString(uuid)
            if not paused and dom.isActive() and dom.state()[0] == libvirt.VIR_DOMAIN_PAUSED:
                dom.resume()

        try:
            await self.hv.call(resume, timeout=30)
        except Exception as exc:  # the save's error is what the caller gets
            log.warning("event=vm.hibernate_resume_failed vm=%s error=%r", uuid, getattr(exc, "message", None) or str(exc))
        try:
            await self.run_file(lambda: hs.discard(paths), "removing the failed save")
        except Exception as exc:
            log.warning("event=vm.hibernate_cleanup_failed vm=%s path=%s error=%r", uuid, paths.root, str(exc))

    async def finish_save(self, uuid: str, spec: VmSpec, paths: hs.StatePaths, mark: hs.HibernateMark) -> int:
        """After a save: the variable store kept with the image, the mark, the placement freed."""
        nvram = nvram_path(self.renderer.ctx, uuid)
        await self.run_file(lambda: os.path.exists(nvram) and hs.copy_nvram(nvram, paths.nvram), "copying the UEFI variables")
        size = await self.run_file(lambda: os.path.getsize(paths.memory), "the save image's size")
        await self.hv.call(lambda c: hs.write_mark(c.lookupByUUIDString(uuid), mark), timeout=30)
        self.inventory.forget(uuid)
        await self.binder.release_placement(uuid)
        return int(size)

    # -- resume ------------------------------------------------------------------------------------

    async def unhibernate(self, ref: str, datastore: str = "", *, request_id: str = "", fingerprint: str = "",
                          lock_timeout: float = 0.0) -> OperationRecord:
        """Resume a VM hibernated here, or (named by UUID, with its datastore) one hibernated on
        another host that sees the datastore."""
        self.inventory.check_ref(ref)
        try:
            uuid, name = await self.inventory.lookup_uuid(ref, allow_hibernated=True)
        except NotFound:
            uuid = name = ""
        if uuid:
            mark = (await self.inventory.definition(uuid)).hibernated
            if mark is None:
                raise FailedPrecondition(f"vm {name!r} is not hibernated (StartVm starts a stopped VM)", field="vm")
            if datastore and datastore != mark.datastore:
                raise InvalidArgument("datastore", f"vm {name!r} is hibernated on datastore {mark.datastore!r}, not {datastore!r}")
            datastore, local = mark.datastore, True
            paths = hs.paths_for(await self.area(datastore), uuid, mark.token)
            try:
                record = await self.run_file(lambda: hs.read_record(paths), f"the hibernation record on {datastore}")
            except NotFound:
                raise FailedPrecondition(f"the saved state of vm {name!r} is gone from datastore {datastore!r} (resumed on "
                                         "another host?); the hand-off check removes this copy", field="vm") from None
            spec = await self.inventory.spec(uuid)
        else:
            if not UUID_RE.match(ref):
                raise NotFound(f"vm {ref!r} not found on this host (a VM hibernated on another host is named by its UUID, "
                               "with its datastore)", field="vm")
            if not datastore:
                raise InvalidArgument("datastore", "is required to resume a VM that is not defined on this host")
            uuid, local = ref.lower(), False
            area = await self.area(datastore)
            found = await self.run_file(lambda: hs.resumable(area, uuid), f"hibernation states on {datastore}")
            if not found:
                raise NotFound(f"datastore {datastore!r} holds no resumable hibernated state of vm {uuid} as this host sees it",
                               field="vm")
            paths, record = found[0]
            name = record.name
            spec = VmSpec.from_json(record.spec_json)
            validate(spec, self.renderer.validation(self.binder.placer is not None))
        if self.admission is not None:
            self.admission.check_admission(f"resuming vm {name!r}", field="vm")

        async def work(op: OperationContext) -> Any:
            return await self._resume(op, uuid, name, spec, paths, record, local)

        return await self.ops.submit("vm.unhibernate", uuid, work, request_id=request_id, fingerprint=fingerprint,
                                     lock_timeout=lock_timeout, wait=30.0,
                                     metadata={"datastore": datastore, "token": record.token, "local": str(local).lower()})

    async def _resume(self, op: OperationContext, uuid: str, name: str, spec: VmSpec, paths: hs.StatePaths,
                      record: hs.SavedState, local: bool) -> Any:
        claim = await self.run_file(lambda: hs.take_claim(paths, self.host, op.id), "claiming the saved state")
        if claim.host != self.host:
            raise FailedPrecondition(f"the saved state of vm {name!r} was taken by host {claim.host} at "
                                     f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(claim.at))}", field="vm")
        defined = False
        try:
            await op.progress(10, "binding")
            bindings = await self.binder.bindings(spec)
            fresh = self.renderer.build(spec, bindings)
            saved_xml = await self.hv.call(lambda c: c.saveImageGetXMLDesc(paths.memory, libvirt.VIR_DOMAIN_SAVE_IMAGE_XML_SECURE),
                                           timeout=60, what="reading the save image")
            live_xml = destination_xml(saved_xml, fresh)
            config_xml = destination_xml(record.config_xml, fresh)
            self.renderer.prepare_dirs(spec, self.hv.qemu_user())
            nvram = nvram_path(self.renderer.ctx, uuid)
            await self.run_file(lambda: os.path.exists(paths.nvram) and hs.copy_nvram(paths.nvram, nvram), "restoring UEFI variables")

            def define(conn: libvirt.virConnect) -> None:
                if not local:
                    problem = name_conflict(conn, spec)
                    if problem:
                        raise AlreadyExists(problem.replace("on the destination", "on this host"), field="vm")
                conn.defineXML(config_xml)  # here: the mark goes with the old definition

            await self.hv.call(define, timeout=30)
            defined = True
            await op.progress(30, "restoring memory")
            flags = libvirt.VIR_DOMAIN_SAVE_PAUSED if record.paused else libvirt.VIR_DOMAIN_SAVE_RUNNING

            def restore(conn: libvirt.virConnect) -> None:
                try:
                    conn.restoreFlags(paths.memory, live_xml, flags)
                except libvirt.libvirtError as exc:
                    raise FailedPrecondition(f"libvirt could not restore vm {name!r}: {exc.get_error_message()}", field="vm") from None

            if self.reservations is None:
                await self.hv.call(restore, timeout=SAVE_TIMEOUT_S, what="restoring the VM", outlast=CHANGE_OUTLAST_S)
            else:
                async with self.reservations.admitted(uuid, spec, f"resuming vm {name!r}"):
                    await self.hv.call(restore, timeout=SAVE_TIMEOUT_S, what="restoring the VM", outlast=CHANGE_OUTLAST_S)
        except BaseException:
            await self.undo_resume(uuid, spec, paths, record, local, defined)
            raise
        crash_point("vm.unhibernate.restored")  # running, its image not yet removed: recovery finishes
        self.inventory.forget(uuid)
        synced = await self.sync_clock(uuid, spec)
        await self.run_file(lambda: hs.discard(paths) if record.source_host == self.host else hs.discard_image(paths),
                         "removing the used save image")
        elsewhere = record.source_host != self.host
        log.info("event=vm.unhibernated vm=%s datastore=%s source_host=%s clock_synced=%s", uuid, record.datastore,
                 record.source_host, synced)
        await self.ops.events.publish("vm.unhibernated", resource_kind="vm", resource_id=uuid, resource_name=name,
                                      message=f"{name} resumed from hibernation" + (f" (saved on host {record.source_host})"
                                                                                    if elsewhere else ""),
                                      attributes={"datastore": record.datastore, "source_host": record.source_host,
                                                  "clock_synced": str(synced).lower()}, operation_id=op.id)
        return await self.ops.result(uuid, op)

    async def undo_resume(self, uuid: str, spec: VmSpec, paths: hs.StatePaths, record: hs.SavedState, local: bool,
                           defined: bool) -> None:
        """A resume that failed: the state resumable again, the VM as it was (hibernated here,
        or not defined on a host that was only trying)."""
        try:
            if local:
                mark = hs.HibernateMark(record.datastore, record.token, record.saved_at)
                await self.hv.call(lambda c: hs.write_mark(c.lookupByUUIDString(uuid), mark), timeout=30)
            elif defined:
                await self.hv.call(lambda c: _undefine_inactive(c, uuid), timeout=30)
            self.inventory.forget(uuid)
            await self.binder.release_placement(uuid)
            if not local:
                await self.binder.release_luns(spec, range(len(spec.disks)))
                self.renderer.run_dirs.remove(uuid)
            await self.run_file(lambda: hs.drop_claim(paths, self.host), "dropping the claim")
        except Exception as exc:  # the resume's own error is what the caller gets
            log.warning("event=vm.unhibernate_undo_failed vm=%s error=%r", uuid, getattr(exc, "message", None) or str(exc))

    async def sync_clock(self, uuid: str, spec: VmSpec) -> bool:
        """Set the guest's clock to the host's (it stood still while saved): the guest agent
        part's sync (the wiring sets ``clock_sync``); never fails the resume."""
        if self.clock_sync is None:
            return False
        return await self.clock_sync(uuid, spec)

    async def discard_state(self, uuid: str) -> None:
        """DeleteVm of a hibernated VM: its saved state goes too (claimed first, so that no
        other host resumes it meanwhile; a state another host already took is left to it)."""
        mark = (await self.inventory.definition(uuid)).hibernated
        if mark is None:
            return
        paths = hs.paths_for(await self.area(mark.datastore, "vm"), uuid, mark.token)
        holder = await self.run_file(lambda: hs.take_claim(paths, self.host, "delete") if os.path.isdir(paths.root) else None,
                                  "claiming the saved state")
        if holder is None or holder.host == self.host:
            await self.run_file(lambda: hs.discard(paths), "removing the saved state")


def _undefine_inactive(conn: libvirt.virConnect, uuid: str) -> None:
    try:
        dom = conn.lookupByUUIDString(uuid)
    except libvirt.libvirtError:
        return
    if not dom.isActive():
        dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_NVRAM)
