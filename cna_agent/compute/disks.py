"""Disks on existing VMs: hot-plug, unplug, live grow and I/O QoS.

The StorageService's AttachDisk/DetachDisk/ResizeDisk/SetDiskQos RPCs land here (through
compute's VmService), because only compute renders domain XML and owns the VM's lock and
stored spec. Every change is applied to the live domain (when it runs) and to its persistent
definition, and the agent's spec in the domain metadata is updated in the same operation, so
a restart adopts the VM with the disks it really has.
"""

from __future__ import annotations

import asyncio
import logging
import re
import xml.etree.ElementTree as ET
from typing import TYPE_CHECKING, Any, Iterable

import libvirt

from cna_agent import __version__
from cna_agent.compute import domxml as dx
from cna_agent.compute import state as st
from cna_agent.compute.render import assign_disk_targets, disk_xml
from cna_agent.compute.spec import DiskSpec, IoQos, VmSpec, validate
from cna_agent.errors import FailedPrecondition, InvalidArgument, NotFound
from cna_agent.operations import OperationContext
from cna_agent.state.journal import OperationRecord

if TYPE_CHECKING:
    from cna_agent.compute.service import VmService

log = logging.getLogger(__name__)

#: Grow steps: virtio and SCSI report sizes in 512-byte sectors.
SECTOR = 512
#: How long a guest gets to release an unplugged disk before the detach is reported failed.
DETACH_TIMEOUT_S = 30.0
_DISK_FIELD = re.compile(r"^spec\.disks\[\d+\]")


def _affect(running: bool) -> int:
    return libvirt.VIR_DOMAIN_AFFECT_CONFIG | (libvirt.VIR_DOMAIN_AFFECT_LIVE if running else 0)


