"""UpdateVm: change a VM's spec, live where the hypervisor can (vCPU and memory hot-plug,
QoS, labels) and by re-rendering the whole definition from the spec while it is stopped. With
``allow_pending`` a running VM takes both: what can change live does, and the rest is rendered
into the persistent definition for the next start and recorded as pending (pending_changes.py).

The stopped path renders every device from the spec, which is why every device change
(disks, NICs) keeps the spec in the domain metadata current: what the spec omits, a stopped
update drops.
"""

from __future__ import annotations

from typing import Any, Sequence

import libvirt

from cna_agent.hypervisor import CHANGE_OUTLAST_S
from cna_agent.compute import domxml as dx
from cna_agent.compute import snapshots as snaps
from cna_agent.compute.binder import Binder
from cna_agent.compute.customization_mark import PENDING as CUSTOMIZATION_PENDING
from cna_agent.compute.lifecycle import DomainRenderer, VmLifecycle
from cna_agent.compute.pending_changes import write_mark
from cna_agent.compute.spec import VmSpec
from cna_agent.compute.spec_validation import validate
from cna_agent.compute.vmops import VmOps, save_spec
from cna_agent.errors import FailedPrecondition, InvalidArgument
from cna_agent.operations import OperationContext
from cna_agent.state.journal import OperationRecord

#: Fields UpdateVm may change, and those it can change on a running VM (hot-plug / live tune).
UPDATABLE = {"vcpus", "max_vcpus", "memory_mib", "max_memory_mib", "cpu_qos", "memory_qos", "description", "labels",
             "cpu_topology", "cpu_mode", "cpu_model", "balloon", "autostart", "console", "watchdog", "panic_device",
             "guest_agent", "serial_console", "numa_cells", "boot", "storage_errors"}
LIVE_UPDATABLE = {"vcpus", "memory_mib", "cpu_qos", "memory_qos", "description", "labels", "autostart", "storage_errors"}


