"""The stats collector's cheap sources against libvirt's own bulk call, on real QEMU guests.

Judged from outside the collector: every figure it takes from /proc or from the QMP side
channel must equal (counters that stand still) or sit between two readings of (counters that
move) what ``virConnectGetAllDomainStats`` says for the same guest, and a guest it cannot read
so (no side channel) must still come with libvirt's figures.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
import uuid
from xml.sax.saxutils import escape

import pytest

from cna_agent.compute.qmp import QEMU_NS, QmpSideChannel, commandline_args
from cna_agent.compute.vm_counters import VmCounters
from cna_agent.errors import Unavailable
from cna_agent.vrm.stats import GROUP_FLAGS, stats_flags

GROUPS = tuple(GROUP_FLAGS)
TICK_NS = 20_000_000  # /proc/<pid>/stat counts CPU in 10 ms ticks


def _xml(name: str, disk: str, sock: str | None) -> str:
    args = "".join(f"<qemu:arg value='{escape(a)}'/>" for a in commandline_args(sock)) if sock else ""
    cmdline = f"<qemu:commandline>{args}</qemu:commandline>" if sock else ""
    return f"""<domain type='qemu' xmlns:qemu='{QEMU_NS}'>
  <name>{name}</name><uuid>{uuid.uuid4()}</uuid>
  <memory unit='MiB'>64</memory><currentMemory unit='MiB'>48</currentMemory><vcpu>2</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type><boot dev='hd'/></os>
  <devices><emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='{disk}'/><target dev='vda' bus='virtio'/></disk>
    <interface type='ethernet'><model type='virtio'/><rom enabled='no'/></interface>
    <memballoon model='virtio'><stats period='5'/></memballoon>
  </devices>{cmdline}
</domain>"""


@pytest.mark.slow
def test_cheap_sources_agree_with_libvirts_bulk_call(embedded_libvirt, tmp_path):
    import libvirt

    conn = embedded_libvirt
    doms, socks = {}, {}
    for label, with_qmp in (("fast", True), ("plain", False)):
        disk = tmp_path / f"{label}.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "8M"], check=True, timeout=30)
        sock = str(tmp_path / f"{label}.sock") if with_qmp else None
        dom = conn.createXML(_xml(f"ctr-{label}-{uuid.uuid4().hex[:6]}", str(disk), sock), 0)
        doms[label] = dom
        if sock:
            socks[dom.UUIDString()] = sock
    fast, plain = doms["fast"], doms["plain"]
    try:
        time.sleep(3)  # SeaBIOS reads the disk looking for a boot sector: block counters move
        for dom in doms.values():
            dom.suspend()  # counters stand still from here on (a pause drains in-flight I/O)
        flags = stats_flags(GROUPS)

        def bulk(dom) -> dict:
            return conn.domainListGetStats([dom], flags, 0)[0][1]

        async def scenario():
            channels: dict[str, QmpSideChannel] = {}

            async def execute(vm: str, command: str, args):
                if vm not in socks:
                    raise Unavailable("defined without the side channel")
                if vm not in channels:
                    channels[vm] = QmpSideChannel(socks[vm])
                    await channels[vm].connect()
                return await channels[vm].execute(command, args)

            counters = VmCounters(lambda fn: asyncio.to_thread(fn, conn), execute)
            try:
                before = await asyncio.to_thread(bulk, fast)
                first = {u: r for u, _, r in await counters.collect(GROUPS, flags)}
                after = await asyncio.to_thread(bulk, fast)
                queries = counters.queries
                second = {u: r for u, _, r in await counters.collect(GROUPS, flags)}
                quiet_queries = counters.queries - queries
                counters.assume_ran = True
                await counters.collect(GROUPS, flags)
                forced = counters.queries - queries - quiet_queries
                return before, first, after, second, quiet_queries, forced, counters.fallbacks
            finally:
                for ch in channels.values():
                    await ch.close()

        before, first, after, second, quiet_queries, forced, fallbacks = asyncio.run(scenario())
        mine = first[fast.UUIDString()]
        assert mine["state.state"] == libvirt.VIR_DOMAIN_PAUSED
        # Counters that stand still while paused: equal to libvirt's.
        for key in ("block.count", "block.0.name", "block.0.path", "block.0.rd.reqs", "block.0.rd.bytes",
                    "block.0.wr.reqs", "block.0.wr.bytes", "block.0.fl.reqs", "block.0.capacity",
                    "net.count", "net.0.name", "balloon.current", "balloon.maximum",
                    "vcpu.current", "vcpu.maximum"):
            assert mine[key] == after[key], key
        assert before["block.0.rd.reqs"] > 0, "SeaBIOS read nothing: the block comparison proves little"
        for key in ("net.0.rx.bytes", "net.0.rx.pkts", "net.0.tx.bytes", "net.0.tx.pkts"):
            assert before[key] <= mine[key] <= after[key], key
        # CPU: between two libvirt readings, within /proc's tick.
        assert before["cpu.time"] - TICK_NS <= mine["cpu.time"] <= after["cpu.time"] + TICK_NS
        for i in range(2):
            assert before[f"vcpu.{i}.time"] - TICK_NS <= mine[f"vcpu.{i}.time"] <= after[f"vcpu.{i}.time"] + TICK_NS
        assert abs(mine["balloon.rss"] - after["balloon.rss"]) <= max(after["balloon.rss"] // 10, 1024)
        assert abs(mine["block.0.allocation"] - after["block.0.allocation"]) <= 1 << 20
        # A paused guest's vCPUs did not run: the second sample asked its monitor nothing and
        # still carries the disk figures. Taken for one that ran, it is asked for its disks;
        # its memory report, read a moment ago, waits its minute.
        assert quiet_queries == 0
        assert second[fast.UUIDString()]["block.0.rd.bytes"] == mine["block.0.rd.bytes"]
        assert forced == 1  # query-blockstats
        # The guest without a side channel: libvirt's own figures.
        theirs = first[plain.UUIDString()]
        assert fallbacks >= 1
        assert theirs["block.count"] == 1 and theirs["block.0.name"] == "vda" and theirs["net.count"] == 1
        assert theirs["cpu.time"] > 0
    finally:
        for dom in doms.values():
            try:
                dom.destroy()
            except libvirt.libvirtError:
                pass