class DiskOperations:
    """Disk changes on one host's VMs; used by VmService, which owns the lock and the spec."""

    def __init__(self, vms: "VmService") -> None:
        self.vms = vms

    async def _current(self, ref: str) -> tuple[str, VmSpec, bool]:
        uuid, _ = await self.vms.lookup_uuid(ref)
        cached = await self.vms._cached(uuid)
        if cached.spec is None:
            raise FailedPrecondition("the VM has no agent spec (not managed by this agent)", field="vm")
        running = await self.vms._state(uuid) not in (st.STOPPED, st.CRASHED)
        return uuid, cached.spec, running

    def _save_spec(self, dom: libvirt.virDomain, spec: VmSpec, running: bool) -> None:
        body = dx.metadata_for_set(spec.to_json(), agent_version=__version__)
        dom.setMetadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, body, "cna", dx.CNA_NS, _affect(running))

    async def attach(self, ref: str, disk: DiskSpec, *, request_id: str = "", fingerprint: str = "",
                     lock_timeout: float = 0.0) -> OperationRecord:
        uuid, spec, running = await self._current(ref)
        new = spec.copy()
        new.disks.append(disk)
        index = len(new.disks) - 1
        if not disk.target:
            disk.target = assign_disk_targets(new, new.os_family)[index]
        if disk.boot_order and running:
            raise FailedPrecondition("a hot-plugged disk cannot change the boot order of a running VM", field="disk.boot_order")
        try:
            validate(new, self.vms.validation_context())
            binding = (await self.vms._bindings(_only_disk(new, index))).disks[0]
        except InvalidArgument as exc:
            # Errors name the request's field ("disk.volume"), not the merged spec's.
            field = _DISK_FIELD.sub("disk", exc.field)
            raise InvalidArgument(field, exc.message.split(": ", 1)[-1]) from None
        xml = disk_xml(new, index, binding, disk.target)

        async def work(op: OperationContext) -> Any:
            def apply(conn: libvirt.virConnect) -> None:
                dom = conn.lookupByUUIDString(uuid)
                dom.attachDeviceFlags(xml, _affect(running))
                self._save_spec(dom, new, running)

            try:
                await self.vms.hv.call(apply, timeout=60)
            except libvirt.libvirtError as exc:
                raise FailedPrecondition(f"attaching {disk.target} failed: {exc.get_error_message()}") from None
            self.vms._forget(uuid)
            return await self.vms._result(uuid)

        return await self.vms._submit("vm.disk.attach", uuid, work, request_id=request_id, fingerprint=fingerprint,
                                      lock_timeout=lock_timeout, wait=30.0)

    async def detach(self, ref: str, target: str, *, request_id: str = "", fingerprint: str = "",
                     lock_timeout: float = 0.0) -> OperationRecord:
        uuid, spec, running = await self._current(ref)
        index = _find(spec, target)
        new = spec.copy()
        del new.disks[index]

        async def work(op: OperationContext) -> Any:
            def element(conn: libvirt.virConnect, flags: int) -> str | None:
                dom = conn.lookupByUUIDString(uuid)
                root = ET.fromstring(dom.XMLDesc(flags))
                for d in root.findall("devices/disk"):
                    t = d.find("target")
                    if t is not None and t.get("dev") == target:
                        return ET.tostring(d, encoding="unicode")
                return None

            def detach(conn: libvirt.virConnect) -> None:
                dom = conn.lookupByUUIDString(uuid)
                live = element(conn, 0) if running else None
                config = element(conn, libvirt.VIR_DOMAIN_XML_INACTIVE)
                if live is not None:
                    dom.detachDeviceFlags(live, libvirt.VIR_DOMAIN_AFFECT_LIVE)
                if config is not None:
                    dom.detachDeviceFlags(config, libvirt.VIR_DOMAIN_AFFECT_CONFIG)

            try:
                await self.vms.hv.call(detach, timeout=60)
            except libvirt.libvirtError as exc:
                raise FailedPrecondition(f"detaching {target} failed: {exc.get_error_message()}") from None
            if running:
                # The guest must release the device (PCI unplug is asynchronous); until it has,
                # the disk is still in use and reporting success would be a lie.
                await op.progress(50, "waiting for the guest to release the disk")
                deadline = asyncio.get_running_loop().time() + DETACH_TIMEOUT_S
                while await self.vms.hv.call(lambda c: element(c, 0), timeout=30) is not None:
                    if asyncio.get_running_loop().time() > deadline:
                        raise FailedPrecondition(f"the guest did not release {target} within {DETACH_TIMEOUT_S:.0f}s; "
                                                 "it stays attached to the running VM (retry, or stop the VM)")
                    await asyncio.sleep(0.3)
            await self.vms.hv.call(lambda c: self._save_spec(c.lookupByUUIDString(uuid), new, running), timeout=30)
            self.vms._forget(uuid)
            if spec.disks[index].lun is not None:
                # The disk is gone from the VM (and its spec), so storage may now see no user left.
                await op.progress(90, "releasing the LUN on the host")
                await release_lun_disks(self.vms, uuid, [(index, spec.disks[index])])
            return await self.vms._result(uuid)

        return await self.vms._submit("vm.disk.detach", uuid, work, request_id=request_id, fingerprint=fingerprint,
                                      lock_timeout=lock_timeout, wait=DETACH_TIMEOUT_S + 5)

    async def resize(self, ref: str, target: str, new_size_bytes: int, *, request_id: str = "", fingerprint: str = "",
                     lock_timeout: float = 0.0) -> OperationRecord:
        uuid, spec, running = await self._current(ref)
        _find(spec, target)
        if new_size_bytes <= 0 or new_size_bytes % SECTOR:
            raise InvalidArgument("new_size_bytes", f"{new_size_bytes} must be a positive multiple of {SECTOR}")
        if not running:
            raise FailedPrecondition("the VM is stopped: grow the volume itself with StorageService.ResizeVolume", field="vm")

        async def work(op: OperationContext) -> Any:
            def grow(conn: libvirt.virConnect) -> tuple[int, int]:
                dom = conn.lookupByUUIDString(uuid)
                capacity = dom.blockInfo(target)[0]
                if new_size_bytes < capacity:
                    raise InvalidArgument("new_size_bytes", f"{new_size_bytes} is smaller than the disk's {capacity} bytes; shrinking is refused")
                if new_size_bytes > capacity:
                    dom.blockResize(target, new_size_bytes, libvirt.VIR_DOMAIN_BLOCK_RESIZE_BYTES)
                return capacity, dom.blockInfo(target)[0]

            try:
                before, after = await self.vms.hv.call(grow, timeout=120)
            except libvirt.libvirtError as exc:
                raise FailedPrecondition(f"growing {target} failed: {exc.get_error_message()}") from None
            if after < new_size_bytes:
                raise FailedPrecondition(f"{target} reports {after} bytes after growing to {new_size_bytes}")
            await op.progress(100, f"{target} grown from {before} to {after} bytes")
            return await self.vms._result(uuid)

        return await self.vms._submit("vm.disk.resize", uuid, work, request_id=request_id, fingerprint=fingerprint,
                                      lock_timeout=lock_timeout, wait=30.0)

    async def set_qos(self, ref: str, target: str, qos: IoQos, *, request_id: str = "", fingerprint: str = "",
                      lock_timeout: float = 0.0) -> OperationRecord:
        uuid, spec, running = await self._current(ref)
        index = _find(spec, target)
        for name, value in vars(qos).items():
            if value < 0:
                raise InvalidArgument(f"qos.{name}", "must not be negative")
        for kind in ("bytes", "iops"):
            total = getattr(qos, f"total_{kind}_sec")
            if total and (getattr(qos, f"read_{kind}_sec") or getattr(qos, f"write_{kind}_sec")):
                raise InvalidArgument(f"qos.total_{kind}_sec", f"cannot be combined with read_{kind}_sec/write_{kind}_sec")
        new = spec.copy()
        new.disks[index].qos = qos
        # libvirt takes every limit at once; 0 clears one.
        params = {f"{k}": int(v) for k, v in vars(qos).items()}

        async def work(op: OperationContext) -> Any:
            def apply(conn: libvirt.virConnect) -> None:
                dom = conn.lookupByUUIDString(uuid)
                # This libvirt refuses LIVE|CONFIG in one setBlockIoTune call: apply each.
                if running:
                    dom.setBlockIoTune(target, params, libvirt.VIR_DOMAIN_AFFECT_LIVE)
                dom.setBlockIoTune(target, params, libvirt.VIR_DOMAIN_AFFECT_CONFIG)
                self._save_spec(dom, new, running)

            try:
                await self.vms.hv.call(apply, timeout=60)
            except libvirt.libvirtError as exc:
                raise FailedPrecondition(f"setting I/O limits on {target} failed: {exc.get_error_message()}") from None
            self.vms._forget(uuid)
            return await self.vms._result(uuid)

        return await self.vms._submit("vm.disk.qos", uuid, work, request_id=request_id, fingerprint=fingerprint,
                                      lock_timeout=lock_timeout, wait=30.0)


