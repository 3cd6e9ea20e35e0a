"""compute/console_tickets.py's one-time rule, against a stand-in libvirt domain: a VNC
client's authentication burns a live ticket (a fresh secret, expired now, nothing published
carries it), never the spec's static password, nor a newer ticket issued after the client got
in; a second client that got in before the burn is audited as ``raced``. The real VNC server's
answers are the e2e test's (tests/e2e/test_console_ticket.py)."""

from __future__ import annotations

import asyncio
import calendar
import time
from dataclasses import dataclass, field
from types import SimpleNamespace
from xml.etree import ElementTree as ET

import libvirt

from cna_agent.compute.console_tickets import BURNED, NO_TICKET, RACED, SUPERSEDED, ConsoleTickets
from cna_agent.compute.events import GraphicsClient, _address
from cna_agent.compute.inventory import ConsoleInfo

UUID = "11111111-2222-3333-4444-555555555555"
XML = ("<domain type='qemu'><name>g</name><uuid>" + UUID + "</uuid><devices>"
       "<graphics type='vnc' port='5900' autoport='yes' listen='127.0.0.1'{pw}>"
       "<listen type='address' address='127.0.0.1'/></graphics></devices></domain>")


@dataclass
class FakeDom:
    live_pw: str | None
    stored_pw: str | None
    persistent: bool = True
    updates: list[ET.Element] = field(default_factory=list)

    def XMLDesc(self, flags: int) -> str:
        pw = self.stored_pw if flags & libvirt.VIR_DOMAIN_XML_INACTIVE else self.live_pw
        return XML.format(pw="" if pw is None else f" passwd='{pw}'")

    def isPersistent(self) -> bool:
        return self.persistent

    def updateDeviceFlags(self, xml: str, flags: int) -> None:
        assert flags == libvirt.VIR_DOMAIN_AFFECT_LIVE
        el = ET.fromstring(xml)
        self.updates.append(el)
        self.live_pw = el.get("passwd")


class FakeHv:
    def __init__(self, dom: FakeDom) -> None:
        self.conn = SimpleNamespace(lookupByUUIDString=lambda uuid: dom)

    async def call(self, fn, *, timeout=None, what=""):
        return fn(self.conn)


class FakeInventory:
    def __init__(self, managed: bool = True) -> None:
        self.managed = managed

    async def lookup_uuid(self, ref: str):
        return UUID, "g"

    async def console(self, uuid: str) -> ConsoleInfo:
        return ConsoleInfo(type="vnc", host="127.0.0.1", port=5900)

    async def definition(self, uuid: str):
        return SimpleNamespace(managed=self.managed)


class FakeEvents:
    def __init__(self) -> None:
        self.published: list[tuple[str, dict]] = []

    async def publish(self, type: str, **fields: object) -> None:
        self.published.append((type, fields))


def _tickets(dom: FakeDom, *, managed: bool = True) -> tuple[ConsoleTickets, FakeEvents]:
    events = FakeEvents()
    return ConsoleTickets(FakeHv(dom), FakeInventory(managed), events), events  # type: ignore[arg-type]


def _client(when: float, auth: str = "vnc") -> GraphicsClient:
    return GraphicsClient(UUID, "g", "127.0.0.1:40000", auth, when)


def test_the_first_client_burns_the_ticket_and_a_racing_second_is_audited() -> None:
    dom = FakeDom(live_pw="pw123", stored_pw="pw123")
    tickets, events = _tickets(dom)

    async def scenario():
        info = await tickets.issue(UUID, 30)
        assert dom.live_pw == info.password != "pw123"
        tickets.client_authenticated(_client(time.time()))  # as events.py calls it, on the loop
        await asyncio.gather(*tickets._tasks)
        burned_to = dom.live_pw
        second = await tickets.used(_client(time.time()))
        return info.password, burned_to, second

    ticket, burned_to, second = asyncio.run(scenario())
    assert burned_to not in (ticket, "pw123") and len(burned_to) == 8
    # expired at once: passwdValidTo is now (to the second), not the ticket's 30 s
    valid_to = calendar.timegm(time.strptime(dom.updates[-1].get("passwdValidTo"), "%Y-%m-%dT%H:%M:%S"))
    assert valid_to <= time.time()
    assert second == RACED and len(dom.updates) == 2  # the race costs no further libvirt call
    used = [f for t, f in events.published if t == "console.ticket_used"]
    assert [u["attributes"]["outcome"] for u in used] == [BURNED]
    assert used[0]["attributes"]["client"] == "127.0.0.1:40000"
    assert not any(s in repr(events.published) for s in (ticket, burned_to))


def test_the_specs_static_password_and_unmanaged_vms_are_left_alone() -> None:
    dom = FakeDom(live_pw="pw123", stored_pw="pw123")
    tickets, _ = _tickets(dom)
    assert asyncio.run(tickets.used(_client(time.time()))) == NO_TICKET
    assert asyncio.run(tickets.used(_client(time.time(), auth="none"))) == NO_TICKET
    ticketed = FakeDom(live_pw="Tk7pQ2xZ", stored_pw="pw123")
    unmanaged, _ = _tickets(ticketed, managed=False)
    assert asyncio.run(unmanaged.used(_client(time.time()))) == NO_TICKET
    assert not dom.updates and not ticketed.updates


def test_a_ticket_issued_before_an_agent_restart_is_still_burned() -> None:
    # nothing in memory: the live password differs from the definition's, so it is a ticket
    dom = FakeDom(live_pw="Tk7pQ2xZ", stored_pw="pw123")
    tickets, _ = _tickets(dom)
    assert asyncio.run(tickets.used(_client(time.time()))) == BURNED
    assert dom.live_pw != "Tk7pQ2xZ"


def test_a_client_that_authenticated_before_a_newer_ticket_does_not_burn_it() -> None:
    dom = FakeDom(live_pw="pw123", stored_pw="pw123")
    tickets, _ = _tickets(dom)

    async def scenario():
        before = time.time() - 0.5  # the event arrived before the newer ticket's update started
        newer = await tickets.issue(UUID, 30)
        return newer.password, await tickets.used(_client(before))

    newer, outcome = asyncio.run(scenario())
    assert outcome == SUPERSEDED and dom.live_pw == newer


def test_a_transient_domain_is_burned_only_for_a_ticket_this_agent_issued() -> None:
    dom = FakeDom(live_pw="static9", stored_pw=None, persistent=False)
    tickets, _ = _tickets(dom)
    assert asyncio.run(tickets.used(_client(time.time()))) == NO_TICKET

    async def issued_then_used():
        await tickets.issue(UUID, 30)
        return await tickets.used(_client(time.time()))

    assert asyncio.run(issued_then_used()) == BURNED


def test_graphics_addresses_read_as_host_port() -> None:
    assert _address({"family": libvirt.VIR_DOMAIN_EVENT_GRAPHICS_ADDRESS_IPV4, "node": "10.0.0.5", "service": "5901"}) == "10.0.0.5:5901"
    assert _address({"family": libvirt.VIR_DOMAIN_EVENT_GRAPHICS_ADDRESS_IPV6, "node": "::1", "service": "40000"}) == "[::1]:40000"
    assert _address(None) == ""
