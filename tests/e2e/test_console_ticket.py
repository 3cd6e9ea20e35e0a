"""Console tickets end to end, judged by a real VNC handshake: the agent's GetConsole ticket
opens QEMU's VNC server once, not for a second client, and not after its expiry.

The judge is outside the agent: QEMU's own VNC server answering an RFB client
(tests/support/vnc_client.py: version, VNC Authentication's DES challenge, ServerInit) and
libvirt's live XML; the agent's events and log are then checked for the secrets. Run on the
embedded driver and on qemu:///system (``libvirt_mode``). The guest need not have booted:
QEMU serves VNC from its start.
"""

from __future__ import annotations

import calendar
import os
import time

import pytest

from cna_agent.api import pb
from support.guests import guest_spec
from support.libvirt import live_vnc
from support.operations import ok
from support.vnc_client import VncAuthFailed, handshake
from support.waiting import wait_for

vm = pb.vm_pb2
ev = pb.events_pb2
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the embedded QEMU driver here needs root")


def _events(ch, uuid: str, kind: str) -> list:
    return list(pb.events_pb2_grpc.EventServiceStub(ch).ListEvents(
        ev.ListEventsRequest(types=[kind], resource_id=uuid), timeout=10).events)


def test_a_vnc_ticket_opens_one_session_and_none_after_its_expiry(vm_agent_factory, libvirt_mode) -> None:
    agent = vm_agent_factory(mode=libvirt_mode)
    with agent.channel() as ch:
        stub = pb.vm_pb2_grpc.VmServiceStub(ch)
        created = ok(ch, stub.CreateVm(vm.CreateVmRequest(spec=guest_spec("x86_64", "ticket-vm"), start=True), timeout=60),
                     into=vm.Vm())
        uuid = created.uuid

        # the spec's static password is not a ticket: clients using it leave it working
        listed = stub.GetVm(vm.GetVmRequest(vm=uuid), timeout=10).status.console
        # (each login's event is waited for: a late one would meet the ticket below, and the
        # agent burns a ticket when the times cannot tell which password a client used)
        for logins in (1, 2):
            handshake(listed.host, listed.port, "pw123").close()
            wait_for(lambda: agent.log_text().count("event=console.client_authenticated") >= logins, 30,
                     f"the agent's decision on static-password login {logins} (nothing to burn)")

        first = stub.GetConsole(vm.GetConsoleRequest(vm=uuid, ticket_validity_s=30), timeout=10)
        host, port, ticket = first.host, first.port, first.password
        assert first.type == vm.CONSOLE_TYPE_VNC and len(ticket) == 8

        # the ticket opens a session: SecurityResult OK, then QEMU's ServerInit
        session = handshake(host, port, ticket)
        assert session.server_init.width > 0 and session.server_init.height > 0
        assert session.server_init.name.startswith("QEMU")
        used = wait_for(lambda: _events(ch, uuid, "console.ticket_used"), 10, "console.ticket_used after the first login")
        assert used[0].attributes["outcome"] == "burned" and used[0].attributes["client"].startswith("127.0.0.1:")
        # libvirt's live password is no longer the ticket, and it has expired
        graphics = live_vnc(agent, libvirt_mode, "ticket-vm")
        assert graphics.get("passwd") not in (ticket, "pw123", None)
        assert calendar.timegm(time.strptime(graphics.get("passwdValidTo"), "%Y-%m-%dT%H:%M:%S")) <= time.time()

        # a second client with the same ticket is refused ...
        with pytest.raises(VncAuthFailed):
            handshake(host, port, ticket)
        # ... while the first keeps its session (QEMU keeps VNC clients on a password change)
        assert session.framebuffer_update() >= 1
        session.close()

        # a ticket is refused once it has expired (libvirt's passwdValidTo -> QEMU's expire_password)
        short = stub.GetConsole(vm.GetConsoleRequest(vm=uuid, ticket_validity_s=2), timeout=10)
        assert short.password not in (ticket, graphics.get("passwd"))
        while time.time() < short.password_expire_time.seconds + 1.5:
            time.sleep(0.2)
        with pytest.raises(VncAuthFailed):
            handshake(host, port, short.password)

        # control: a fresh ticket works again, so the refusals above were the ticket's, not the server's
        fresh = stub.GetConsole(vm.GetConsoleRequest(vm=uuid), timeout=10)
        with handshake(host, port, fresh.password) as again:
            assert again.server_init.width == session.server_init.width
        wait_for(lambda: len(_events(ch, uuid, "console.ticket_used")) == 2, 10, "console.ticket_used after the fresh login")

        # audited without the secrets: three tickets issued, two used (the refused clients and
        # the static password's used none)
        issued, used = _events(ch, uuid, "console.ticket_issued"), _events(ch, uuid, "console.ticket_used")
        assert len(issued) == 3 and [u.attributes["outcome"] for u in used] == ["burned", "burned"]
        secrets = (ticket, short.password, fresh.password, graphics.get("passwd"))
        assert not any(s in str(e) for s in secrets for e in issued + used)
        log = agent.log_text()
        assert "console.ticket_burned" in log and not any(s in log for s in secrets)
