"""Closing VM operations a crashed agent left open: decided from libvirt's state now, never
redone (DESIGN.md "Restart adopts, never redoes"). The runner calls these at start-up, by
operation kind (recovery_handlers)."""

from __future__ import annotations

from typing import Callable

import libvirt

from cna_agent.errors import CODES
from cna_agent.hypervisor import Hypervisor
from cna_agent.operations import RecoveryHandler
from cna_agent.state.journal import OperationError, OperationRecord


class VmRecovery:
    def __init__(self, hypervisor: Hypervisor) -> None:
        self.hv = hypervisor

    def handlers(self) -> dict[str, RecoveryHandler]:
        return {"vm.create": self.recover_create, "vm.start": self.recover_start,
                "vm.shutdown": self.recover_shutdown, "vm.delete": self.recover_delete}

    async def recover_create(self, record: OperationRecord) -> OperationError | None:
        """A vm.create cut short by an agent crash succeeded iff the domain exists now."""
        try:
            await self.hv.call(lambda c: c.lookupByUUIDString(record.target), timeout=10)
            return None
        except libvirt.libvirtError:
            return OperationError(CODES["ABORTED"], "the agent stopped before the VM was defined; nothing was created")

    async def _by_state(self, record: OperationRecord, done: Callable[[bool, bool], bool], what: str) -> OperationError | None:
        """Decide a cut-short operation from libvirt's state now (exists, active) instead of redoing it."""

        def read(conn: libvirt.virConnect) -> tuple[bool, bool]:
            try:
                return True, bool(conn.lookupByUUIDString(record.target).isActive())
            except libvirt.libvirtError as exc:
                if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                    return False, False
                raise

        exists, active = await self.hv.call(read, timeout=10)
        if done(exists, active):
            return None
        return OperationError(CODES["ABORTED"], f"the agent stopped before {what}; libvirt shows it did not happen (nothing was redone)")

    async def recover_start(self, record: OperationRecord) -> OperationError | None:
        return await self._by_state(record, lambda exists, active: exists and active, "the VM was started")

    async def recover_shutdown(self, record: OperationRecord) -> OperationError | None:
        return await self._by_state(record, lambda exists, active: exists and not active, "the VM was shut down")

    async def recover_delete(self, record: OperationRecord) -> OperationError | None:
        return await self._by_state(record, lambda exists, active: not exists, "the VM was deleted")
