"""Live storage migration: a running VM's disk moves to another volume (another datastore, or
qcow2 <-> raw by the new name) while the guest keeps writing.

VDSM's live storage migration and nova's swap-volume, on libvirt 9.0's block copy: the agent
creates the destination volume through storage (room checked first), starts virDomainBlockCopy
into it (REUSE_EXT: our file; TRANSIENT_JOB: the job does not outlive QEMU, which libvirt asks
of a persistent domain), follows blockJobInfo for progress, throttles with the job's bandwidth,
and once the mirror is in sync (libvirt's ``<mirror ready='yes'>``) pivots with
blockJobAbort(PIVOT): from then on QEMU writes only to the destination. libvirt changes the
live definition only, so the persistent definition and the agent's spec are rewritten to the
destination in the same operation; the source volume is then deleted unless ``keep_source``.

Up to the pivot the move can be cancelled or can fail without effect: the job is aborted
without pivot (QEMU goes on with the source) and the destination is deleted. A crash is
decided from the live definition (recover): pivoted (the disk's source is the destination)
-> the bookkeeping is finished; otherwise the job is aborted and the destination deleted.

Only file volumes on datastores move here (a SAN LUN as destination is refused: not done yet).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import libvirt

from cna_agent import cancel as cancelling
from cna_agent.compute import domxml as dx
from cna_agent.compute import state as st
from cna_agent.compute.binder import Binder
from cna_agent.compute.spec import VmSpec
from cna_agent.compute.vmops import VmOps
from cna_agent.contracts import format_from_name
from cna_agent.errors import CODES, AgentError, FailedPrecondition, InvalidArgument, NotFound
from cna_agent.failpoints import crash_point
from cna_agent.operations import OperationContext, RecoveryHandler
from cna_agent.state.journal import OperationError, OperationRecord

log = logging.getLogger(__name__)

MiB = 1 << 20
#: Longest a copy may take before it is given up (a 2 TiB disk at a throttled 1 GiB/s is ~35 min).
COPY_TIMEOUT_S = 6 * 3600.0
POLL_S = 0.5
MAX_BANDWIDTH_MIB_S = 100_000


def _disk(dom: libvirt.virDomain, target: str, flags: int = 0) -> dx.Disk | None:
    d = dx.Domain.from_xml(dom.XMLDesc(flags))
    return next((x for x in (d.devices.disks if d.devices else []) if x.target_dev == target), None)


def _mirror_ready(dom: libvirt.virDomain, target: str) -> bool:
    """libvirt's own word that the copy is in sync (the live XML's ``<mirror ready='yes'>``)."""
    from xml.etree import ElementTree as ET

    for disk in ET.fromstring(dom.XMLDesc(0)).findall("devices/disk"):
        t = disk.find("target")
        if t is not None and t.get("dev") == target:
            mirror = disk.find("mirror")
            return mirror is not None and mirror.get("ready") == "yes"
    return False


class DiskMoves:
    """MoveDisk for this host's running VMs."""

    def __init__(self, ops: VmOps, binder: Binder) -> None:
        self.ops = ops
        self.hv = ops.hv
        self.inventory = ops.inventory
        self.binder = binder

    async def move(self, ref: str, target: str, destination: str, *, bandwidth_mib_s: int = 0, keep_source: bool = False,
                   request_id: str = "", fingerprint: str = "", lock_timeout: float = 0.0) -> OperationRecord:
        if not 0 <= bandwidth_mib_s <= MAX_BANDWIDTH_MIB_S:
            raise InvalidArgument("bandwidth_mib_s", f"{bandwidth_mib_s} is not in 0..{MAX_BANDWIDTH_MIB_S} (0 = unlimited)")
        if not destination or destination.startswith("/") or "/" not in destination:
            raise InvalidArgument("destination", f"{destination!r} is not a volume id 'datastore/relative/path'")
        uuid, name = await self.inventory.lookup_uuid(ref)
        spec = await self.inventory.spec(uuid)
        index = next((i for i, d in enumerate(spec.disks) if d.target == target), None)
        if index is None:
            known = ", ".join(d.target for d in spec.disks if d.target) or "none"
            raise NotFound(f"the VM has no disk {target!r} (disks: {known})", field="target")
        disk = spec.disks[index]
        if not disk.volume or disk.device == "cdrom" or disk.shareable:
            raise FailedPrecondition(f"target: {target} is not a writable file disk (a LUN, a CD-ROM or a shared disk "
                                     "does not move)", field="target")
        if disk.volume == destination:
            raise InvalidArgument("destination", f"{target} is already on {destination}")
        if self.binder.disks is None:
            raise FailedPrecondition("moving a disk needs the storage subsystem, which is not running on this agent", field="vm")

        async def work(op: OperationContext) -> Any:
            if await self.inventory.state(uuid) not in (st.RUNNING, st.PAUSED):
                raise FailedPrecondition(f"vm {name!r} is not running; a stopped VM's volume is copied with CloneVolume "
                                         "and the disk changed with UpdateVm", field="vm")
            capacity, allocation = await self.hv.call(lambda c: c.lookupByUUIDString(uuid).blockInfo(target)[:2], timeout=30)
            fmt = format_from_name(destination)
            room = capacity if fmt == "raw" else allocation
            binding = await self.binder.volumes.new_volume(destination, capacity, room=room, field="destination")
            scope = cancelling.current()
            if scope is not None:
                # storage refused cancels while it put the new volume in place; the copy that
                # follows is cancellable again (a cancel abandons it and deletes the volume)
                scope.reopen()
            await op.note(source=disk.volume, destination=destination, destination_path=binding.path,
                          keep_source=str(keep_source).lower())
            try:
                await self._copy(op, uuid, target, binding.path, fmt, bandwidth_mib_s)
            except BaseException:
                await cancelling.detached(self._abandon(uuid, target, destination))
                raise
            await self.finish(uuid, spec, index, destination, keep_source)
            await self.ops.events.publish("vm.disk_moved", resource_kind="vm", resource_id=uuid, resource_name=name,
                                          message=f"{name}: {target} moved from {disk.volume} to {destination}",
                                          attributes={"target": target, "source": disk.volume, "destination": destination,
                                                      "source_kept": str(keep_source).lower()}, operation_id=op.id)
            return await self.ops.result(uuid, op)

        return await self.ops.submit("vm.disk.move", uuid, work, request_id=request_id, fingerprint=fingerprint,
                                     lock_timeout=lock_timeout, wait=5.0, cancellable=True,
                                     metadata={"disk_target": target})

    async def _copy(self, op: OperationContext, uuid: str, target: str, path: str, fmt: str, bandwidth_mib_s: int) -> None:
        dest = dx.Disk(type="file", device="disk", driver_name="qemu", driver_type=fmt, source_file=path)
        params = {libvirt.VIR_DOMAIN_BLOCK_COPY_BANDWIDTH: bandwidth_mib_s * MiB} if bandwidth_mib_s else {}

        def start(conn: libvirt.virConnect) -> None:
            try:
                conn.lookupByUUIDString(uuid).blockCopy(target, dest.to_xml(pretty=False), params,
                                                        libvirt.VIR_DOMAIN_BLOCK_COPY_REUSE_EXT
                                                        | libvirt.VIR_DOMAIN_BLOCK_COPY_TRANSIENT_JOB)
            except libvirt.libvirtError as exc:
                raise FailedPrecondition(f"libvirt did not start the copy of {target}: {exc.get_error_message()}",
                                         field="target") from None

        await self.hv.call(start, timeout=60)
        started = time.monotonic()
        await op.progress(5, f"copying {target}")
        while True:
            info, ready = await self.hv.call(lambda c: (lambda d: (d.blockJobInfo(target, 0), _mirror_ready(d, target)))(
                c.lookupByUUIDString(uuid)), timeout=30)
            if not info:
                raise FailedPrecondition(f"the copy of {target} ended before it was in sync (QEMU aborted it: a write "
                                         "error on the destination?); the VM stays on the source", field="destination")
            cur, end = int(info.get("cur", 0)), int(info.get("end", 0))
            await op.progress(5 + int(90 * cur / end) if end else 5, f"copying {target}", bytes_done=cur, bytes_total=end)
            if ready:
                break
            if time.monotonic() - started > COPY_TIMEOUT_S:
                raise FailedPrecondition(f"the copy of {target} did not reach sync in {COPY_TIMEOUT_S:.0f} s; the VM stays "
                                         "on the source", field="destination")
            await asyncio.sleep(POLL_S)
        await op.progress(96, f"switching {target} to the destination")

        def pivot(conn: libvirt.virConnect) -> None:
            dom = conn.lookupByUUIDString(uuid)
            dom.blockJobAbort(target, libvirt.VIR_DOMAIN_BLOCK_JOB_ABORT_PIVOT)
            deadline = time.monotonic() + 30
            while dom.blockJobInfo(target, 0) and time.monotonic() < deadline:
                time.sleep(0.05)

        await self.hv.call(pivot, timeout=60)
        live = await self.hv.call(lambda c: _disk(c.lookupByUUIDString(uuid), target), timeout=30)
        if live is None or live.source_file != path:
            raise FailedPrecondition(f"after the pivot {target} still reads {live.source_file if live else '?'}", field="target")
        crash_point("vm.disk.move.pivoted")  # QEMU uses the destination; the definitions do not say so yet

    async def _abandon(self, uuid: str, target: str, destination: str) -> None:
        """The copy is given up (cancel, failure): QEMU back on the source only, the destination gone."""

        def abort(conn: libvirt.virConnect) -> None:
            dom = conn.lookupByUUIDString(uuid)
            if dom.blockJobInfo(target, 0):
                dom.blockJobAbort(target, 0)
                deadline = time.monotonic() + 30
                while dom.blockJobInfo(target, 0) and time.monotonic() < deadline:
                    time.sleep(0.05)

        try:
            await self.hv.call(abort, timeout=60)
            await self.binder.volumes.delete_volume(destination, field="destination")
        except Exception as exc:  # the move's own error is what the caller gets
            log.warning("event=vm.disk_move_cleanup_failed vm=%s target=%s destination=%s error=%r", uuid, target, destination,
                        getattr(exc, "message", None) or str(exc))

    async def finish(self, uuid: str, spec: VmSpec, index: int, destination: str, keep_source: bool) -> None:
        """After the pivot: the persistent definition and the spec name the destination; the
        source goes unless it is kept."""
        new = spec.copy()
        source = new.disks[index].volume
        target = new.disks[index].target
        new.disks[index].volume = destination
        new.disks[index].format = format_from_name(destination)

        def persist(conn: libvirt.virConnect) -> None:
            dom = conn.lookupByUUIDString(uuid)
            live = _disk(dom, target)
            doc = dx.Domain.from_xml(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE | libvirt.VIR_DOMAIN_XML_SECURE))
            for d in doc.devices.disks if doc.devices else []:
                if d.target_dev == target and live is not None:
                    d.type, d.source_file, d.driver_type = "file", live.source_file, live.driver_type
            conn.defineXML(doc.to_xml())

        await self.hv.call(persist, timeout=30)
        await self.ops.write_spec(uuid, new, True)
        if not keep_source and source:
            try:
                await self.binder.volumes.delete_volume(source, field="source")
            except AgentError as exc:  # the move is done; a source that cannot go is said, not undone
                log.warning("event=vm.disk_move_source_kept vm=%s source=%s error=%r", uuid, source, exc.message)
        log.info("event=vm.disk_moved vm=%s target=%s source=%s destination=%s kept=%s", uuid, target, source, destination,
                 keep_source)

    # -- recovery ----------------------------------------------------------------------------------

    def handlers(self) -> dict[str, RecoveryHandler]:
        return {"vm.disk.move": self.recover}

    async def recover(self, record: OperationRecord) -> Any:
        uuid, meta = record.target, record.metadata
        target, destination, path = meta.get("disk_target", ""), meta.get("destination", ""), meta.get("destination_path", "")
        if not destination:
            return OperationError(CODES["ABORTED"], "the agent stopped before the move created anything; nothing was redone")
        live = await self.hv.call(lambda c: _disk(c.lookupByUUIDString(uuid), target), timeout=30)
        if live is not None and live.source_file == path:
            spec = await self.inventory.spec(uuid)
            index = next((i for i, d in enumerate(spec.disks) if d.target == target), None)
            if index is not None and spec.disks[index].volume != destination:
                await self.finish(uuid, spec, index, destination, meta.get("keep_source") == "true")
            log.info("event=vm.disk_move_recovered vm=%s outcome=pivoted", uuid)
            return await self.inventory.get(uuid)
        await self._abandon(uuid, target, destination)
        log.warning("event=vm.disk_move_recovered vm=%s outcome=abandoned", uuid)
        return OperationError(CODES["ABORTED"], f"the agent stopped before {target} switched to {destination}; the copy was "
                                                "abandoned and the VM stays on its source")
