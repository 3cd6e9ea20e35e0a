"""What follows a hibernation after the fact: the saving host letting go of a VM another host
resumed, and the decisions for hibernate and resume operations a crash cut short.

Why a check and not a call from the resuming host: the resuming host knows only the datastore,
not how to reach the host that saved the VM (which may be down); the claim file it leaves in the
state directory is the message. The saving host's per-VM reconcile (the ``hibernation`` check,
every ``[compute] hibernation_check_interval_s``) reads it for each of its hibernated VMs and,
once another host holds the claim, undefines its own copy (the disks stay: they are the
resumed VM's now) and removes the claim, the last file of that hibernation. The copy goes only
once the other host's resume is complete (it removed the image): a claim alone may be dropped
again by a resume that fails, and the VM must never end up defined nowhere.

Recovery (DESIGN.md "Restart adopts, never redoes") decides from libvirt and the datastore:

* ``vm.hibernate``: libvirt's save job outlives the agent, so it is waited for first. Then a
  shut-off domain with a readable save image is hibernated (the mark written, the placement
  released: what the operation had left to do); a running one was not saved (its files go).
* ``vm.unhibernate``: a running domain was resumed (the used image goes); otherwise the
  state is made resumable again (the mark back on the saving host, the definition a resuming
  host made removed, the claim dropped).
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

import libvirt

from cna_agent.compute import hibernate_store as hs
from cna_agent.compute import state as st
from cna_agent.compute.hibernate import VmHibernation
from cna_agent.compute.spec import VmSpec
from cna_agent.contracts import Finding, VmStatus
from cna_agent.errors import CODES
from cna_agent.operations import OperationContext, RecoveryHandler
from cna_agent.state.journal import OperationError, OperationRecord

log = logging.getLogger(__name__)

#: How long recovery waits for a save job that outlived the agent.
SAVE_JOB_WAIT_S = 600.0


class HibernationHandoff:
    """The ``hibernation`` VmCheck, and the recovery handlers of hibernate and resume."""

    name = "hibernation"

    def __init__(self, hibernation: VmHibernation, *, interval_s: float = 30.0) -> None:
        self.h = hibernation
        self.ops = hibernation.ops
        self.hv = hibernation.hv
        self.inventory = hibernation.inventory
        self.interval_s = interval_s

    # -- the check ---------------------------------------------------------------------------------

    async def check_vm(self, vm: VmStatus) -> list[Finding]:
        if vm.state != st.HIBERNATED:
            return []
        mark = (await self.inventory.definition(vm.uuid)).hibernated
        if mark is None:
            return []
        paths = hs.paths_for(await self.h.area(mark.datastore, "vm"), vm.uuid, mark.token)
        holder, has_image = await self.h.run_file(lambda: (hs.claim_holder(paths), os.path.isfile(paths.memory)),
                                               "reading the hibernation claim")
        if holder is None or holder.host == self.h.host:
            if not has_image and holder is None:
                return [Finding(self.name, vm.uuid, f"the saved state on datastore {mark.datastore!r} is missing")]
            return []
        if has_image:
            # Claimed but not resumed yet (or the resuming agent died mid-way: its recovery
            # either completes the resume, removing the image, or drops the claim). Only a
            # finished resume lets this copy go, so the VM is never defined nowhere.
            return [Finding(self.name, vm.uuid, f"being resumed on host {holder.host}")]
        await self.ops.submit("vm.hibernate_handoff", vm.uuid, lambda op: self._hand_off(op, vm.uuid, vm.name, paths, holder.host),
                              wait=30.0)
        return [Finding(self.name, vm.uuid, f"resumed on host {holder.host}", repaired=True, action="undefined here")]

    async def _hand_off(self, op: OperationContext, uuid: str, name: str, paths: hs.StatePaths, other: str) -> None:
        d = await self.inventory.definition(uuid)
        if d.hibernated is None or d.hibernated.token != os.path.basename(paths.root):
            return None  # resumed or deleted here meanwhile
        spec = d.spec

        def undefine(conn: libvirt.virConnect) -> None:
            dom = conn.lookupByUUIDString(uuid)
            if dom.isActive():
                raise RuntimeError("the VM runs here")  # never: a hibernated VM has no QEMU
            dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_NVRAM | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
                              | libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA | libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE)

        await self.hv.call(undefine, timeout=30)
        self.inventory.forget(uuid)
        self.h.renderer.run_dirs.remove(uuid)
        await self.h.binder.release_placement(uuid)
        await self.h.run_file(lambda: hs.discard(paths), "removing the hibernation claim")
        luns = [i for i, disk in enumerate(spec.disks) if disk.lun is not None] if spec else []
        if spec is not None and luns:
            await self.h.binder.release_lun_disks(spec, luns)
        log.info("event=vm.hibernate_handed_off vm=%s to_host=%s", uuid, other)
        await self.ops.events.publish("vm.hibernate_handed_off", resource_kind="vm", resource_id=uuid, resource_name=name,
                                      message=f"{name} was resumed on host {other}; its definition here is removed (disks kept)",
                                      attributes={"host": other}, operation_id=op.id)
        return None

    # -- recovery ----------------------------------------------------------------------------------

    def handlers(self) -> dict[str, RecoveryHandler]:
        return {"vm.hibernate": self.recover_hibernate, "vm.unhibernate": self.recover_unhibernate,
                "vm.hibernate_handoff": self.recover_handoff}

    def _paths(self, area: str, record: OperationRecord) -> hs.StatePaths:
        return hs.paths_for(area, record.target, record.metadata.get("token", ""))

    async def recover_hibernate(self, record: OperationRecord) -> Any:
        uuid = record.target
        datastore, token = record.metadata.get("datastore", ""), record.metadata.get("token", "")
        if not hs.check_token(token):
            return OperationError(CODES["ABORTED"], "the agent stopped while hibernating the VM; nothing is known of the save")
        paths = self._paths(await self.h.area(datastore, "vm"), record)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + SAVE_JOB_WAIT_S
        while await self.hv.call(lambda c: _job_running(c, uuid), timeout=15) and loop.time() < deadline:
            await asyncio.sleep(1.0)  # libvirt's save job outlived the agent: its outcome decides
        active = await self.hv.call(lambda c: bool(c.lookupByUUIDString(uuid).isActive()), timeout=15)
        saved = not active and await self._image_readable(paths)
        if saved:
            spec = await self.inventory.spec(uuid)
            record_saved = await self.h.run_file(lambda: hs.read_record(paths), "the hibernation record")
            await self.h.finish_save(uuid, spec, paths, hs.HibernateMark(datastore, token, record_saved.saved_at))
            log.info("event=vm.hibernate_recovered vm=%s outcome=saved", uuid)
            return await self.inventory.get(uuid)
        if active:
            await self.h.undo_save(uuid, record.metadata.get("paused") == "true", paths)
            outcome = "the VM runs on here (its save did not complete)"
        else:
            await self.h.run_file(lambda: hs.discard(paths), "removing the failed save")
            outcome = "the VM is stopped and no complete save image was found"
        log.warning("event=vm.hibernate_recovered vm=%s outcome=%r", uuid, outcome)
        return OperationError(CODES["ABORTED"], f"the agent stopped while hibernating the VM; {outcome}")

    async def _image_readable(self, paths: hs.StatePaths) -> bool:
        try:
            await self.hv.call(lambda c: c.saveImageGetXMLDesc(paths.memory, 0), timeout=60)
            return True
        except Exception:
            return False

    async def recover_unhibernate(self, record: OperationRecord) -> Any:
        uuid = record.target
        local = record.metadata.get("local") == "true"
        paths = self._paths(await self.h.area(record.metadata.get("datastore", ""), "vm"), record)
        running = await self.hv.call(lambda c: _active(c, uuid), timeout=15)
        try:
            saved = await self.h.run_file(lambda: hs.read_record(paths), "the hibernation record")
        except Exception:
            saved = None
        if running:
            if saved is not None:
                await self.h.run_file(lambda: hs.discard(paths) if saved.source_host == self.h.host else hs.discard_image(paths),
                                   "removing the used save image")
            self.inventory.forget(uuid)
            log.info("event=vm.unhibernate_recovered vm=%s outcome=resumed", uuid)
            return await self.inventory.get(uuid)
        if saved is not None:
            spec = VmSpec.from_json(saved.spec_json)
            await self.h.undo_resume(uuid, spec, paths, saved, local, defined=True)
        log.warning("event=vm.unhibernate_recovered vm=%s outcome=not_resumed", uuid)
        return OperationError(CODES["ABORTED"], "the agent stopped before the VM was resumed; its saved state is resumable "
                                                "again (nothing was redone)")

    async def recover_handoff(self, record: OperationRecord) -> Any:
        return OperationError(CODES["ABORTED"], "the agent stopped while removing a VM resumed on another host; the "
                                                "hibernation check does it again")


def _job_running(conn: libvirt.virConnect, uuid: str) -> bool:
    try:
        dom = conn.lookupByUUIDString(uuid)
        return dom.isActive() and dom.jobInfo()[0] not in (libvirt.VIR_DOMAIN_JOB_NONE,)
    except libvirt.libvirtError:
        return False


def _active(conn: libvirt.virConnect, uuid: str) -> bool:
    try:
        return bool(conn.lookupByUUIDString(uuid).isActive())
    except libvirt.libvirtError:
        return False
