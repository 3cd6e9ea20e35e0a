"""Prove the two-host testbed (tools/testbed.py ``hosts``, the ``two_hosts`` fixture) that
migration between agents runs on: two libvirtds that are separate hosts to libvirt, and a live
guest moving between them over TCP on loopback and back.

Judged from outside: each host's own libvirt (capabilities, its domain list, job stats), /proc
(the namespace and cgroups each QEMU lives in, which host's pid files name it) and the guest's
own serial output, which must keep counting across both moves in the same boot.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
import uuid
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from support.console import ConsoleSocket, SerialLog
from support.guests import domain_xml

pytestmark = pytest.mark.needs_root

#: A line the guest prints every 0.2 s once the test starts the loop: a counter and its uptime.
TICK = re.compile(r"^CNA-TICK (\d+) (\d+\.\d+)$", re.M)


def _caps(conn) -> ET.Element:
    return ET.fromstring(conn.getCapabilities())


def test_each_host_is_its_own_libvirt_host(two_hosts) -> None:
    """Distinct host UUIDs as configured, separate domain lists, separate namespaces and /run,
    QEMU as the unprivileged Debian user, hugetlbfs still visible."""
    libvirt = pytest.importorskip("libvirt")
    libvirt.registerErrorHandler(lambda _c, _e: None, None)  # the lookup on B is meant to fail
    a, b = two_hosts.a, two_hosts.b
    ca, cb = a.open(), b.open()
    try:
        uuid_a = _caps(ca).findtext("host/uuid")
        uuid_b = _caps(cb).findtext("host/uuid")
        assert (uuid_a, uuid_b) == (a.host_uuid, b.host_uuid) and uuid_a != uuid_b
        for c in (ca, cb):
            dac = [m for m in _caps(c).iter("secmodel") if m.findtext("model") == "dac"]
            label = dac[0].findtext("baselabel[@type='qemu']") if dac else None
            uid = os.stat("/proc/self").st_uid  # root; QEMU must not be
            assert label and not label.startswith(f"+{uid}:"), label

        name = f"only-a-{uuid.uuid4().hex[:6]}"
        xml = (f"<domain type='qemu'><name>{name}</name><memory unit='MiB'>64</memory>"
               "<os><type arch='x86_64' machine='q35'>hvm</type></os></domain>")
        dom = ca.defineXML(xml)
        try:
            assert name in [d.name() for d in ca.listAllDomains()]
            assert name not in [d.name() for d in cb.listAllDomains()]
            with pytest.raises(libvirt.libvirtError):
                cb.lookupByName(name)
        finally:
            dom.undefine()
    finally:
        ca.close()
        cb.close()

    ns = {h.name: os.readlink(f"/proc/{h.libvirtd_pid}/ns/mnt") for h in (a, b)}
    assert len({ns["a"], ns["b"], os.readlink("/proc/self/ns/mnt")}) == 3, ns
    for h in (a, b):
        assert os.stat(h.root / "run").st_dev != os.stat("/run").st_dev  # its own tmpfs
        assert (h.root / "run/libvirt/libvirt-sock").is_socket()
        assert (h.root / "run/libvirt/virtlogd-sock").is_socket()
        assert (h.root / "run/lock").is_dir()  # libvirt's console lock files (/var/lock)
        assert Path(f"/proc/{h.virtlogd_pid}/comm").read_text().strip() == "virtlogd"
        mine = {line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()
                if " - hugetlbfs " in line}
        theirs = {line.split()[4] for line in Path(f"/proc/{h.libvirtd_pid}/mountinfo").read_text().splitlines()
                  if " - hugetlbfs " in line}
        assert mine <= theirs, (mine, theirs)


def _ticks(log: SerialLog) -> list[tuple[int, float]]:
    return [(int(n), float(up)) for n, up in TICK.findall(log.text())]


def _wait_ticks_past(log: SerialLog, n: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not any(t > n for t, _ in _ticks(log)):
        if time.monotonic() > deadline:
            raise AssertionError(f"no CNA-TICK after {n} within {timeout}s; log tail:\n{log.text()[-1500:]}")
        time.sleep(0.1)


def _migrate(libvirt, dom, dst, dst_conn, name: str) -> tuple[float, dict]:
    """Live peer-to-peer migration of dom to host dst; (wall seconds, completed job stats)."""
    flags = (libvirt.VIR_MIGRATE_LIVE | libvirt.VIR_MIGRATE_PEER2PEER
             | libvirt.VIR_MIGRATE_PERSIST_DEST | libvirt.VIR_MIGRATE_UNDEFINE_SOURCE)
    t0 = time.monotonic()
    dom.migrateToURI3(dst.uri, {libvirt.VIR_MIGRATE_PARAM_URI: dst.migration_uri()}, flags)
    wall = time.monotonic() - t0
    stats = dst_conn.lookupByName(name).jobStats(libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED)
    return wall, stats


@pytest.mark.slow
def test_a_running_guest_migrates_live_to_b_and_back(two_hosts, test_guest) -> None:
    libvirt = pytest.importorskip("libvirt")
    libvirt.registerErrorHandler(lambda _c, _e: None, None)
    a, b = two_hosts.a, two_hosts.b
    # a directory both namespaces see (/tmp is shared) that QEMU's user may traverse; the guest
    # files are copied so libvirt's relabelling never touches the shared guest cache
    work = Path(tempfile.mkdtemp(prefix="cna-2h-", dir="/tmp"))
    work.chmod(0o711)
    g = dict(test_guest("x86_64"))
    for key in ("kernel", "initrd"):
        dst = work / Path(g[key]).name
        shutil.copyfile(g[key], dst)
        dst.chmod(0o644)
        g[key] = str(dst)
    name = f"mig-{uuid.uuid4().hex[:6]}"
    log, sock = work / "serial.log", work / "serial.sock"
    ca, cb = a.open(), b.open()
    try:
        dom = ca.defineXML(domain_xml(name, g, serial_log=log, serial_socket=sock, memory_mib=256))
        dom.create()
        serial = SerialLog(log)
        serial.wait_for(r"^CNA-GUEST-READY boot=1$", timeout=120)
        with ConsoleSocket(sock) as con:
            con.send("\n")  # the prompt was printed before we connected: ask for a new one
            con.wait_for(r"cna# ", timeout=20, partial=True)
            con.send("i=0; while :; do i=$((i+1)); echo \"CNA-TICK $i $(cut -d' ' -f1 /proc/uptime)\"; "
                     "sleep 0.2; done &\n")
            # stay connected until the guest has read the whole line (QEMU drops what the
            # UART has not taken yet when the client goes away)
            _wait_ticks_past(serial, 5)
        qemu_a = a.qemu_pids()[name]

        results = []
        for src, src_conn, dst, dst_conn in ((a, ca, b, cb), (b, cb, a, ca)):
            before = max(t for t, _ in _ticks(serial))
            old_pid = src.qemu_pids()[name]
            wall, stats = _migrate(libvirt, src_conn.lookupByName(name), dst, dst_conn, name)
            results.append((f"{src.name}->{dst.name}", wall, stats))
            # the destination's libvirt: running and persistent; the source's: gone
            moved = dst_conn.lookupByName(name)
            assert moved.isActive() and moved.isPersistent()
            assert name not in [d.name() for d in src_conn.listAllDomains()]
            # /proc: a new QEMU named by the destination's pid files, the old one gone
            new_pid = dst.qemu_pids().get(name)
            assert new_pid and new_pid != old_pid and name not in src.qemu_pids()
            assert not Path(f"/proc/{old_pid}").exists() or "qemu" not in Path(f"/proc/{old_pid}/comm").read_text()
            assert new_pid not in src.pids() and new_pid in dst.pids()
            # the guest itself: still counting in the same boot, on the destination's QEMU
            _wait_ticks_past(serial, before + 5)
            assert serial.count(r"^CNA-GUEST-READY boot=") == 1
        ticks = _ticks(serial)
        nums = [t for t, _ in ticks]  # the first may share a line with the echoed command
        assert nums == list(range(nums[0], nums[0] + len(nums))), f"the guest's counter skipped or restarted: {nums}"
        assert all(u2 >= u1 for (_, u1), (_, u2) in zip(ticks, ticks[1:])), "the guest's uptime went back"
        assert qemu_a != a.qemu_pids()[name]
        for what, wall, st in results:
            print(f"migration {what}: wall {wall * 1000:.0f} ms, job {st.get('time_elapsed')} ms, "
                  f"downtime {st.get('downtime')} ms, setup {st.get('setup_time')} ms, "
                  f"{st.get('memory_processed', 0) / 2**20:.1f} MiB in {st.get('memory_iteration')} iterations")
    finally:
        for c in (ca, cb):
            try:
                d = c.lookupByName(name)
                if d.isActive():
                    d.destroy()
                d.undefine()
            except libvirt.libvirtError:
                pass
            c.close()
        shutil.rmtree(work, ignore_errors=True)
