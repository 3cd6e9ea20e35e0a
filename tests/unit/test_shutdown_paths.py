"""compute/shutdown.py: the ACPI button pressed until the timeout, and the guest agent asked once
when the presses are not honoured (a guest that ignores the button still stops cleanly).

The domain here is a stand-in that records what it was asked (libvirt's test driver stops a
domain on any shutdown call, so it cannot ignore a button); tests/e2e/test_guest_agent.py shows
both paths on the real Debian guest.
"""

from __future__ import annotations

import asyncio
import time

import libvirt
import pytest

from cna_agent.compute import shutdown as sd


class _Dom:
    def __init__(self, honours: set[int], agent_answers: bool = True) -> None:
        self.asked: list[tuple[float, int]] = []
        self.honours, self.agent_answers = honours, agent_answers
        self.t0 = time.monotonic()
        self.down = False

    def state(self):
        return (libvirt.VIR_DOMAIN_SHUTOFF if self.down else libvirt.VIR_DOMAIN_RUNNING, 0)

    def isActive(self) -> bool:  # noqa: N802
        return not self.down

    def shutdownFlags(self, flags: int) -> None:  # noqa: N802
        self.asked.append((time.monotonic() - self.t0, flags))
        if flags == libvirt.VIR_DOMAIN_SHUTDOWN_GUEST_AGENT and not self.agent_answers:
            raise libvirt.libvirtError("Guest agent is not responding: QEMU guest agent is not connected")
        if flags in self.honours:
            self.down = True


class _Hv:
    def __init__(self, dom: _Dom) -> None:
        self.dom = dom

    async def call(self, fn, *, timeout=None, what="", pool=None, outlast=0.0):
        conn = type("C", (), {"lookupByUUIDString": lambda _s, _u: self.dom})()
        return fn(conn)


def _run(dom: _Dom, timeout: float, guest_agent: bool) -> str:
    async def stopped(seconds: float) -> bool:
        end = time.monotonic() + seconds
        while time.monotonic() < end and not dom.down:
            await asyncio.sleep(0.01)
        return dom.down

    return asyncio.run(sd.graceful_stop(_Hv(dom), "u", timeout, guest_agent=guest_agent, stopped=stopped,
                                        agent_after_s=0.5))


@pytest.fixture(autouse=True)
def _fast(monkeypatch):
    monkeypatch.setattr(sd, "ACPI_RETRY_S", 0.2)


ACPI, AGENT = libvirt.VIR_DOMAIN_SHUTDOWN_ACPI_POWER_BTN, libvirt.VIR_DOMAIN_SHUTDOWN_GUEST_AGENT


def test_a_guest_that_honours_the_button_is_never_asked_through_its_agent() -> None:
    dom = _Dom(honours={ACPI})
    assert _run(dom, 5, guest_agent=True) == sd.VIA_ACPI
    assert [f for _, f in dom.asked] == [ACPI]


def test_a_guest_that_ignores_the_button_is_stopped_by_its_agent_after_the_presses() -> None:
    dom = _Dom(honours={AGENT})
    assert _run(dom, 5, guest_agent=True) == sd.VIA_GUEST_AGENT
    flags = [f for _, f in dom.asked]
    assert flags[-1] == AGENT and flags.count(AGENT) == 1 and flags.count(ACPI) >= 2  # pressed, and retried
    assert dom.asked[-1][0] >= 0.5  # the agent only after agent_after_s of presses


def test_without_a_channel_or_an_answering_agent_the_button_is_pressed_until_the_timeout() -> None:
    dom = _Dom(honours=set())
    assert _run(dom, 1.0, guest_agent=False) == ""
    assert {f for _, f in dom.asked} == {ACPI} and len(dom.asked) >= 4
    dom = _Dom(honours=set(), agent_answers=False)
    assert _run(dom, 1.0, guest_agent=True) == ""
    flags = [f for _, f in dom.asked]
    assert flags.count(AGENT) == 1 and flags[-1] == ACPI  # refused: the presses go on
