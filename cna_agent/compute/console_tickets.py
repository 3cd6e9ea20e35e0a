"""Console tickets: GetConsole hands out a fresh VNC/SPICE password that expires, never the
static password of the spec; a VNC ticket works for one client only.

Why: the spec's console password is long-lived, stored in the definition and known to whoever
made the VM; a manager that hands consoles to users (FusionCompute's VNC tickets, oVirt's
setTicket) wants each grant to be short-lived. libvirt carries it as the live graphics device's
``passwd`` and ``passwdValidTo`` (QEMU's ``expire_password``): after that instant no new client
authenticates with it; a client already connected stays connected. Every GetConsole replaces
the previous ticket, so at most one is valid at a time; the persistent definition keeps the
spec's password (what QEMU starts with), and GetVm no longer reports any password.

One-time (VNC): QEMU tells libvirt when a VNC client has authenticated and sent its
ClientInit (VNC_INITIALIZED -> libvirt's GRAPHICS event, phase INITIALIZE; events.py hands it
here). The agent then replaces the live password with a fresh random secret it never returns
nor stores, expired at once (passwdValidTo = now). QEMU keeps connected VNC clients when the
password changes (VNC accepts only ``connected=keep``, QEMU's default), so the client that used
the ticket keeps its session while any later client is refused. Only a ticket is burned: a live
password equal to the persistent one is the spec's static password and is left alone, and so
are VMs the agent did not create. That test reads libvirt, not the agent's memory, so a ticket
issued before an agent restart is still burned on its first use.

The race that remains: the burn runs after the event reaches the agent, so a second client
that authenticates in that window (the first client's ClientInit, libvirt's event, one
updateDeviceFlags: milliseconds) gets in with the same ticket. Acceptable because that client
had to hold the ticket, whose validity is short anyway; it is not silent either: its own
INITIALIZE arrives after the burn and is audited as ``console.ticket_used`` with outcome
``raced`` (severity warning). The other order is decided for refusal: a client that
authenticated just before a *newer* GetConsole is not allowed to burn the newer ticket (outcome
``superseded``, compared by time: the event's arrival against the start of the newer ticket's
update), and when the times cannot tell, the ticket is burned (its holder asks again). SPICE
tickets are not made one-time: each SPICE channel (main, display, inputs, ...) authenticates
with the ticket on its own, so burning it after the first would break the session.

VNC's authentication uses at most 8 characters of a password (it is a DES key), so a VNC
ticket is 8 random characters from 62 (about 2^47); a SPICE ticket is 20. Tickets are audited
as ``console.ticket_issued`` (the VM and the expiry) and ``console.ticket_used`` (the client's
address) events, never with the secret.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import string
import time
from dataclasses import dataclass, field, replace
from typing import Callable

import libvirt

from cna_agent.compute import domxml as dx
from cna_agent.compute import state as st
from cna_agent.compute.events import GraphicsClient
from cna_agent.compute.inventory import ConsoleInfo, VmInventory
from cna_agent.errors import FailedPrecondition, InvalidArgument
from cna_agent.hypervisor import Hypervisor
from cna_agent.state.eventlog import EventHub
from cna_agent.tasks import cancel_and_wait

log = logging.getLogger(__name__)

DEFAULT_VALIDITY_S = 60
MAX_VALIDITY_S = 86400
ALPHABET = string.ascii_letters + string.digits

#: What became of a ticket when a client authenticated (console.ticket_used's ``outcome``).
BURNED, RACED, SUPERSEDED = "burned", "raced", "superseded"
#: The burn found no ticket live: the spec's static password, no password, or no VNC device.
NO_TICKET = "no_ticket"


def new_ticket(kind: str) -> str:
    return "".join(secrets.choice(ALPHABET) for _ in range(8 if kind == "vnc" else 20))


def valid_to(when: float) -> str:
    """libvirt's passwdValidTo: UTC, to the second."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(when))


@dataclass
class _VmTickets:
    """What this process knows of one running VM's tickets (forgotten when it stops)."""
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    #: clock() just before the last ticket's update started (None: none issued by this process).
    issued_at: float | None = None
    #: Set when the last ticket was burned; cleared by the next issue.
    burned: bool = False


def _vnc(domain: dx.Domain) -> dx.Graphics | None:
    return next((g for g in (domain.devices.graphics if domain.devices else []) if g.type == "vnc"), None)


