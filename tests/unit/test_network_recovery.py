"""Recovery of cut-short network ensures and deletes (network/recovery.py): an ensure succeeded
iff the declaration store (reloaded from disk, as after a restart) holds exactly the declaration
the request carried; a delete iff the name is no longer declared."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from types import SimpleNamespace

from cna_agent.errors import CODES
from cna_agent.network.declarations import Declarations
from cna_agent.network.model import BridgeDecl, PortGroupDecl
from cna_agent.network.operations import declared
from cna_agent.network.recovery import NetworkRecovery
from cna_agent.state.journal import OperationError


def _service(state_dir: str) -> SimpleNamespace:
    decls = Declarations(state_dir)  # read from the file, as a restarted agent does

    async def bridge_view(name: str):
        return ("bridge", decls.bridges[name])

    async def port_group_view(name: str):
        return ("pg", decls.port_groups[name])

    return SimpleNamespace(decls=decls, bridge_view=bridge_view, port_group_view=port_group_view)


def test_an_ensure_succeeded_only_with_the_requested_declaration_stored(tmp_path) -> None:
    old, new = BridgeDecl("br-f", type="linux", mtu=1500), BridgeDecl("br-f", type="linux", mtu=9000)
    pg = PortGroupDecl("pg-f", bridge="br-f", vlan=12)
    ensure_new = SimpleNamespace(target="br-f", metadata=declared(new))
    ensure_pg = SimpleNamespace(target="pg-f", metadata=declared(pg))

    async def run() -> None:
        first = _service(str(tmp_path))
        first.decls.api_bridges["br-f"] = old  # the crash came before the new one was stored
        first.decls.save()
        rec = NetworkRecovery(_service(str(tmp_path)))  # type: ignore[arg-type]
        err = await rec.recover_bridge_ensure(ensure_new)
        assert isinstance(err, OperationError) and err.code == CODES["ABORTED"]
        assert "previous declaration is still in force" in err.message
        err = await rec.recover_pg_ensure(ensure_pg)
        assert isinstance(err, OperationError) and "it is not declared" in err.message

        first.decls.api_bridges["br-f"] = new  # stored before the crash: the ensure happened
        first.decls.api_port_groups["pg-f"] = pg
        first.decls.save()
        rec = NetworkRecovery(_service(str(tmp_path)))  # type: ignore[arg-type]
        assert await rec.recover_bridge_ensure(ensure_new) == ("bridge", new)
        assert await rec.recover_pg_ensure(ensure_pg) == ("pg", pg)
        other = SimpleNamespace(target="pg-f", metadata=declared(replace(pg, vlan=13)))
        assert isinstance(await rec.recover_pg_ensure(other), OperationError)

        err = await rec.recover_pg_delete(SimpleNamespace(target="pg-f", metadata={}))
        assert isinstance(err, OperationError) and "still declared" in err.message
        assert await rec.recover_bridge_delete(SimpleNamespace(target="br-gone", metadata={})) is None

    asyncio.run(run())
