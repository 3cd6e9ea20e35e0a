"""NICs on existing VMs: hot-plug, unplug and link state.

The NetworkService's AttachNic/DetachNic/SetNicLink RPCs land here (the api layer hands them
to compute), for the same reason as disks (disks.py): compute owns VMs and every device of
theirs. A NIC is rendered by the domain builder's own renderer (render.interface_xml), so it
looks the same whether it was defined with the VM or plugged later, and every change updates
the agent's spec in the domain metadata in the same operation: GetVm lists the NIC, a stopped
UpdateVm (which re-renders from the spec) keeps it, and a restart adopts it. Network is asked
only for what it owns: the port group's binding and the labels on the plugged port.
"""

from __future__ import annotations

import logging
from typing import Any

import libvirt

from cna_agent.hypervisor import CHANGE_OUTLAST_S
from cna_agent.compute import domxml as dx
from cna_agent.compute.binder import Binder
from cna_agent.compute.lifecycle import VmLifecycle
from cna_agent.compute.render import interface_xml
from cna_agent.compute.spec import NicSpec, VmSpec
from cna_agent.compute.spec_validation import check_mac, validate
from cna_agent.compute.vmops import DETACH_TIMEOUT_S, VmOps, affect, save_spec
from cna_agent.contracts import VmNic
from cna_agent.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable
from cna_agent.operations import OperationContext
from cna_agent.state.journal import OperationRecord

log = logging.getLogger(__name__)

#: How long a NIC change waits for another operation on the same VM.
NIC_LOCK_TIMEOUT_S = 30.0


def interface_element(xml: str, mac: str) -> dx.Interface | None:
    """The ``<interface>`` with ``mac`` in a domain document (typed model), or None."""
    dom = dx.Domain.from_xml(xml)
    for i in dom.devices.interfaces if dom.devices else []:
        if (i.mac or "").lower() == mac:
            return i
    return None


def _spec_field(exc: InvalidArgument, index: int) -> InvalidArgument:
    """Errors name the request's field ("nic.mac"), not the merged spec's ("spec.nics[2].mac")."""
    prefix = f"spec.nics[{index}]"
    if exc.field.startswith(prefix):
        field = "nic" + exc.field[len(prefix):]
        return InvalidArgument(field, exc.message.split(": ", 1)[-1])
    return exc