async def release_lun_disks(vms: "VmService", uuid: str, disks: Iterable[tuple[int, DiskSpec]]) -> None:
    """Hand each SAN LUN disk that just left VM ``uuid`` back to storage for its host cleanup.

    Called once the VM change (undefine, detach) is done in libvirt, so it never raises: a
    hung or failing SAN must not turn a finished deletion into an error. Storage reports such
    releases itself (``lun.release_failed``) and retries them; here they are only logged.
    """
    resolver = vms._disk_resolver()
    seen: set[tuple[str, str]] = set()
    for i, disk in disks:
        if disk.lun is None or (disk.lun.datastore, disk.lun.lun_id) in seen:
            continue
        seen.add((disk.lun.datastore, disk.lun.lun_id))
        try:
            outcome = await resolver.release_lun(disk.lun.datastore, disk.lun.lun_id, field=f"spec.disks[{i}].lun", vm=uuid)
        except Exception as exc:  # the VM change stands whatever storage says
            log.warning("event=vm.lun_release_error vm=%s datastore=%s lun=%s error=%r", uuid, disk.lun.datastore,
                        disk.lun.lun_id, getattr(exc, "message", None) or str(exc))
            continue
        log.info("event=vm.lun_release vm=%s datastore=%s lun=%s outcome=%s", uuid, disk.lun.datastore, disk.lun.lun_id, outcome)


def _find(spec: VmSpec, target: str) -> int:
    if not target:
        raise InvalidArgument("target", "is required (the guest device name, e.g. vdb)")
    for i, d in enumerate(spec.disks):
        if d.target == target:
            return i
    known = ", ".join(d.target for d in spec.disks if d.target) or "none"
    raise NotFound(f"the VM has no disk {target!r} (disks: {known})", field="target")


def _only_disk(spec: VmSpec, index: int) -> VmSpec:
    """A copy of the spec whose only disk is disks[index] (to resolve just that binding)."""
    one = spec.copy()
    one.disks = [spec.disks[index]]
    one.nics = []
    return one
