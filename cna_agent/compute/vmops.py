"""What every VM operation shares: the journalled, per-VM-serialised submission, the
definition write of the agent's spec, and the result (a fresh VmInfo).

* Every mutating call validates its input and resolves its bindings *before* submitting, so
  bad input is refused with INVALID_ARGUMENT and nothing on the host changes.
* Operations take the lock "vm/<uuid>": one operation per VM at a time, different VMs in
  parallel; ``lock_timeout`` says how long to wait for a busy VM (0 = FAILED_PRECONDITION at
  once). Duplicate request ids return the first operation (the runner's journal).
* The lifecycle, device, snapshot and update modules each take one VmOps; none of them
  reaches into another's internals.
"""

from __future__ import annotations

import asyncio
from typing import Any, Awaitable, Callable, Mapping

import libvirt

from cna_agent import __version__
from cna_agent.compute import domxml as dx
from cna_agent.compute.inventory import VmInfo, VmInventory, vm_lock
from cna_agent.compute.spec import VmSpec
from cna_agent.errors import Unavailable
from cna_agent.hypervisor import CHANGE_OUTLAST_S, Hypervisor
from cna_agent.operations import OperationContext, OperationRunner
from cna_agent.state.eventlog import EventHub
from cna_agent.state.journal import OperationRecord

#: How long a quick VM operation is awaited before the caller gets it back still running.
QUICK_WAIT_S = 10.0
#: How long a guest gets to release an unplugged device before the unplug is reported failed.
DETACH_TIMEOUT_S = 30.0

#: One device's element in the domain XML read with these flags (0 = live), or None.
DeviceLookup = Callable[[libvirt.virConnect, int], "str | None"]


def affect(running: bool) -> int:
    """libvirt flags for a change to the persistent definition and, when it runs, the live VM."""
    return libvirt.VIR_DOMAIN_AFFECT_CONFIG | (libvirt.VIR_DOMAIN_AFFECT_LIVE if running else 0)


def save_spec(dom: libvirt.virDomain, spec: VmSpec, running: bool, *, config: bool = True) -> None:
    """Write the agent's spec into the domain metadata (live too when it runs), so a restart
    adopts the VM with the devices it really has; ``config`` off writes the live one only (the
    persistent one follows in a defineXML of its own). Runs in the libvirt executor."""
    body = dx.metadata_for_set(spec.to_json(), agent_version=__version__)
    flags = affect(running) if config else libvirt.VIR_DOMAIN_AFFECT_LIVE
    dom.setMetadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, body, "cna", dx.CNA_NS, flags)


#: How long an operation whose work is done waits for libvirt to answer the read of its result.
RESULT_WAIT_S = 30.0


class VmOps:
    def __init__(self, hypervisor: Hypervisor, runner: OperationRunner, events: EventHub, inventory: VmInventory) -> None:
        self.hv = hypervisor
        self.runner = runner
        self.events = events
        self.inventory = inventory

    async def submit(self, kind: str, uuid: str, work: Callable[[OperationContext], Awaitable[Any]], *, request_id: str = "",
                     fingerprint: str = "", lock_timeout: float = 0.0, wait: float = QUICK_WAIT_S,
                     metadata: Mapping[str, str] | None = None, cancellable: bool = False) -> OperationRecord:
        return await self.runner.submit(kind, uuid, work, request_id=request_id, fingerprint=fingerprint,
                                        lock_key=vm_lock(uuid), lock_timeout=lock_timeout, wait=wait, metadata=metadata,
                                        cancellable=cancellable)

    async def earlier(self, request_id: str, kinds: tuple[str, ...], fingerprint: str) -> OperationRecord | None:
        """The operation an earlier request with this id opened (its answer was lost, e.g. the
        agent died), checked like any repeat (same kind, target, fingerprint), or None. Asked
        before the request is validated against the VM as it is now: the first attempt may
        have changed it (the disk is attached, the VM left), and the retry must still find it."""
        prior = await self.runner.by_request_id(request_id)
        if prior is None or prior.kind not in kinds:
            return None

        async def never(op: OperationContext) -> Any:
            raise AssertionError("a repeated request runs nothing")

        return await self.submit(prior.kind, prior.target, never, request_id=request_id, fingerprint=fingerprint)

    async def result(self, uuid: str, op: OperationContext) -> VmInfo:
        """The VM as an operation's result: read now, without naming the operation that is
        about to finish as the VM's active one.

        The work is done by the time this is read, so a libvirt that does not answer now (a
        libvirtd killed right after it started the VM: seen in the fault suite, the create
        reported failed while its guest ran) is asked again while it reconnects, up to
        RESULT_WAIT_S, rather than failing an operation whose effect is there."""
        deadline = asyncio.get_running_loop().time() + RESULT_WAIT_S
        while True:
            try:
                info = await self.inventory.get(uuid)
                break
            except Unavailable:
                if asyncio.get_running_loop().time() > deadline:
                    raise
                await asyncio.sleep(1.0)
        if info.active_operation_id == op.id:
            info.active_operation_id = ""
        return info

    async def current(self, ref: str) -> tuple[str, VmSpec, bool]:
        """(uuid, spec, running) of a managed VM, for a device change."""
        uuid, _ = await self.inventory.lookup_uuid(ref)
        return uuid, await self.inventory.spec(uuid), await self.inventory.running(uuid)

    async def unplug(self, uuid: str, element: DeviceLookup, running: bool, *, refused: Callable[[str], Exception],
                     not_released: Exception, progress: Callable[[], Awaitable[None]]) -> None:
        """Detach one device from the live VM (when it runs) and from its persistent definition,
        then wait until the guest has released it: PCI unplug needs the guest's cooperation, and
        until it has, the device is still in use and reporting success would be a lie."""

        def detach(conn: libvirt.virConnect) -> None:
            dom = conn.lookupByUUIDString(uuid)
            live = element(conn, 0) if running else None
            config = element(conn, libvirt.VIR_DOMAIN_XML_INACTIVE) if dom.isPersistent() else None
            if live is not None:
                dom.detachDeviceFlags(live, libvirt.VIR_DOMAIN_AFFECT_LIVE)
            if config is not None:
                dom.detachDeviceFlags(config, libvirt.VIR_DOMAIN_AFFECT_CONFIG)

        try:
            await self.hv.call(detach, timeout=60, outlast=CHANGE_OUTLAST_S)
        except libvirt.libvirtError as exc:
            raise refused(exc.get_error_message()) from None
        if not running:
            return
        await progress()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + DETACH_TIMEOUT_S
        while await self.hv.call(lambda c: element(c, 0), timeout=30) is not None:
            if loop.time() > deadline:
                raise not_released
            await asyncio.sleep(0.3)

    async def write_spec(self, uuid: str, spec: VmSpec, running: bool) -> None:
        await self.hv.call(lambda c: save_spec(c.lookupByUUIDString(uuid), spec, running), timeout=30)
        self.inventory.remember(uuid, spec)
