"""ConsoleSessions: a console our own closing session still holds is waited for, not refused;
one held by a session that stays is refused after the grace, naming force."""

from __future__ import annotations

import asyncio

import pytest

from cna_agent.compute.console import ConsoleSessions
from cna_agent.errors import FailedPrecondition


class Held:
    """Stands in for libvirt's one-reader rule: the console is busy while a holder is set."""

    def __init__(self) -> None:
        self.holder: "Session | None" = None


class Session:
    def __init__(self, console: Held, uuid: str = "u1") -> None:
        self.console = console
        self.uuid = uuid
        self.name = "vm1"
        self.released = asyncio.Event()

    async def open(self, *, force: bool = False) -> None:
        if self.console.holder is not None and not force:
            raise FailedPrecondition("in use", field="force")
        self.console.holder = self

    async def release_later(self, delay: float) -> None:
        await asyncio.sleep(delay)
        self.console.holder = None
        self.released.set()


def test_a_session_on_its_way_out_is_waited_for() -> None:
    async def go() -> None:
        console, sessions = Held(), ConsoleSessions(grace=2.0)
        first = await sessions.open(Session(console))
        assert sessions.held("u1") == 1
        asyncio.ensure_future(first.release_later(0.2))
        second = await sessions.open(Session(console))
        assert console.holder is second
        await asyncio.sleep(0)
        assert sessions.held("u1") == 1

    asyncio.run(go())


def test_a_session_that_stays_is_refused_after_the_grace() -> None:
    async def go() -> None:
        console, sessions = Held(), ConsoleSessions(grace=0.3)
        first = await sessions.open(Session(console))
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        with pytest.raises(FailedPrecondition, match="force"):
            await sessions.open(Session(console))
        assert 0.25 < loop.time() - t0 < 2
        assert console.holder is first

    asyncio.run(go())


def test_someone_elses_console_is_refused_at_once() -> None:
    async def go() -> None:
        console, sessions = Held(), ConsoleSessions(grace=5.0)
        console.holder = Session(console)  # e.g. virsh console, not this agent
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        with pytest.raises(FailedPrecondition):
            await sessions.open(Session(console))
        assert loop.time() - t0 < 1

    asyncio.run(go())
