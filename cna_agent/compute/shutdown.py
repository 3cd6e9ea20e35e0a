"""A guest's graceful shutdown: the ACPI power button, pressed again every ACPI_RETRY_S, and the
guest agent's shutdown when the button is not honoured.

Why both: the power button is what every OS understands, but a guest still booting misses a
single press (nova's clean shutdown retries for the same reason), and some guests ignore it for
good (a Linux without acpid or logind's power-key handling, a Windows server set to do nothing on
the button, a desktop asking its user). A guest agent, when the VM has one that answers, asks the
OS itself (qemu-ga runs ``shutdown -P``), so such a guest still stops cleanly within the timeout
instead of being powered off. It is asked once, after ``[compute] shutdown_guest_agent_after_s``
of presses (or half the timeout when that is shorter); a guest already on its way down is not
harmed by it.
"""

from __future__ import annotations

import logging
import time
from typing import Awaitable, Callable

import libvirt

from cna_agent.hypervisor import Hypervisor

log = logging.getLogger(__name__)

ACPI_RETRY_S = 15.0
#: Presses alone for this long before the guest agent is asked as well.
GUEST_AGENT_AFTER_S = 20.0
#: How the guest was asked to stop, as the shutdown operation's metadata and log say it.
VIA_ACPI, VIA_GUEST_AGENT = "acpi", "guest-agent"


def _press(conn: libvirt.virConnect, uuid: str) -> None:
    dom = conn.lookupByUUIDString(uuid)
    try:
        if dom.state()[0] == libvirt.VIR_DOMAIN_PAUSED:
            dom.resume()  # a paused guest cannot see the power button
        dom.shutdownFlags(libvirt.VIR_DOMAIN_SHUTDOWN_ACPI_POWER_BTN)
    except libvirt.libvirtError:
        if dom.isActive():
            raise
        # it powered off between two presses: the caller's wait sees it stopped


def _ask_guest_agent(conn: libvirt.virConnect, uuid: str) -> bool:
    """True when the guest agent took the request (libvirt returns once qemu-ga answered)."""
    dom = conn.lookupByUUIDString(uuid)
    try:
        dom.shutdownFlags(libvirt.VIR_DOMAIN_SHUTDOWN_GUEST_AGENT)
        return True
    except libvirt.libvirtError as exc:
        log.info("event=vm.shutdown_guest_agent_refused vm=%s error=%r", uuid, exc.get_error_message())
        return False


async def graceful_stop(hv: Hypervisor, uuid: str, timeout: float, *, guest_agent: bool,
                        stopped: Callable[[float], Awaitable[bool]],
                        stage: Callable[[str], Awaitable[None]] | None = None,
                        agent_after_s: float = GUEST_AGENT_AFTER_S) -> str:
    """Ask the guest to stop until it does or ``timeout`` passes; return how it was asked last
    (VIA_ACPI or VIA_GUEST_AGENT) when it stopped, "" when it did not. ``stopped(seconds)``
    waits up to that long for the VM to be stopped; ``guest_agent``: the VM has the channel;
    ``stage(name)`` is told when the guest agent was asked ("guest-agent-shutdown")."""
    start = time.monotonic()
    deadline = start + timeout
    agent_at = start + min(agent_after_s, timeout / 2)
    via = VIA_ACPI
    asked_agent = not guest_agent
    while time.monotonic() < deadline:
        if not asked_agent and time.monotonic() >= agent_at:
            asked_agent = True
            if await hv.call(lambda c: _ask_guest_agent(c, uuid), timeout=15, what="guest agent shutdown"):
                via = VIA_GUEST_AGENT
                if stage is not None:
                    await stage("guest-agent-shutdown")
                log.info("event=vm.shutdown_via_guest_agent vm=%s after_s=%.0f", uuid, time.monotonic() - start)
        elif via == VIA_ACPI:
            await hv.call(lambda c: _press(c, uuid), timeout=30, what="ACPI power button")
        left = deadline - time.monotonic()
        step = ACPI_RETRY_S if asked_agent else max(0.0, min(ACPI_RETRY_S, agent_at - time.monotonic()))
        if await stopped(max(0.0, min(step, left))):
            return via
    return ""
