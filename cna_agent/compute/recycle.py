"""The recycle bin: DeleteVm with a hold time keeps a VM restorable until the time is up.

FusionCompute's VRM deletes VMs into a recycle bin (``holdTime``) from which an admin brings
back one deleted by mistake; here the node keeps what that needs. A VM in the bin:

* keeps its libvirt definition and its disks, unchanged: restoring it is clearing one mark,
  nothing is rebuilt or copied, and nothing another VM could take (its MACs, its volumes, its
  name) is given up meanwhile. Its disks still count as used (a DeleteVolume is refused).
* carries the mark in its own definition, as libvirt metadata (``<bin:recycle>`` in
  RECYCLE_NS: when it was deleted, until when it is held, whether its disks go with it), so
  an agent restart, or an agent whose state database was lost, knows it is in the bin.
* is hidden: ListVms leaves it out unless asked for the bin (``recycled``); every operation
  but RestoreVm and DeleteVm refuses it, naming the bin; CreateVm of its name is refused by
  libvirt's name check like any other existing VM.
* holds no CPU, memory or placement claim (it is powered off first, and its placement is
  released); it needs them again only when restored and started.
* is deleted when its hold is up, as the DeleteVm that put it there asked (``delete_disks``
  included), by a sweep every ``[compute] recycle_sweep_interval_s`` and at start-up; a delete
  refused then (a linked clone appeared on a disk) stays in the bin and is retried, with an
  event. DeleteVm without a hold on a VM in the bin deletes it at once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Awaitable, Callable
from xml.etree import ElementTree as ET

import libvirt

from cna_agent.compute.marks import read_config_metadata, write_metadata
from cna_agent.errors import CODES, AgentError, FailedPrecondition, InvalidArgument
from cna_agent.operations import OperationContext
from cna_agent.state.journal import OperationError, OperationRecord

if TYPE_CHECKING:
    from cna_agent.compute.vmops import VmOps

log = logging.getLogger(__name__)

RECYCLE_NS = "https://cna-agent.org/xmlns/recycle/1.0"
RECYCLE_KEY = "bin"
#: The longest hold a DeleteVm may ask (FusionCompute's recycle bin keeps VMs up to 90 days).
MAX_HOLD_S = 90 * 86400
#: After an expiry's delete was refused, how long until it is tried again.
EXPIRY_RETRY_S = 3600.0


@dataclass(frozen=True)
class RecycleMark:
    deleted_at: float
    expires_at: float
    delete_disks: bool

    def to_xml(self) -> str:
        """The body for virDomainSetMetadata (libvirt adds the namespace from the key and URI)."""
        el = ET.Element("recycle")
        el.set("deleted", f"{self.deleted_at:.3f}")
        el.set("expires", f"{self.expires_at:.3f}")
        el.set("delete-disks", "yes" if self.delete_disks else "no")
        return ET.tostring(el, encoding="unicode")

    @classmethod
    def from_xml(cls, text: str) -> "RecycleMark | None":
        """The mark virDomainGetMetadata returned, or None when it is not a readable one."""
        try:
            el = ET.fromstring(text)
            return cls(float(el.get("deleted", "0")), float(el.get("expires", "")), el.get("delete-disks") == "yes")
        except (ET.ParseError, ValueError):
            return None


def read_mark(dom: libvirt.virDomain) -> RecycleMark | None:
    """The domain's recycle mark (None: not in the bin). Runs in the libvirt executor."""
    text = read_config_metadata(dom, RECYCLE_NS)
    return RecycleMark.from_xml(text) if text is not None else None


def write_mark(dom: libvirt.virDomain, mark: RecycleMark | None) -> None:
    """Set (or, with None, remove) the mark in the persistent definition."""
    write_metadata(dom, RECYCLE_NS, RECYCLE_KEY, mark.to_xml() if mark else None)


def check_hold(hold_s: int) -> None:
    if not 0 <= hold_s <= MAX_HOLD_S:
        raise InvalidArgument("hold_time_s", f"{hold_s} is not between 0 and {MAX_HOLD_S} (90 days)")


def in_bin_message(name: str, mark: RecycleMark) -> str:
    until = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(mark.expires_at))
    return (f"vm {name!r} is in the recycle bin until {until}; RestoreVm brings it back, DeleteVm without a hold "
            "deletes it now")


