"""Closing network operations a crashed agent left open, decided from the declaration store.

Bridges and port groups are declarations (DESIGN.md: desired state, reconciled): an ensure's
effect that matters is that its declaration is stored, because the network loop applies every
stored declaration at start and repairs drift after. So an ensure cut short succeeded iff the
store holds exactly the declaration the request carried (its operation metadata), and a delete
iff the name is no longer declared. Nothing is redone; an ensure that did not reach the store
ends ABORTED saying the previous declaration (or none) is still the one in force.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Any

from cna_agent.errors import CODES
from cna_agent.network.service import NetworkService
from cna_agent.operations import RecoveryHandler
from cna_agent.state.journal import OperationError, OperationRecord


class NetworkRecovery:
    def __init__(self, service: NetworkService) -> None:
        self.svc = service

    def handlers(self) -> dict[str, RecoveryHandler]:
        return {"network.bridge.ensure": self.recover_bridge_ensure, "network.bridge.delete": self.recover_bridge_delete,
                "network.port_group.ensure": self.recover_pg_ensure, "network.port_group.delete": self.recover_pg_delete}

    @staticmethod
    def _stored(record: OperationRecord, stored: Any) -> bool:
        wanted = record.metadata.get("decl")
        return wanted is not None and stored is not None and json.dumps(asdict(stored), sort_keys=True) == wanted

    async def recover_bridge_ensure(self, record: OperationRecord) -> Any:
        stored = self.svc.decls.api_bridges.get(record.target)
        if self._stored(record, stored):
            return await self.svc.bridge_view(record.target)
        before = "its previous declaration is still in force" if stored is not None else "it is not declared"
        return OperationError(CODES["ABORTED"], f"the agent stopped before bridge {record.target!r} was declared; {before} "
                                                "(nothing was redone; repeat EnsureBridge)")

    async def recover_bridge_delete(self, record: OperationRecord) -> Any:
        if record.target not in self.svc.decls.api_bridges:
            return None
        return OperationError(CODES["ABORTED"], f"the agent stopped before bridge {record.target!r} was deleted; it is still "
                                                "declared and is applied again at start (repeat DeleteBridge)")

    async def recover_pg_ensure(self, record: OperationRecord) -> Any:
        stored = self.svc.decls.api_port_groups.get(record.target)
        if self._stored(record, stored):
            return await self.svc.port_group_view(record.target)
        before = "its previous declaration is still in force" if stored is not None else "it is not declared"
        return OperationError(CODES["ABORTED"], f"the agent stopped before port group {record.target!r} was declared; "
                                                f"{before} (nothing was redone; repeat EnsurePortGroup)")

    async def recover_pg_delete(self, record: OperationRecord) -> Any:
        if record.target not in self.svc.decls.api_port_groups:
            return None
        return OperationError(CODES["ABORTED"], f"the agent stopped before port group {record.target!r} was deleted; it is "
                                                "still declared (repeat DeletePortGroup)")