class ConsoleTickets:
    def __init__(self, hv: Hypervisor, inventory: VmInventory, events: EventHub, *,
                 clock: Callable[[], float] = time.time) -> None:
        self.hv = hv
        self.inventory = inventory
        self.events = events
        #: time.time() or a stand-in; compared with GraphicsClient.time (also time.time()).
        self.clock = clock
        self._vms: dict[str, _VmTickets] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def _vm(self, uuid: str) -> _VmTickets:
        return self._vms.setdefault(uuid, _VmTickets())

    async def issue(self, ref: str, validity_s: int = 0) -> ConsoleInfo:
        """The VM's graphical console with a new ticket valid ``validity_s`` (default 60 s)."""
        if not 0 <= validity_s <= MAX_VALIDITY_S:
            raise InvalidArgument("ticket_validity_s", f"{validity_s} is not in 0..{MAX_VALIDITY_S} (0 = {DEFAULT_VALIDITY_S} s)")
        uuid, name = await self.inventory.lookup_uuid(ref)
        info = await self.inventory.console(uuid)
        if info.type not in ("vnc", "spice"):
            raise FailedPrecondition(f"vm {name!r} has no graphical console (spec.console.type); use the serial console",
                                     field="vm")
        ticket = new_ticket(info.type)

        def apply(conn: libvirt.virConnect) -> None:
            dom = conn.lookupByUUIDString(uuid)
            live = dx.Domain.from_xml(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_SECURE))
            graphics = next((g for g in (live.devices.graphics if live.devices else []) if g.type == info.type), None)
            if graphics is None:
                raise FailedPrecondition(f"vm {name!r} runs without its {info.type} console", field="vm")
            graphics.passwd = ticket
            graphics.passwd_valid_to = valid_to(until)
            dom.updateDeviceFlags(graphics.to_xml(), libvirt.VIR_DOMAIN_AFFECT_LIVE)

        vm = self._vm(uuid)
        async with vm.lock:  # against a burn of the previous ticket running meanwhile
            started = self.clock()
            until = started + (validity_s or DEFAULT_VALIDITY_S)
            await self.hv.call(apply, timeout=30)
            vm.issued_at, vm.burned = started, False
        await self.events.publish("console.ticket_issued", resource_kind="vm", resource_id=uuid, resource_name=name,
                                  message=f"{info.type} console ticket for {name}, valid until {valid_to(until)}Z",
                                  attributes={"type": info.type, "expires": f"{until:.0f}"})
        return replace(info, password=ticket, password_expires=until)

    # -- one-time use --------------------------------------------------------------------------

    def client_authenticated(self, client: GraphicsClient) -> None:
        """events.py's ``on_graphics_client``: runs on the loop, so the burn (a libvirt call)
        goes to a task and the event consumer moves on."""
        task = asyncio.get_running_loop().create_task(self._used(client), name=f"console-ticket-{client.uuid[:8]}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _used(self, client: GraphicsClient) -> None:
        try:
            outcome = await self.used(client)
        except asyncio.CancelledError:
            raise
        except Exception:
            # The VM stopped meanwhile, or libvirt is away: the ticket still expires on its own.
            log.exception("event=console.ticket_burn_failed vm=%s", client.uuid)
            return
        if outcome == NO_TICKET:
            # the spec's static password (or none): nothing to burn, but an access worth a line
            log.info("event=console.client_authenticated vm=%s client=%s auth=%s outcome=no_ticket", client.uuid,
                     client.remote or "-", client.auth_scheme or "-")
            return
        words = {BURNED: "it no longer works",
                 RACED: "it was already burned: this client authenticated before the burn took effect",
                 SUPERSEDED: "a newer ticket was issued since, which stays valid"}
        await self.events.publish(
            "console.ticket_used", severity="warning" if outcome == RACED else "info",
            resource_kind="vm", resource_id=client.uuid, resource_name=client.name,
            message=f"vnc console ticket for {client.name} used by {client.remote or 'an unknown client'}; {words[outcome]}",
            attributes={"type": "vnc", "client": client.remote, "auth_scheme": client.auth_scheme, "outcome": outcome})

    async def used(self, client: GraphicsClient) -> str:
        """A VNC client authenticated: burn the ticket it used, if it was one; the outcome."""
        if client.auth_scheme == "none":  # no password was asked, so none was used
            return NO_TICKET
        if not (await self.inventory.definition(client.uuid)).managed:
            return NO_TICKET  # the agent leaves domains it did not create alone
        vm = self._vm(client.uuid)
        async with vm.lock:
            if vm.issued_at is not None and vm.issued_at > client.time:
                return SUPERSEDED
            if vm.burned:
                return RACED
            secret = new_ticket("vnc")  # nobody ever learns it: not returned, stored, logged
            expired = valid_to(self.clock())
            ticketed_here = vm.issued_at is not None

            def burn(conn: libvirt.virConnect) -> bool:
                dom = conn.lookupByUUIDString(client.uuid)
                graphics = _vnc(dx.Domain.from_xml(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_SECURE)))
                if graphics is None or not graphics.passwd:
                    return False
                if dom.isPersistent():
                    stored = _vnc(dx.Domain.from_xml(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_SECURE | libvirt.VIR_DOMAIN_XML_INACTIVE)))
                    if stored is not None and stored.passwd == graphics.passwd:
                        return False  # the spec's static password, not a ticket
                elif not ticketed_here:
                    return False
                graphics.passwd, graphics.passwd_valid_to = secret, expired
                dom.updateDeviceFlags(graphics.to_xml(), libvirt.VIR_DOMAIN_AFFECT_LIVE)
                return True

            if not await self.hv.call(burn, timeout=30, what="burning a used console ticket"):
                return NO_TICKET
            vm.burned = True
        log.info("event=console.ticket_burned vm=%s client=%s", client.uuid, client.remote)
        return BURNED

    def vm_state_changed(self, uuid: str, state: str) -> None:
        """A VM that stops loses its live password with its QEMU: nothing to remember."""
        if state not in (st.RUNNING, st.PAUSED):
            self._vms.pop(uuid, None)

    async def stop(self) -> None:
        for task in list(self._tasks):
            await cancel_and_wait(task)
