"""Disks on existing VMs: hot-plug, unplug, live grow and I/O QoS.

The StorageService's AttachDisk/DetachDisk/ResizeDisk/SetDiskQos RPCs land here (the api
layer hands them to compute), because only compute renders domain XML and owns the VM's lock
and stored spec. Every change is applied to the live domain (when it runs) and to its
persistent definition, and the agent's spec in the domain metadata is updated in the same
operation, so a restart adopts the VM with the disks it really has.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import libvirt

from cna_agent.hypervisor import CHANGE_OUTLAST_S
from cna_agent.compute import domxml as dx
from cna_agent.compute.binder import Binder
from cna_agent.compute.lifecycle import VmLifecycle
from cna_agent.compute.render import assign_disk_targets, disk_xml
from cna_agent.compute.spec import DiskSpec, IoQos, VmSpec
from cna_agent.compute.spec_validation import check_io_qos, validate
from cna_agent.compute.vmops import DETACH_TIMEOUT_S, VmOps, affect, save_spec
from cna_agent.errors import FailedPrecondition, InvalidArgument, NotFound
from cna_agent.failpoints import crash_point
from cna_agent.operations import OperationContext
from cna_agent.state.journal import OperationRecord

log = logging.getLogger(__name__)

#: Grow steps: virtio and SCSI report sizes in 512-byte sectors.
SECTOR = 512
_DISK_FIELD = re.compile(r"^spec\.disks\[\d+\]")


def disk_element(xml: str, target: str) -> str | None:
    """The ``<disk>`` with ``target`` in a domain document, as XML (typed model), or None."""
    dom = dx.Domain.from_xml(xml)
    for d in dom.devices.disks if dom.devices else []:
        if d.target_dev == target:
            return d.to_xml(pretty=False)
    return None


class DiskOperations:
    """Disk changes on one host's VMs (the VM's lock and spec: VmOps)."""

    def __init__(self, ops: VmOps, binder: Binder, lifecycle: VmLifecycle) -> None:
        self.ops = ops
        self.binder = binder
        self.lifecycle = lifecycle

    async def attach(self, ref: str, disk: DiskSpec, *, request_id: str = "", fingerprint: str = "",
                     lock_timeout: float = 0.0) -> OperationRecord:
        earlier = await self.ops.earlier(request_id, ("vm.disk.attach",), fingerprint)
        if earlier is not None:
            return earlier
        uuid, spec, running = await self.ops.current(ref)
        new = spec.copy()
        new.disks.append(disk)
        index = len(new.disks) - 1
        if not disk.target:
            disk.target = assign_disk_targets(new, new.os_family)[index]
        if disk.boot_order and running:
            raise FailedPrecondition("a hot-plugged disk cannot change the boot order of a running VM", field="disk.boot_order")
        try:
            validate(new, self.lifecycle.validation_context())
            binding = await self.binder.disk(new, index, field=f"spec.disks[{index}]")
        except InvalidArgument as exc:
            # Errors name the request's field ("disk.volume"), not the merged spec's.
            field = _DISK_FIELD.sub("disk", exc.field)
            raise InvalidArgument(field, exc.message.split(": ", 1)[-1]) from None
        xml = disk_xml(new, index, binding, disk.target)

        async def work(op: OperationContext) -> Any:
            def apply(conn: libvirt.virConnect) -> None:
                dom = conn.lookupByUUIDString(uuid)
                dom.attachDeviceFlags(xml, affect(running))
                crash_point("vm.disk.attach.plugged")
                save_spec(dom, new, running)

            try:
                await self.ops.hv.call(apply, timeout=60, outlast=CHANGE_OUTLAST_S)
            except BaseException as exc:
                await self.binder.release_luns(new, [index])  # the LUN claim made for this disk
                if isinstance(exc, libvirt.libvirtError):
                    raise FailedPrecondition(f"attaching {disk.target} failed: {exc.get_error_message()}") from None
                raise
            self.ops.inventory.remember(uuid, new)
            return await self.ops.result(uuid, op)

        try:
            return await self.ops.submit("vm.disk.attach", uuid, work, request_id=request_id, fingerprint=fingerprint,
                                         lock_timeout=lock_timeout, wait=30.0,
                                         metadata={"disk_target": disk.target, "spec_after": new.to_json()})
        except Exception:
            await self.binder.release_luns(new, [index])  # refused before it ran
            raise

    async def detach(self, ref: str, target: str, *, request_id: str = "", fingerprint: str = "",
                     lock_timeout: float = 0.0) -> OperationRecord:
        earlier = await self.ops.earlier(request_id, ("vm.disk.detach",), fingerprint)
        if earlier is not None:
            return earlier
        uuid, spec, running = await self.ops.current(ref)
        index = _find(spec, target)
        new = spec.copy()
        del new.disks[index]

        async def work(op: OperationContext) -> Any:
            def element(conn: libvirt.virConnect, flags: int) -> str | None:
                return disk_element(conn.lookupByUUIDString(uuid).XMLDesc(flags), target)

            await self.ops.unplug(
                uuid, element, running,
                refused=lambda why: FailedPrecondition(f"detaching {target} failed: {why}"),
                not_released=FailedPrecondition(f"the guest did not release {target} within {DETACH_TIMEOUT_S:.0f}s; "
                                                "it stays attached to the running VM (retry, or stop the VM)"),
                progress=lambda: op.progress(50, "waiting for the guest to release the disk"))
            await self.ops.write_spec(uuid, new, running)
            if spec.disks[index].lun is not None:
                # The disk is gone from the VM (and its spec), so storage may now see no user left.
                await op.progress(90, "releasing the LUN on the host")
                await self.binder.release_lun_disks(spec, [index])
            return await self.ops.result(uuid, op)

        return await self.ops.submit("vm.disk.detach", uuid, work, request_id=request_id, fingerprint=fingerprint,
                                     lock_timeout=lock_timeout, wait=DETACH_TIMEOUT_S + 5,
                                     metadata={"disk_target": target, "spec_after": new.to_json()})

    async def resize(self, ref: str, target: str, new_size_bytes: int, *, request_id: str = "", fingerprint: str = "",
                     lock_timeout: float = 0.0) -> OperationRecord:
        uuid, spec, running = await self.ops.current(ref)
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
                before, after = await self.ops.hv.call(grow, timeout=120, outlast=CHANGE_OUTLAST_S)
            except libvirt.libvirtError as exc:
                raise FailedPrecondition(f"growing {target} failed: {exc.get_error_message()}") from None
            if after < new_size_bytes:
                raise FailedPrecondition(f"{target} reports {after} bytes after growing to {new_size_bytes}")
            await op.progress(100, f"{target} grown from {before} to {after} bytes")
            return await self.ops.result(uuid, op)

        return await self.ops.submit("vm.disk.resize", uuid, work, request_id=request_id, fingerprint=fingerprint,
                                     lock_timeout=lock_timeout, wait=30.0,
                                     metadata={"disk_target": target, "new_size_bytes": str(new_size_bytes)})

    async def set_qos(self, ref: str, target: str, qos: IoQos, *, request_id: str = "", fingerprint: str = "",
                      lock_timeout: float = 0.0) -> OperationRecord:
        uuid, spec, running = await self.ops.current(ref)
        index = _find(spec, target)
        check_io_qos(qos, "qos")  # the VM spec's own validator: refused now, not mid-operation
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
                save_spec(dom, new, running)

            try:
                await self.ops.hv.call(apply, timeout=60, outlast=CHANGE_OUTLAST_S)
            except libvirt.libvirtError as exc:
                raise FailedPrecondition(f"setting I/O limits on {target} failed: {exc.get_error_message()}") from None
            self.ops.inventory.remember(uuid, new)
            return await self.ops.result(uuid, op)

        return await self.ops.submit("vm.disk.qos", uuid, work, request_id=request_id, fingerprint=fingerprint,
                                     lock_timeout=lock_timeout, wait=30.0,
                                     metadata={"disk_target": target, "spec_after": new.to_json(), "running": str(running)})


def _find(spec: VmSpec, target: str) -> int:
    if not target:
        raise InvalidArgument("target", "is required (the guest device name, e.g. vdb)")
    for i, d in enumerate(spec.disks):
        if d.target == target:
            return i
    known = ", ".join(d.target for d in spec.disks if d.target) or "none"
    raise NotFound(f"the VM has no disk {target!r} (disks: {known})", field="target")
