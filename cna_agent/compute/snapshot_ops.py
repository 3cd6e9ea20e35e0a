"""Snapshots of a VM as journalled operations (the libvirt side is snapshots.py).

Every snapshot change holds the VM's lock, like any other VM operation, and forgets the
cached definition afterwards: an external snapshot or a revert changes the disk sources.
"""

from __future__ import annotations

from typing import Any

from cna_agent.hypervisor import CHANGE_OUTLAST_S
from cna_agent.compute import snapshots as snaps
from cna_agent.compute.spec_validation import validate_name
from cna_agent.compute.vmops import VmOps
from cna_agent.operations import OperationContext
from cna_agent.state.journal import OperationRecord


class VmSnapshots:
    def __init__(self, ops: VmOps) -> None:
        self.ops = ops

    async def list(self, ref: str) -> list[snaps.SnapshotInfo]:
        uuid, _ = await self.ops.inventory.lookup_uuid(ref)
        return await self.ops.hv.call(lambda c: snaps.list_tree(c.lookupByUUIDString(uuid)), timeout=30)

    async def create(self, ref: str, name: str, *, description: str = "", quiesce: bool = False, memory: bool = False,
                     request_id: str = "", fingerprint: str = "", lock_timeout: float = 0.0) -> OperationRecord:
        validate_name(name, "name")
        snaps.validate_description(description)
        uuid, _ = await self.ops.inventory.lookup_uuid(ref)

        async def work(op: OperationContext) -> Any:
            info = await self.ops.hv.call(lambda c: snaps.create(c.lookupByUUIDString(uuid), name, description, quiesce, memory),
                                          timeout=300, outlast=CHANGE_OUTLAST_S)
            self.ops.inventory.forget(uuid)  # an external snapshot changed the disk sources
            what = f"{info.kind}{', with memory' if info.memory else ''}"
            await self.ops.events.publish("vm.snapshot.created", resource_kind="vm", resource_id=uuid, message=f"snapshot {name} ({what})",
                                          attributes={"snapshot": name, "kind": info.kind, "memory": str(info.memory).lower()},
                                          operation_id=op.id)
            return info

        # "quiesce" is kept so that a crash in the middle is followed by a thaw (recovery_devices.py):
        # with the embedded driver, the process that froze the guest is the one that died.
        return await self.ops.submit("vm.snapshot.create", uuid, work, request_id=request_id, fingerprint=fingerprint,
                                     lock_timeout=lock_timeout,
                                     metadata={"snapshot": name, **({"quiesce": "true"} if quiesce else {})})

    async def revert(self, ref: str, name: str, *, request_id: str = "", fingerprint: str = "",
                     lock_timeout: float = 0.0) -> OperationRecord:
        validate_name(name, "snapshot")
        uuid, _ = await self.ops.inventory.lookup_uuid(ref)
        # Recovery tells "reverted" from "not yet" by libvirt's current snapshot changing to it.
        tree = await self.ops.hv.call(lambda c: snaps.list_tree(c.lookupByUUIDString(uuid)), timeout=30)
        current = next((x.name for x in tree if x.current), "")

        async def work(op: OperationContext) -> Any:
            await self.ops.hv.call(lambda c: snaps.revert(c.lookupByUUIDString(uuid), name), timeout=300,
                                   outlast=CHANGE_OUTLAST_S)
            self.ops.inventory.forget(uuid)
            await self.ops.events.publish("vm.snapshot.reverted", resource_kind="vm", resource_id=uuid, message=f"reverted to {name}",
                                          attributes={"snapshot": name}, operation_id=op.id)
            return await self.ops.result(uuid, op)

        return await self.ops.submit("vm.snapshot.revert", uuid, work, request_id=request_id, fingerprint=fingerprint,
                                     lock_timeout=lock_timeout, metadata={"snapshot": name, "current_before": current})

    async def delete(self, ref: str, name: str, *, request_id: str = "", fingerprint: str = "",
                     lock_timeout: float = 0.0) -> OperationRecord:
        validate_name(name, "snapshot")
        uuid, _ = await self.ops.inventory.lookup_uuid(ref)

        async def work(op: OperationContext) -> Any:
            how = await self.ops.hv.call(lambda c: snaps.delete(c.lookupByUUIDString(uuid), name), timeout=300,
                                         outlast=CHANGE_OUTLAST_S)
            await self.ops.events.publish("vm.snapshot.deleted", resource_kind="vm", resource_id=uuid, message=f"snapshot {name} deleted ({how})",
                                          attributes={"snapshot": name, "how": how}, operation_id=op.id)
            return None

        return await self.ops.submit("vm.snapshot.delete", uuid, work, request_id=request_id, fingerprint=fingerprint,
                                     lock_timeout=lock_timeout, metadata={"snapshot": name})
