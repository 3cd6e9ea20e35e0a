"""Console tickets: GetConsole hands out a fresh VNC/SPICE password that expires, never the
static password of the spec.

Why: the spec's console password is long-lived, stored in the definition and known to whoever
made the VM; a manager that hands consoles to users (FusionCompute's VNC tickets, oVirt's
setTicket) wants each grant to be short-lived. libvirt carries it as the live graphics device's
``passwd`` and ``passwdValidTo`` (QEMU's ``expire_password``): after that instant no new client
authenticates with it; a client already connected stays connected. Every GetConsole replaces
the previous ticket, so at most one is valid at a time; the persistent definition keeps the
spec's password (what QEMU starts with), and GetVm no longer reports any password.

VNC's authentication uses at most 8 characters of a password (it is a DES key), so a VNC
ticket is 8 random characters from 62 (about 2^47); a SPICE ticket is 20. Tickets are audited
as ``console.ticket_issued`` events with the VM and the expiry, never the secret.
"""

from __future__ import annotations

import secrets
import string
import time
from dataclasses import replace
from typing import Callable

import libvirt

from cna_agent.compute import domxml as dx
from cna_agent.compute.inventory import ConsoleInfo, VmInventory
from cna_agent.errors import FailedPrecondition, InvalidArgument
from cna_agent.hypervisor import Hypervisor
from cna_agent.state.eventlog import EventHub

DEFAULT_VALIDITY_S = 60
MAX_VALIDITY_S = 86400
ALPHABET = string.ascii_letters + string.digits


def new_ticket(kind: str) -> str:
    return "".join(secrets.choice(ALPHABET) for _ in range(8 if kind == "vnc" else 20))


def valid_to(when: float) -> str:
    """libvirt's passwdValidTo: UTC, to the second."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(when))


class ConsoleTickets:
    def __init__(self, hv: Hypervisor, inventory: VmInventory, events: EventHub, *,
                 clock: Callable[[], float] = time.time) -> None:
        self.hv = hv
        self.inventory = inventory
        self.events = events
        self.clock = clock

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
        until = self.clock() + (validity_s or DEFAULT_VALIDITY_S)

        def apply(conn: libvirt.virConnect) -> None:
            dom = conn.lookupByUUIDString(uuid)
            live = dx.Domain.from_xml(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_SECURE))
            graphics = next((g for g in (live.devices.graphics if live.devices else []) if g.type == info.type), None)
            if graphics is None:
                raise FailedPrecondition(f"vm {name!r} runs without its {info.type} console", field="vm")
            graphics.passwd = ticket
            graphics.passwd_valid_to = valid_to(until)
            dom.updateDeviceFlags(graphics.to_xml(), libvirt.VIR_DOMAIN_AFFECT_LIVE)

        await self.hv.call(apply, timeout=30)
        await self.events.publish("console.ticket_issued", resource_kind="vm", resource_id=uuid, resource_name=name,
                                  message=f"{info.type} console ticket for {name}, valid until {valid_to(until)}Z",
                                  attributes={"type": info.type, "expires": f"{until:.0f}"})
        return replace(info, password=ticket, password_expires=until)
