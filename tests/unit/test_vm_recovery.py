"""Recovery of cut-short vm.create/start/shutdown/delete: decided from libvirt's state (libvirt's
test:///default driver, a real libvirt driver with an in-memory host), never redone. An effect
that is there ends with the operation's result; one that is not ends ABORTED saying what libvirt
shows (partial effects are stated)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import libvirt

from cna_agent.compute.inventory import VmInfo, VmInventory
from cna_agent.compute.recovery import VmRecovery
from cna_agent.errors import CODES
from cna_agent.operations import ResourceLocks
from cna_agent.state.journal import OperationError
from support.libvirt import ConnHypervisor


def _service(conn) -> VmRecovery:
    hv = ConnHypervisor(conn)
    return VmRecovery(hv, VmInventory(hv, ResourceLocks()))  # type: ignore[arg-type]


def test_recovery_follows_libvirt_state() -> None:
    conn = libvirt.open("test:///default")
    dom = conn.lookupByName("test")  # the test driver's running domain
    svc = _service(conn)
    rec = SimpleNamespace(target=dom.UUIDString(), metadata={})
    with_start = SimpleNamespace(target=dom.UUIDString(), metadata={"start": "true"})
    gone = SimpleNamespace(target="00000000-0000-4000-8000-000000000001", metadata={})

    async def run():
        started = await svc.recover_start(rec)  # running: the start happened, and here is the VM
        assert isinstance(started, VmInfo) and (started.uuid, started.state) == (dom.UUIDString(), "running")
        assert isinstance(await svc.recover_create(rec), VmInfo)
        err = await svc.recover_shutdown(rec)
        assert isinstance(err, OperationError) and err.code == CODES["ABORTED"]
        assert "libvirt shows the VM running" in err.message and "nothing was redone" in err.message
        err = await svc.recover_delete(rec)
        assert isinstance(err, OperationError) and "libvirt shows the VM running" in err.message
        dom.destroy()
        stopped = await svc.recover_shutdown(rec)
        assert isinstance(stopped, VmInfo) and stopped.state == "stopped"
        # a create-and-start cut short after the define: made, not started, and said so
        err = await svc.recover_create(with_start)
        assert isinstance(err, OperationError) and "was defined and is left stopped" in err.message
        err = await svc.recover_start(rec)
        assert isinstance(err, OperationError) and "defined and stopped" in err.message
        # a forced delete cut short after the power-off: the partial effect is said
        err = await svc.recover_delete(rec)
        assert isinstance(err, OperationError) and "defined and stopped" in err.message
        assert await svc.recover_delete(gone) is None  # deleted: nothing to return
        err = await svc.recover_create(gone)
        assert isinstance(err, OperationError) and "not defined" in err.message

    asyncio.run(run())