class NicOperations:
    def __init__(self, ops: VmOps, binder: Binder, lifecycle: VmLifecycle) -> None:
        self.ops = ops
        self.binder = binder
        self.lifecycle = lifecycle

    async def _nic(self, uuid: str, mac: str) -> VmNic | None:
        for nic in await self.ops.inventory.vm_nics(uuid):
            if nic.mac == mac:
                return nic
        return None

    async def attach(self, ref: str, nic: NicSpec, *, request_id: str = "", fingerprint: str = "",
                     lock_timeout: float = NIC_LOCK_TIMEOUT_S) -> OperationRecord:
        """Hot-plug (running VM) or add to the definition (stopped VM) a NIC in its port group."""
        uuid, spec, running = await self.ops.current(ref)
        new = spec.copy()
        nic = NicSpec(**vars(nic))
        new.nics.append(nic)
        index = len(new.nics) - 1
        if nic.boot_order and running:
            raise FailedPrecondition("a hot-plugged NIC cannot change the boot order of a running VM", field="nic.boot_order")
        # A MAC in use anywhere on the host (this VM included) is ALREADY_EXISTS, checked first.
        await self.binder.fill_macs([nic], unique_field="nic.mac")
        try:
            validate(new, self.lifecycle.validation_context())
        except InvalidArgument as exc:
            raise _spec_field(exc, index) from None
        binding = await self.binder.nic(nic, field="nic")
        xml = interface_xml(new, index, binding)

        async def work(op: OperationContext) -> Any:
            def apply(conn: libvirt.virConnect) -> None:
                dom = conn.lookupByUUIDString(uuid)
                dom.attachDeviceFlags(xml, affect(running))
                save_spec(dom, new, running)

            try:
                await self.ops.hv.call(apply, timeout=60, outlast=CHANGE_OUTLAST_S)
            except libvirt.libvirtError as exc:
                raise FailedPrecondition(f"nic: libvirt refused the NIC: {exc.get_error_message()}") from None
            self.ops.inventory.remember(uuid, new)
            plugged = await self._nic(uuid, nic.mac)
            if plugged is None:
                raise FailedPrecondition(f"nic: {nic.mac} is not in the VM's definition after the attach")
            await self.binder.ports.port_plugged(binding, plugged)
            await self.ops.events.publish("network.nic.attached", resource_kind="vm", resource_id=uuid, resource_name=plugged.vm_name,
                                          message=f"NIC {nic.mac} in port group {nic.port_group}", operation_id=op.id,
                                          attributes={"changed": "true", "mac": nic.mac, "port_group": nic.port_group})
            return plugged

        return await self.ops.submit("network.nic.attach", uuid, work, request_id=request_id, fingerprint=fingerprint,
                                     lock_timeout=lock_timeout,
                                     metadata={"nic_mac": nic.mac, "spec_after": new.to_json()}, wait=60.0)

    async def _located(self, ref: str, mac: str) -> tuple[str, VmSpec, bool, str]:
        """(uuid, spec, running, mac) for a NIC the VM has (in libvirt; the spec may predate it)."""
        mac = check_mac(mac, "mac")
        uuid, spec, running = await self.ops.current(ref)
        if await self._nic(uuid, mac) is None:
            raise NotFound(f"mac: the VM has no NIC with MAC {mac}", field="mac")
        return uuid, spec, running, mac

    async def detach(self, ref: str, mac: str, *, request_id: str = "", fingerprint: str = "",
                     lock_timeout: float = NIC_LOCK_TIMEOUT_S) -> OperationRecord:
        uuid, spec, running, mac = await self._located(ref, mac)
        new = spec.copy()
        new.nics = [n for n in new.nics if n.mac.lower() != mac]

        async def work(op: OperationContext) -> Any:
            before = await self._nic(uuid, mac)

            def element(conn: libvirt.virConnect, flags: int) -> str | None:
                found = interface_element(conn.lookupByUUIDString(uuid).XMLDesc(flags), mac)
                return found.to_xml(pretty=False) if found is not None else None

            await self.ops.unplug(
                uuid, element, running,
                refused=lambda why: FailedPrecondition(f"mac: libvirt refused to unplug the NIC: {why}"),
                not_released=Unavailable(f"mac: the guest did not release NIC {mac} within {DETACH_TIMEOUT_S:.0f}s; "
                                         "it stays requested"),
                progress=lambda: op.progress(50, "waiting for the guest to release the NIC"))
            await self.ops.write_spec(uuid, new, running)
            if before is not None:
                await self.binder.ports.port_unplugged(before)
            device = before.device if before is not None else ""
            await self.ops.events.publish("network.nic.detached", resource_kind="vm", resource_id=uuid,
                                          resource_name=before.vm_name if before else "", operation_id=op.id,
                                          message=f"NIC {mac} ({device or 'no device'})", attributes={"changed": "true", "mac": mac})
            return None

        return await self.ops.submit("network.nic.detach", uuid, work, request_id=request_id, fingerprint=fingerprint,
                                     lock_timeout=lock_timeout,
                                     metadata={"nic_mac": mac, "spec_after": new.to_json()}, wait=60.0)

    async def set_link(self, ref: str, mac: str, up: bool, *, request_id: str = "", fingerprint: str = "",
                       lock_timeout: float = NIC_LOCK_TIMEOUT_S) -> OperationRecord:
        uuid, spec, running, mac = await self._located(ref, mac)
        new = spec.copy()
        for n in new.nics:
            if n.mac.lower() == mac:
                n.link_down = not up

        async def work(op: OperationContext) -> Any:
            def update(conn: libvirt.virConnect) -> None:
                dom = conn.lookupByUUIDString(uuid)
                targets = [(0, libvirt.VIR_DOMAIN_AFFECT_LIVE)] if running else []
                if dom.isPersistent():
                    targets.append((libvirt.VIR_DOMAIN_XML_INACTIVE, libvirt.VIR_DOMAIN_AFFECT_CONFIG))
                for xml_flags, affect_flags in targets:
                    iface = interface_element(dom.XMLDesc(xml_flags), mac)
                    if iface is None:
                        continue
                    iface.link_state = "up" if up else "down"
                    dom.updateDeviceFlags(iface.to_xml(pretty=False), affect_flags)
                save_spec(dom, new, running)

            try:
                await self.ops.hv.call(update, timeout=60, outlast=CHANGE_OUTLAST_S)
            except libvirt.libvirtError as exc:
                raise FailedPrecondition(f"mac: libvirt refused the link change: {exc.get_error_message()}") from None
            self.ops.inventory.remember(uuid, new)
            nic = await self._nic(uuid, mac)
            if nic is None:
                raise FailedPrecondition(f"mac: {mac} is not in the VM's definition after the link change")
            await self.ops.events.publish("network.nic.link", resource_kind="vm", resource_id=uuid,
                                          resource_name=nic.vm_name, operation_id=op.id,
                                          message=f"NIC {mac} link {'up' if up else 'down'}",
                                          attributes={"changed": "true", "mac": mac, "link": "up" if up else "down"})
            return nic

        return await self.ops.submit("network.nic.link", uuid, work, request_id=request_id, fingerprint=fingerprint,
                                     lock_timeout=lock_timeout,
                                     metadata={"nic_mac": mac, "spec_after": new.to_json(), "link": "up" if up else "down"})

