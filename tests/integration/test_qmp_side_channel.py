"""The agent's own QMP monitor beside libvirt's, on a real QEMU under the embedded driver."""

from __future__ import annotations

import asyncio
import time
import uuid
from xml.sax.saxutils import escape

import pytest

from cna_agent.compute.qmp import QEMU_NS, QmpSideChannel, commandline_args
from cna_agent.errors import FailedPrecondition


def _domain_xml(name: str, sock: str) -> str:
    args = "".join(f"<qemu:arg value='{escape(a)}'/>" for a in commandline_args(sock))
    # No OS: SeaBIOS finds nothing to boot and idles, which is all a monitor needs.
    return f"""<domain type='qemu' xmlns:qemu='{QEMU_NS}'>
  <name>{name}</name><uuid>{uuid.uuid4()}</uuid>
  <memory unit='MiB'>64</memory><vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <devices><emulator>/usr/bin/qemu-system-x86_64</emulator></devices>
  <qemu:commandline>{args}</qemu:commandline>
</domain>"""


@pytest.mark.slow
def test_side_channel_sees_libvirts_changes_and_changes_nothing(embedded_libvirt, tmp_path):
    sock = tmp_path / "qmp.sock"
    name = f"qmp-{uuid.uuid4().hex[:8]}"
    dom = embedded_libvirt.createXML(_domain_xml(name, str(sock)), 0)
    try:
        deadline = time.monotonic() + 30
        while not sock.exists():
            assert time.monotonic() < deadline, "QEMU did not create the side-channel socket"
            time.sleep(0.1)

        async def scenario():
            qmp = QmpSideChannel(sock)
            await qmp.connect()
            seen: list[str] = []

            async def on_event(event: str, data: dict) -> None:
                seen.append(event)

            qmp.follow_events(on_event)
            status = await qmp.status()
            assert status["status"] == "running" and status["running"] is True
            assert (await qmp.execute("query-name"))["name"] == name
            # libvirt still owns the guest: its pause is seen on our monitor, as state and event.
            await asyncio.get_running_loop().run_in_executor(None, dom.suspend)
            assert (await qmp.status())["status"] == "paused"
            await asyncio.get_running_loop().run_in_executor(None, dom.resume)
            assert (await qmp.status())["status"] == "running"
            for _ in range(50):
                if "STOP" in seen and "RESUME" in seen:
                    break
                await asyncio.sleep(0.1)
            assert "STOP" in seen and "RESUME" in seen
            rate = await qmp.dirty_rate(1)
            assert rate["status"] == "measured" and rate["dirty-rate"] >= 0
            with pytest.raises(FailedPrecondition, match="not allowed"):
                await qmp.execute("stop")
            await qmp.close()

        asyncio.run(scenario())
        state, _ = dom.state()
        import libvirt

        assert state == libvirt.VIR_DOMAIN_RUNNING  # the refused "stop" never reached QEMU
    finally:
        dom.destroy()
