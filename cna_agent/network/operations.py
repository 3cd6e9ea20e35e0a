"""The journalled face of NetworkService: each change of a declaration runs as an operation
(AIP-151), idempotent by request id, after every check that can refuse it has passed (so a
bad request is answered at once and changes nothing). Results are plain views
(declarations.BridgeView / PortGroupView)."""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Any, Awaitable, Callable, Mapping

from cna_agent.errors import InvalidArgument
from cna_agent.network.model import BridgeDecl, PortGroupDecl
from cna_agent.network.service import NetworkService
from cna_agent.operations import OperationRunner


def declared(decl: BridgeDecl | PortGroupDecl) -> dict[str, str]:
    """The declaration an ensure is storing, as its operation's metadata: recovery compares it
    with what the declaration store holds after a crash (recovery.py)."""
    return {"decl": json.dumps(asdict(decl), sort_keys=True)}


class NetworkOperations:
    def __init__(self, service: NetworkService, runner: OperationRunner) -> None:
        self.svc = service
        self.runner = runner

    async def _submit(self, kind: str, target: str, work: Callable[[], Awaitable[Any]], *, request_id: str,
                      fingerprint: str, lock_key: str, wait: float = 30.0, metadata: Mapping[str, str] | None = None) -> Any:
        async def run(_op: Any) -> Any:
            return await work()

        return await self.runner.submit(kind, target, run, request_id=request_id, fingerprint=fingerprint,
                                        lock_key=lock_key, lock_timeout=30.0, wait=wait, metadata=metadata)

    async def ensure_bridge(self, decl: BridgeDecl, *, request_id: str = "", fingerprint: str = "") -> Any:
        decl = await self.svc.check_bridge(decl)

        async def work() -> Any:
            done, _changes = await self.svc.ensure_bridge(decl)
            return await self.svc.bridge_view(done.name)

        return await self._submit("network.bridge.ensure", decl.name, work, request_id=request_id,
                                  fingerprint=fingerprint, lock_key=f"net/bridge/{decl.name}", metadata=declared(decl))

    async def delete_bridge(self, name: str, *, request_id: str = "", fingerprint: str = "") -> Any:
        if not name:
            raise InvalidArgument("name", "is required")

        async def work() -> Any:
            await self.svc.delete_bridge(name)
            return None

        return await self._submit("network.bridge.delete", name, work, request_id=request_id,
                                  fingerprint=fingerprint, lock_key=f"net/bridge/{name}")

    async def ensure_port_group(self, pg: PortGroupDecl, *, request_id: str = "", fingerprint: str = "") -> Any:
        pg = await self.svc.check_port_group(pg)

        async def work() -> Any:
            done, _changes = await self.svc.ensure_port_group(pg)
            return await self.svc.port_group_view(done.name)

        return await self._submit("network.port_group.ensure", pg.name, work, request_id=request_id,
                                  fingerprint=fingerprint, lock_key=f"net/pg/{pg.name}", metadata=declared(pg))

    async def delete_port_group(self, name: str, *, request_id: str = "", fingerprint: str = "") -> Any:
        if not name:
            raise InvalidArgument("name", "is required")

        async def work() -> Any:
            await self.svc.delete_port_group(name)
            return None

        return await self._submit("network.port_group.delete", name, work, request_id=request_id,
                                  fingerprint=fingerprint, lock_key=f"net/pg/{name}")
