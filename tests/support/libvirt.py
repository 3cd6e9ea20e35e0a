"""libvirt as the tests use it: the embedded QEMU driver in this process or a child, and the
host's own libvirtd (qemu:///system) for tests of production mode.

Why here: libvirt lets one process open only one embedded root for its lifetime and needs an
event loop before it opens one; the first open of a root probes every installed QEMU binary
(about 12 s). These helpers keep those rules in one place: the pytest process opens at most
one embedded root (the ``embedded_libvirt`` fixture), warming the capabilities cache happens in
a child, and the host libvirtd is started and stopped the way tools/testbed.py does.
``import libvirt`` happens inside the functions, so importing this module never needs it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

from support.waiting import wait_for

#: qemu.conf for the pytest process's embedded root: QEMU runs as root without relabelling (so
#: the cached guest files keep their owner) and chardev logs are written by QEMU itself (no
#: virtlogd).
EMBEDDED_QEMU_CONF = ('user = "root"\ngroup = "root"\ndynamic_ownership = 0\nremember_owner = 0\n'
                      'security_driver = "none"\nstdio_handler = "file"\n')

_event_loop_started = False


def start_event_loop() -> None:
    """libvirt's default event loop in one daemon thread (needed for the embedded driver)."""
    global _event_loop_started
    import libvirt

    if _event_loop_started:
        return
    libvirt.virEventRegisterDefaultImpl()

    def loop() -> None:
        while True:
            libvirt.virEventRunDefaultImpl()

    threading.Thread(target=loop, name="libvirt-events", daemon=True).start()
    _event_loop_started = True


def open_embedded(root: Path):
    """A ``qemu:///embed`` connection on ``root`` (written with :data:`EMBEDDED_QEMU_CONF`)."""
    import libvirt

    (root / "etc").mkdir(parents=True, exist_ok=True)
    (root / "etc" / "qemu.conf").write_text(EMBEDDED_QEMU_CONF)
    start_event_loop()
    return libvirt.open(f"qemu:///embed?root={root}")


