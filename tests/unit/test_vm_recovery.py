"""Recovery of cut-short vm.start/shutdown/delete: decided from libvirt's state (libvirt's
test:///default driver, a real libvirt driver with an in-memory host), never redone."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import libvirt

from cna_agent.compute.recovery import VmRecovery


class _Hv:
    def __init__(self, conn: libvirt.virConnect) -> None:
        self.conn = conn

    async def call(self, fn, timeout=None):
        return fn(self.conn)


def _service(conn) -> VmRecovery:
    return VmRecovery(_Hv(conn))  # type: ignore[arg-type]


def test_recovery_follows_libvirt_state() -> None:
    conn = libvirt.open("test:///default")
    dom = conn.lookupByName("test")  # the test driver's running domain
    svc = _service(conn)
    rec = SimpleNamespace(target=dom.UUIDString())
    gone = SimpleNamespace(target="00000000-0000-4000-8000-000000000001")

    async def run():
        assert await svc.recover_start(rec) is None  # running: the start happened
        err = await svc.recover_shutdown(rec)
        assert err is not None and "did not happen" in err.message
        assert (await svc.recover_delete(rec)) is not None
        dom.destroy()
        assert await svc.recover_shutdown(rec) is None
        assert (await svc.recover_start(rec)) is not None
        assert await svc.recover_delete(gone) is None

    asyncio.run(run())