class RecycleBin:
    """Recycling, restoring and expiring VMs (the marks themselves are read by the inventory).

    ``purge(uuid, delete_disks)`` is the lifecycle's own delete (the expiry deletes exactly as a
    DeleteVm without hold would); ``release(uuid)`` frees the VM's placement claim."""

    def __init__(self, ops: "VmOps", *, purge: Callable[[str, bool], Awaitable[OperationRecord]],
                 release: Callable[[str], Awaitable[None]], reclaim: Callable[[str, Any], Awaitable[None]] | None = None,
                 sweep_interval_s: float = 60.0, clock: Callable[[], float] = time.time) -> None:
        self.ops = ops
        self.hv = ops.hv
        self.purge = purge
        self.release = release
        #: Takes the placement a restored VM needs again (the lifecycle's reclaim_placement).
        self.reclaim = reclaim
        self.sweep_interval_s = sweep_interval_s
        self.clock = clock
        self._task: asyncio.Task[None] | None = None
        #: uuid -> when an expiry whose delete was refused is tried again.
        self._retry_at: dict[str, float] = {}

    async def recycle(self, op: OperationContext, uuid: str, name: str, hold_s: int, delete_disks: bool) -> None:
        """Inside DeleteVm's operation, the VM stopped: mark it, free its claims, say so."""
        now = self.clock()
        mark = RecycleMark(now, now + hold_s, delete_disks)
        await self.hv.call(lambda c: write_mark(c.lookupByUUIDString(uuid), mark), timeout=30)
        self.ops.inventory.forget(uuid)
        await self.release(uuid)
        await op.note(recycled_until=f"{mark.expires_at:.3f}")
        await self.ops.events.publish("vm.recycled", resource_kind="vm", resource_id=uuid, resource_name=name,
                                      message=f"{name} moved to the recycle bin for {hold_s} s",
                                      attributes={"expires": f"{mark.expires_at:.0f}", "delete_disks": str(delete_disks).lower()},
                                      operation_id=op.id)

    async def restore(self, ref: str, *, request_id: str = "", fingerprint: str = "", lock_timeout: float = 0.0) -> OperationRecord:
        """RestoreVm: the VM comes back as it was deleted, stopped (StartVm starts it), with a
        CPU placement of its own again when it needs one (planned anew: RESOURCE_EXHAUSTED,
        and it stays in the bin, when none fits)."""
        uuid, name = await self.ops.inventory.lookup_uuid(ref, allow_recycled=True)
        if (await self.ops.inventory.definition(uuid)).recycled is None:
            raise FailedPrecondition(f"vm {name!r} is not in the recycle bin", field="vm")

        async def work(op: OperationContext) -> Any:
            if self.reclaim is not None:
                await self.reclaim(uuid, await self.ops.inventory.spec(uuid))
            await self.hv.call(lambda c: write_mark(c.lookupByUUIDString(uuid), None), timeout=30)
            self.ops.inventory.forget(uuid)
            await self.ops.events.publish("vm.restored", resource_kind="vm", resource_id=uuid, resource_name=name,
                                          message=f"{name} restored from the recycle bin", operation_id=op.id)
            return await self.ops.result(uuid, op)

        return await self.ops.submit("vm.restore", uuid, work, request_id=request_id, fingerprint=fingerprint,
                                     lock_timeout=lock_timeout)

    async def recover_restore(self, record: OperationRecord) -> Any:
        """A restore cut short: done exactly when the VM's definition has no mark any more."""
        try:
            mark = await self.hv.call(lambda c: read_mark(c.lookupByUUIDString(record.target)), timeout=15)
        except libvirt.libvirtError:
            return OperationError(CODES["ABORTED"], "the agent stopped while restoring the VM, which is no longer defined "
                                                    "(its hold ran out meanwhile?); nothing was redone")
        if mark is None:
            self.ops.inventory.forget(record.target)
            return await self.ops.inventory.get(record.target)
        await self.release(record.target)  # a placement planned for the restore: the bin holds none
        return OperationError(CODES["ABORTED"], "the agent stopped before the VM was restored; it is still in the recycle "
                                                "bin (nothing was redone; RestoreVm again)")

    # -- expiry ---------------------------------------------------------------------------------

    async def sweep(self) -> list[str]:
        """Delete every VM whose hold is up; the uuids whose delete was started."""
        now = self.clock()
        started = []
        for vm in await self.ops.inventory.list(recycled=True):
            mark = (await self.ops.inventory.definition(vm.uuid)).recycled
            if mark is None or mark.expires_at > now or self._retry_at.get(vm.uuid, 0.0) > now:
                continue
            try:
                record = await self.purge(vm.uuid, mark.delete_disks)
            except AgentError as exc:  # busy (another operation holds it): the next sweep tries again
                log.warning("event=recycle.expiry_deferred vm=%s error=%r", vm.uuid, exc.message)
                continue
            started.append(vm.uuid)
            log.info("event=recycle.expired vm=%s name=%s delete_disks=%s op=%s", vm.uuid, vm.name, mark.delete_disks, record.id)
            if record.done and record.error is not None:
                # Refused (a linked clone now stands on a disk): it stays in the bin, said once
                # an hour rather than one failed operation per sweep.
                self._retry_at[vm.uuid] = now + EXPIRY_RETRY_S
                await self.ops.events.publish("vm.recycle_expiry_failed", severity="warning", resource_kind="vm",
                                              resource_id=vm.uuid, resource_name=vm.name, operation_id=record.id,
                                              message=f"{vm.name}: its hold is up but the delete was refused "
                                                      f"({record.error.message}); it stays in the recycle bin")
        return started

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.ensure_future(self._loop())

    async def _loop(self) -> None:
        while True:
            try:
                await self.sweep()
            except asyncio.CancelledError:
                raise
            except Exception:  # libvirt away: the next sweep tries again
                log.exception("event=recycle.sweep_failed")
            await asyncio.sleep(self.sweep_interval_s)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