def warm_capabilities_cache(root: Path) -> Path | None:
    """Probe QEMU once under the embedded root ``root`` and return its capabilities cache
    (``<root>/cache/qemu/capabilities``); None when libvirt-python is missing.

    In a child process, so the caller stays free to open an embedded root of its own, and with
    the agent's own qemu.conf: the cache is only valid for the same QEMU uid.
    """
    code = (
        "import libvirt, sys\n"
        "libvirt.registerErrorHandler(lambda c, e: None, None)\n"
        "libvirt.virEventRegisterDefaultImpl()  # the embedded driver refuses to open without one\n"
        f"from cna_agent.hypervisor import prepare_embedded_root; prepare_embedded_root({str(root)!r})\n"
        f"conn = libvirt.open('qemu:///embed?root={root}')\n"
        "conn.getCapabilities(); conn.close()\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    if out.returncode != 0:
        if "No module named 'libvirt'" in out.stderr:
            return None
        raise RuntimeError(f"warming libvirt's capabilities cache failed: {out.stderr[-2000:]}")
    cache = root / "cache" / "qemu" / "capabilities"
    return cache if cache.is_dir() else None


# -- the host's own libvirtd (qemu:///system), for tests of production mode -----------------------

LIBVIRTD_SOCK = Path("/run/libvirt/libvirt-sock")
LIBVIRTD_PIDFILE = Path("/run/libvirtd.pid")


def libvirtd_answers() -> bool:
    if not LIBVIRTD_SOCK.exists():
        return False
    out = subprocess.run(["virsh", "-c", "qemu:///system", "version"], capture_output=True, timeout=30)
    return out.returncode == 0


#: Where hugetlbfs goes when the host has none mounted (systemd's dev-hugepages.mount does this
#: on a booted host; containers and CI machines without systemd have nothing there).
HUGETLBFS_MOUNT = Path("/dev/hugepages")


def hugetlbfs_mounts() -> list[str]:
    """Mount points of hugetlbfs, from /proc/self/mounts."""
    out = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        fields = line.split()
        if len(fields) >= 3 and fields[2] == "hugetlbfs":
            out.append(fields[1].replace("\\040", " "))
    return out


def ensure_hugetlbfs() -> str:
    """Mount hugetlbfs at /dev/hugepages unless one is mounted; return a mount point.

    Why before libvirtd: libvirtd looks for hugetlbfs mounts only when it starts (a guest with
    <hugepages> then fails with "hugetlbfs filesystem is not mounted or disabled by
    administrator config"); the embedded driver looks when it is opened, so each agent a test
    starts sees a mount made before it.
    """
    mounts = hugetlbfs_mounts()
    if mounts:
        return mounts[0]
    HUGETLBFS_MOUNT.mkdir(parents=True, exist_ok=True)
    out = subprocess.run(["mount", "-t", "hugetlbfs", "hugetlbfs", str(HUGETLBFS_MOUNT)],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, f"mounting hugetlbfs at {HUGETLBFS_MOUNT} failed: {out.stderr}"
    return str(HUGETLBFS_MOUNT)


def start_libvirtd() -> None:
    ensure_hugetlbfs()
    subprocess.run(["virtlogd", "-d"], capture_output=True, timeout=30)
    out = subprocess.run(["libvirtd", "-d"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    wait_for(libvirtd_answers, 30, "libvirtd to come up")


def stop_libvirtd() -> None:
    _stop(LIBVIRTD_PIDFILE, "libvirtd")


VIRTLOGD_PIDFILE = Path("/run/virtlogd.pid")


def virtlogd_running() -> bool:
    try:
        pid = int(VIRTLOGD_PIDFILE.read_text().strip())
        return Path(f"/proc/{pid}/comm").read_text().strip() == "virtlogd"
    except (OSError, ValueError):
        return False


def stop_virtlogd() -> None:
    _stop(VIRTLOGD_PIDFILE, "virtlogd")


#: How long a daemon the tests started gets to end on SIGTERM before it is killed. libvirtd
#: sometimes sat out its own 30 s shutdown wait in CI (two teardowns of 30-32 s in run 7, never
#: alone here); the tests need it gone, not a graceful driver shutdown, and every domain of
#: theirs was removed before.
STOP_GRACE_S = 8.0


def _stop(pidfile: Path, what: str) -> None:
    import time

    pid = int(pidfile.read_text().strip())
    os.kill(pid, signal.SIGTERM)
    t0 = time.monotonic()
    try:
        wait_for(lambda: not Path(f"/proc/{pid}").exists(), STOP_GRACE_S, f"{what} to stop")
    except AssertionError:
        print(f"{what} (pid {pid}) still ran {STOP_GRACE_S:.0f} s after SIGTERM; killed", file=sys.stderr)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        wait_for(lambda: not Path(f"/proc/{pid}").exists(), 30, f"{what} to die")
        pidfile.unlink(missing_ok=True)
        # a killed daemon leaves its sockets (and an agent takes qemu:///system when libvirtd's exists)
        names = ("libvirt-sock", "libvirt-sock-ro", "libvirt-admin-sock") if what == "libvirtd" else \
            (f"{what}-sock", f"{what}-admin-sock")
        for name in names:
            (Path("/run/libvirt") / name).unlink(missing_ok=True)
    if time.monotonic() - t0 > 2:
        print(f"{what} took {time.monotonic() - t0:.1f} s to stop", file=sys.stderr)


def domain_xml(agent, mode: str, name: str, *, live: bool = True) -> str:
    """Domain ``name`` of ``agent`` as libvirt keeps it, passwords included: asked of
    qemu:///system in "system" mode, else read from the embedded driver's files under the
    agent's root (the status XML while it runs, the persistent definition with ``live=False``).
    "" when libvirt has no such file (a domain that is not running, or gone)."""
    if mode == "system":
        import libvirt

        conn = libvirt.open("qemu:///system")
        try:
            flags = libvirt.VIR_DOMAIN_XML_SECURE | (0 if live else libvirt.VIR_DOMAIN_XML_INACTIVE)
            return conn.lookupByName(name).XMLDesc(flags)
        finally:
            conn.close()
    root = Path(agent.dir) / "state" / "libvirt"
    path = root / "run" / "qemu" / f"{name}.xml" if live else root / "etc" / "qemu" / f"{name}.xml"
    return path.read_text() if path.exists() else ""


def live_vnc(agent, mode: str, name: str):
    """The running domain's VNC graphics element (ElementTree), password and validity included."""
    from xml.etree import ElementTree as ET

    return next(g for g in ET.fromstring(domain_xml(agent, mode, name)).iter("graphics") if g.get("type") == "vnc")


class ConnHypervisor:
    """The Hypervisor's calling side (``call``, ``connected``, ``uri``) over a plain libvirt
    connection, for tests that hand agent code a connection they opened themselves (libvirt's
    test driver, the embedded driver, or a recording stand-in)."""

    connected = True

    def __init__(self, conn: object, uri: str = "test:///default") -> None:
        self.conn = conn
        self.uri = uri

    async def call(self, fn, *, timeout: float | None = None, what: str = "", outlast: float = 0.0, pool=None):
        import asyncio

        return await asyncio.wait_for(asyncio.to_thread(fn, self.conn), timeout + outlast if timeout else None)
