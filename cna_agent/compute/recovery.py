"""Closing VM operations a crashed agent left open: decided from libvirt's state now, never
redone (DESIGN.md "Restart adopts, never redoes"). The runner calls these at start-up, by
operation kind (recovery_handlers). An operation whose effect is there ends with the result it
would have returned (the VM as it is now; nothing for a delete); one whose effect is not there
ends ABORTED with what libvirt shows instead, so partial effects are stated, not hidden."""

from __future__ import annotations

from typing import Any, Callable

import libvirt

from cna_agent.compute.inventory import VmInventory
from cna_agent.errors import CODES
from cna_agent.hypervisor import Hypervisor
from cna_agent.operations import RecoveryHandler
from cna_agent.state.journal import OperationError, OperationRecord


class VmRecovery:
    def __init__(self, hypervisor: Hypervisor, inventory: VmInventory) -> None:
        self.hv = hypervisor
        self.inventory = inventory

    def handlers(self) -> dict[str, RecoveryHandler]:
        return {"vm.create": self.recover_create, "vm.start": self.recover_start,
                "vm.shutdown": self.recover_shutdown, "vm.delete": self.recover_delete}

    async def _now(self, uuid: str) -> tuple[bool, bool]:
        """(defined, running) as libvirt says now."""

        def read(conn: libvirt.virConnect) -> tuple[bool, bool]:
            try:
                return True, bool(conn.lookupByUUIDString(uuid).isActive())
            except libvirt.libvirtError as exc:
                if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                    return False, False
                raise

        return await self.hv.call(read, timeout=10)

    async def _by_state(self, record: OperationRecord, done: Callable[[bool, bool], bool], what: str, *,
                        result: bool = True) -> Any:
        """The VM (or nothing) when libvirt shows the effect, else ABORTED saying what it shows."""
        exists, active = await self._now(record.target)
        if done(exists, active):
            return await self.inventory.get(record.target) if result and exists else None
        shows = "running" if active else "defined and stopped" if exists else "not defined"
        return OperationError(CODES["ABORTED"], f"the agent stopped before {what}; libvirt shows the VM {shows} "
                                                "(nothing was redone)")

    async def recover_create(self, record: OperationRecord) -> Any:
        """A vm.create cut short by an agent crash succeeded iff the domain exists now."""
        return await self._by_state(record, lambda exists, active: exists, "the VM was defined")

    async def recover_start(self, record: OperationRecord) -> Any:
        return await self._by_state(record, lambda exists, active: exists and active, "the VM was started")

    async def recover_shutdown(self, record: OperationRecord) -> Any:
        return await self._by_state(record, lambda exists, active: exists and not active, "the VM was shut down")

    async def recover_delete(self, record: OperationRecord) -> Any:
        return await self._by_state(record, lambda exists, active: not exists, "the VM was deleted", result=False)