class VmUpdates:
    def __init__(self, ops: VmOps, binder: Binder, renderer: DomainRenderer, lifecycle: VmLifecycle) -> None:
        self.ops = ops
        self.binder = binder
        self.renderer = renderer
        self.lifecycle = lifecycle

    async def update(self, ref: str, new: VmSpec, mask: Sequence[str], *, request_id: str = "", fingerprint: str = "",
                     lock_timeout: float = 0.0, allow_pending: bool = False) -> OperationRecord:
        inventory = self.ops.inventory
        uuid, name = await inventory.lookup_uuid(ref)
        if not mask:
            raise InvalidArgument("update_mask", "name the fields to change, e.g. vcpus, memory_mib, cpu_qos")
        for path in mask:
            if path not in UPDATABLE:
                raise InvalidArgument("update_mask", f"{path!r} cannot be updated (updatable: {', '.join(sorted(UPDATABLE))})")
        old = await inventory.spec(uuid)
        merged = old.copy()
        for path in mask:
            setattr(merged, path, getattr(new.copy(), path))
        validate(merged, self.lifecycle.validation_context())
        running = await inventory.running(uuid)
        pending: list[str] = []
        earlier: tuple[str, ...] = ()
        if running:
            pending = self._not_live(old, merged, mask, allow_pending)
            if pending:
                definition = await inventory.definition(uuid)
                if definition.customization is not None and definition.customization.state == CUSTOMIZATION_PENDING:
                    # the seed drive is in the definition but not in the spec: a re-render drops it
                    raise FailedPrecondition(f"vm {name!r} has not finished its first-boot customization; changes for "
                                             "the next start wait until it has", field="vm")
                earlier = await inventory.pending_changes(uuid, name)
        if not running or pending:
            tree = await self.ops.hv.call(lambda c: snaps.list_tree(c.lookupByUUIDString(uuid)), timeout=30)
            external = [x.name for x in tree if x.kind == "external"]
            if external:
                # Re-rendering would point the disks back at their base images and drop the overlays.
                raise FailedPrecondition(f"vm has external snapshots ({', '.join(external)}); delete them before "
                                         f"{'a stopped update' if not running else 'changes for the next start'}",
                                         field="vm")
        bindings = None if running and not pending else await self.binder.bindings(merged)
        live_mask = [p for p in mask if p not in pending] if running else []
        # the QEMU process the pending changes do not reach (recovery writes the mark with it)
        qemu = inventory.qemu_identity(name) if pending else ""
        waiting = [*earlier, *(p for p in pending if p not in earlier)]

        async def work(op: OperationContext) -> Any:
            if not running:
                xml = self.renderer.render(merged, bindings)
                await self.ops.hv.call(lambda c: c.defineXML(xml), timeout=30)
                inventory.remember(uuid, merged)
                return await self.ops.result(uuid, op)
            if self.lifecycle.reservations is not None:
                # A running VM that reserves more must still fit beside the others.
                async with self.lifecycle.reservations.admitted(uuid, merged, f"updating vm {merged.name!r}"):
                    await self._live_update(uuid, old, merged, live_mask, config=not pending)
            else:
                await self._live_update(uuid, old, merged, live_mask, config=not pending)
            if pending:
                await self._define_for_next_start(uuid, merged, bindings, waiting, qemu)
                inventory.forget(uuid)
            else:
                inventory.remember(uuid, merged)
            return await self.ops.result(uuid, op)

        return await self.ops.submit("vm.update", uuid, work, request_id=request_id, fingerprint=fingerprint,
                                     lock_timeout=lock_timeout,
                                     metadata={"spec_after": merged.to_json(), "mask": ",".join(mask),
                                               "live": ",".join(live_mask), "pending": ",".join(pending),
                                               "waiting": ",".join(waiting), "qemu": qemu})

    @staticmethod
    def _not_live(old: VmSpec, merged: VmSpec, mask: Sequence[str], allow_pending: bool) -> list[str]:
        """The masked fields a running VM cannot take now: pending with ``allow_pending``,
        FAILED_PRECONDITION (naming the field and the way out) without it."""
        waits: list[tuple[str, str]] = [(p, f"{p} can only change while the VM is stopped") for p in mask
                                        if p not in LIVE_UPDATABLE]
        if "vcpus" in mask and merged.vcpus != old.vcpus and merged.vcpus > old.effective_max_vcpus:
            waits.append(("vcpus", f"vcpus {merged.vcpus} exceeds the running VM's max_vcpus {old.effective_max_vcpus}"))
        if "memory_mib" in mask and merged.memory_mib > old.memory_mib and not old.max_memory_mib:
            waits.append(("memory_mib", "memory can only grow on a running VM defined with max_memory_mib (DIMM hot-plug)"))
        elif "memory_mib" in mask and merged.memory_mib > (old.max_memory_mib or old.memory_mib):
            waits.append(("memory_mib", f"memory_mib exceeds the running VM's max_memory_mib {old.max_memory_mib}"))
        if waits and not allow_pending:
            field = "update_mask" if waits[0][0] not in ("vcpus", "memory_mib") else f"spec.{waits[0][0]}"
            raise FailedPrecondition("; ".join(w for _, w in waits) + " (allow_pending applies it at the next start)",
                                     field=field)
        return list(dict.fromkeys(p for p, _ in waits))

    async def _define_for_next_start(self, uuid: str, merged: VmSpec, bindings: Any, fields: list[str], qemu: str) -> None:
        """The merged spec as the persistent definition (libvirt starts it next time; the running
        QEMU keeps its live one) and the mark naming what waits, tied to the running process.
        Autostart is a flag beside the definition, not in it: set again."""
        xml = self.renderer.render(merged, bindings)

        def define(conn: libvirt.virConnect) -> None:
            dom = conn.defineXML(xml)
            dom.setAutostart(1 if merged.autostart else 0)
            write_mark(dom, fields, qemu)

        await self.ops.hv.call(define, timeout=30, outlast=CHANGE_OUTLAST_S)

    async def _live_update(self, uuid: str, old: VmSpec, new: VmSpec, mask: Sequence[str], *, config: bool = True) -> None:
        """The live changes, to the persistent definition too unless ``config`` is off: then the
        definition for the next start follows in one defineXML (with its spec and the pending
        mark), so a crash in between leaves the old persistent spec, which recovery reads as
        "not done"."""
        live = libvirt.VIR_DOMAIN_AFFECT_LIVE | (libvirt.VIR_DOMAIN_AFFECT_CONFIG if config else 0)
        host_mhz = self.renderer.ctx.host_cpu_mhz

        def apply(conn: libvirt.virConnect) -> None:
            dom = conn.lookupByUUIDString(uuid)
            try:
                if "vcpus" in mask and new.vcpus != old.vcpus:
                    dom.setVcpusFlags(new.vcpus, live)
                if "memory_mib" in mask and new.memory_mib != old.memory_mib:
                    if new.memory_mib > old.memory_mib:
                        size = (new.memory_mib - old.memory_mib) * 1024
                        dimm = dx.MemoryDevice(model="dimm", size_kib=size, node=0).to_xml(pretty=False)
                        dom.attachDeviceFlags(dimm, live)
                    else:
                        dom.setMemoryFlags(new.memory_mib * 1024, live)
                if "cpu_qos" in mask:
                    params: dict[str, int] = {"cpu_shares": new.cpu_qos.shares or 1024}
                    if new.cpu_qos.limit_mhz:
                        params["global_period"] = 100_000
                        params["global_quota"] = max(1000, new.cpu_qos.limit_mhz * 100_000 // max(1, host_mhz))
                    else:
                        params["global_quota"] = -1
                    dom.setSchedulerParametersFlags(params, live)
                if "memory_qos" in mask:
                    limit = new.memory_qos.limit_mib * 1024 if new.memory_qos.limit_mib else libvirt.VIR_DOMAIN_MEMORY_PARAM_UNLIMITED
                    dom.setMemoryParameters({"hard_limit": limit}, live)
                if "autostart" in mask and config:
                    dom.setAutostart(1 if new.autostart else 0)
                save_spec(dom, new, True, config=config)
            except libvirt.libvirtError as exc:
                raise FailedPrecondition(f"live update failed (the guest may not support hot-plug): {exc}") from None

        await self.ops.hv.call(apply, timeout=60, outlast=CHANGE_OUTLAST_S)
