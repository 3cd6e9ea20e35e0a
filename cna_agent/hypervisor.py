"""The agent's one libvirt connection: choosing it, keeping it alive, and calling it safely.

* URI: ``qemu:///system`` when a libvirtd/virtqemud socket answers (production, systemd);
  otherwise the embedded QEMU driver ``qemu:///embed?root=<state>/libvirt``, which runs guests
  from inside the agent with no daemon (a zero-setup first run, and the tests).
* libvirt-python is blocking: every call runs in a bounded thread pool with a deadline (a
  BlockingPool named "libvirt": ``[libvirt] executor_threads`` threads, ``call_timeout_s``),
  so a stuck libvirt call costs the caller a DEADLINE_EXCEEDED, not the agent its event loop;
  connecting, pinging and closing go through the same pool.
* Events: libvirt's default event loop runs in one dedicated thread (registered once per
  process, as libvirt requires before the first connection); callbacks are handed to asyncio
  with ``call_soon_threadsafe``.
* Loss: a close callback plus a periodic cheap ping detect a restarted or dead libvirtd; the
  agent reconnects with exponential back-off and runs the registered "on connect" hooks
  (re-register events, reconcile). Meanwhile callers get UNAVAILABLE and the host reports
  itself degraded - never "no VMs".
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, TypeVar
from xml.etree import ElementTree

import libvirt

from cna_agent.blocking import BlockingPool
from cna_agent.qemu_access import QemuUser
from cna_agent.firmware_descriptors import secure_boot_arches
from cna_agent.errors import DeadlineExceeded, Unavailable
from cna_agent.tasks import cancel_and_wait

log = logging.getLogger(__name__)
T = TypeVar("T")

SYSTEM_SOCKETS = (
    "/run/libvirt/virtqemud-sock",  # modular daemons (openEuler 24.03, newer Debian)
    "/run/libvirt/libvirt-sock",  # monolithic libvirtd
    "/var/run/libvirt/libvirt-sock",
)

#: Deadline (seconds) for opening the connection and reading its capabilities, at least
#: ``[libvirt] call_timeout_s``.
CONNECT_TIMEOUT_S = 120.0

_event_loop_lock = threading.Lock()
_event_loop_thread: threading.Thread | None = None


def ensure_event_loop() -> None:
    """Start libvirt's default event implementation in a daemon thread, once per process.

    It must be registered before the first connection is opened, or that connection never
    delivers events (nor keepalives).
    """
    global _event_loop_thread
    with _event_loop_lock:
        if _event_loop_thread is not None:
            return
        libvirt.virEventRegisterDefaultImpl()

        def run() -> None:
            while True:
                try:
                    libvirt.virEventRunDefaultImpl()
                except libvirt.libvirtError:
                    log.exception("event=libvirt.event_loop_error")
                    time.sleep(0.1)

        _event_loop_thread = threading.Thread(target=run, name="libvirt-events", daemon=True)
        _event_loop_thread.start()


def _silence_default_error_handler() -> None:
    # libvirt prints every error to stderr by default; errors reach us as exceptions anyway.
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)


def _socket_answers(path: str) -> bool:
    """True when something accepts connections on the unix socket (a file left by a stopped
    daemon does not count)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(1.0)
    try:
        sock.connect(path)
        return True
    except OSError:
        return False
    finally:
        sock.close()


#: qemu.conf for the agent's embedded root, written once if the admin has not provided one.
EMBEDDED_QEMU_CONF = """\
# Written by cna-agent for libvirt's embedded QEMU driver (no libvirtd, no virtlogd).
# Edit freely: the agent never overwrites this file once it exists.
#
# QEMU runs as root and files keep their owner: guest images and kernels live in the
# agent's 0700 state directory, and there is no daemon to relabel or chown them. Hosts that
# need QEMU confined run libvirtd/virtqemud (qemu:///system), which the agent prefers.
user = "root"
group = "root"
dynamic_ownership = 0
remember_owner = 0
security_driver = "none"
# swtpm (spec.tpm) as root too: its state lives under this 0700 root, out of the tss user's reach.
swtpm_user = "root"
swtpm_group = "root"
# Without virtlogd, QEMU writes serial/console logs (<log file=...>) itself.
stdio_handler = "file"
"""


def embedded_root(uri: str) -> str | None:
    """The root directory of a qemu:///embed URI, or None for other URIs."""
    if not uri.startswith("qemu:///embed"):
        return None
    from urllib.parse import parse_qs, urlparse

    roots = parse_qs(urlparse(uri).query).get("root")
    return roots[0] if roots else None


#: Appended to the seeded qemu.conf where a child forked by the agent cannot enter a mount
#: namespace (cna_agent/host/forkprobe.py says why). libvirt then builds no per-guest /dev;
#: the guest's cgroup device list still limits which devices QEMU may open.
NAMESPACES_OFF = """\
# No per-guest mount namespace: {reason}.
# libvirt could not create a guest's device nodes (/dev/kvm, block devices) in its private /dev,
# and every such guest failed to start with "Unable to enter mount namespace". Delete these
# lines once the agent's gRPC runtime is upgraded (the agent probes again at its next start).
namespaces = []
"""
#: Appended where the probe passed: the verdict is on record, and the file is no longer the plain
#: seed, so later starts do not probe again.
NAMESPACES_ON = "# Per-guest mount namespaces (libvirt's default) kept: {reason}.\n"


def prepare_embedded_root(root: str, probe: Callable[[], Any] | None = None) -> None:
    """Create the embedded root (0700) and seed its qemu.conf unless the admin has one.

    The probe's verdict is appended either way, so it runs once per root. The seed is written
    again only while the file is exactly the plain seed (an upgrade from a version without the
    probe, or an admin who deleted the verdict's lines); any other edit makes the file the
    admin's. ``probe`` returns a :class:`~cna_agent.host.forkprobe.ForkVerdict` (tests pass their own).
    """
    etc = os.path.join(root, "etc")
    os.makedirs(etc, mode=0o700, exist_ok=True)
    conf = os.path.join(etc, "qemu.conf")
    try:
        with open(conf, encoding="utf-8") as fh:
            if fh.read() != EMBEDDED_QEMU_CONF:
                return
    except FileNotFoundError:
        pass
    if probe is None:
        from cna_agent.host.forkprobe import probe_forked_setns as probe
    verdict = probe()
    if verdict.can_setns:
        text = EMBEDDED_QEMU_CONF + NAMESPACES_ON.format(reason=verdict.reason)
    else:
        log.warning("event=embedded.namespaces_off root=%s reason=%r", root, verdict.reason)
        text = EMBEDDED_QEMU_CONF + NAMESPACES_OFF.format(reason=verdict.reason)
    tmp = conf + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.replace(tmp, conf)


def choose_uri(configured: str, state_dir: str) -> str:
    """The configured URI, or system when a daemon answers on its socket, else embedded."""
    if configured:
        return configured
    for sock in SYSTEM_SOCKETS:
        if _socket_answers(sock):
            return "qemu:///system"
    return f"qemu:///embed?root={os.path.join(state_dir, 'libvirt')}"


@dataclass(frozen=True)
class HypervisorFacts:
    uri: str
    mode: str  # "system", "embedded" or "remote/test"
    libvirt_version: str
    hypervisor_type: str
    hypervisor_version: str
    host_uuid: str
    arch: str
    emulator: str
    kvm_in_domcaps: bool
    machine_types: tuple[str, ...]
    firmware: tuple[str, ...]
    #: A Secure Boot UEFI build with enrolled keys is installed for ``arch`` (firmware_descriptors.py).
    secure_boot: bool = False
    #: uid/gid QEMU runs as (libvirt's DAC base label; None when unknown). Non-root under
    #: libvirtd/virqemud: files QEMU itself creates must be in directories it may write.
    qemu_uid: int | None = None
    qemu_gid: int | None = None
    #: Hyper-V enlightenments the domain capabilities list (None: this libvirt does not say).
    hyperv_features: tuple[str, ...] | None = None


def _describe(fn: Callable[..., Any]) -> str:
    name = getattr(fn, "__name__", "")
    return f"libvirt call {name}" if name and name != "<lambda>" else "libvirt call"


def _version_str(v: int) -> str:
    return f"{v // 1_000_000}.{(v // 1000) % 1000}.{v % 1000}"


#: How long past its own deadline a libvirt call that changes a VM (a device plugged or
#: unplugged, a snapshot taken or reverted) is still waited for: it may complete late (QEMU
#: waiting on storage that comes back), and reporting it failed before it ended would be untrue.
CHANGE_OUTLAST_S = 600.0

class Hypervisor:
    """Owns the libvirt connection; everything else asks it to run calls."""

    def __init__(
        self,
        uri: str,
        *,
        executor_threads: int = 16,
        call_timeout_s: float = 60.0,
        keepalive_interval_s: float = 5.0,
        reconnect_max_backoff_s: float = 30.0,
    ) -> None:
        self.uri = uri
        self.mode = "embedded" if uri.startswith("qemu:///embed") else "system" if uri.startswith("qemu:///system") else "other"
        #: Every blocking libvirt call runs here (connect, ping and close included).
        self.pool = BlockingPool("libvirt", executor_threads, call_timeout_s)
        self._call_timeout = call_timeout_s
        self._keepalive = keepalive_interval_s
        self._max_backoff = reconnect_max_backoff_s
        self._conn: libvirt.virConnect | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._on_connect: list[Callable[[libvirt.virConnect], Awaitable[None]]] = []
        self._connected = asyncio.Event()
        self._watch_task: asyncio.Task[None] | None = None
        self._closing = False
        self.facts: HypervisorFacts | None = None
        self.reconnects = 0

    # -- connection lifecycle ---------------------------------------------------------------

    def add_on_connect(self, hook: Callable[[libvirt.virConnect], Awaitable[None]]) -> None:
        """Run ``hook`` after every (re)connect: event registration, reconcile."""
        self._on_connect.append(hook)

    @property
    def connected(self) -> bool:
        return self._conn is not None and self._connected.is_set()

    async def start(self) -> None:
        """Connect (failing loudly if the first attempt fails) and start the watchdog task."""
        self._loop = asyncio.get_running_loop()
        ensure_event_loop()
        _silence_default_error_handler()
        await self._connect_once()
        self._watch_task = self._loop.create_task(self._watch(), name="libvirt-watch")

    async def start_disconnected(self) -> None:
        """Start the reconnect loop without a connection (libvirt was down at agent start)."""
        self._loop = asyncio.get_running_loop()
        ensure_event_loop()
        self._connected.clear()
        self._watch_task = self._loop.create_task(self._watch(), name="libvirt-watch")

    async def _connect_once(self) -> None:
        root = embedded_root(self.uri)
        if root is not None:
            # Off the loop: seeding runs the fork probe (a child interpreter, ~0.1 s).
            await self.pool.run(lambda: prepare_embedded_root(root), timeout=60, what="preparing the embedded root")
        # Opening (an embedded driver starts up) and the first capabilities (libvirt probes
        # every QEMU binary) may take longer than an ordinary call: a generous deadline.
        limit = max(self._call_timeout, CONNECT_TIMEOUT_S)
        conn = await self.pool.run(lambda: libvirt.open(self.uri), timeout=limit, what=f"connecting to {self.uri}")
        if self.mode != "embedded":
            try:
                # Remote/daemon connections: libvirt pings the daemon and closes the connection
                # (firing our close callback) when it stops answering.
                conn.setKeepAlive(int(max(1, self._keepalive)), 3)
            except libvirt.libvirtError:
                pass
        conn.registerCloseCallback(self._closed_cb, None)
        self._conn = conn
        self.facts = await self.pool.run(lambda: self._read_facts(conn), timeout=limit,
                                         what=f"reading the capabilities of {self.uri}")
        self._connected.set()
        log.info("event=libvirt.connected uri=%s mode=%s libvirt=%s qemu=%s", self.uri, self.mode, self.facts.libvirt_version, self.facts.hypervisor_version)
        for hook in self._on_connect:
            try:
                await hook(conn)
            except Exception:
                log.exception("event=libvirt.on_connect_failed hook=%r", hook)

    def _closed_cb(self, conn: libvirt.virConnect, reason: int, _opaque: Any) -> None:
        # Runs on the libvirt event thread.
        if self._loop is not None and not self._closing:
            self._loop.call_soon_threadsafe(self._mark_lost, f"close callback reason={reason}")

    def _mark_lost(self, why: str) -> None:
        if self._connected.is_set():
            log.warning("event=libvirt.connection_lost uri=%s why=%s", self.uri, why)
        self._connected.clear()

    async def _watch(self) -> None:
        """Ping while connected; reconnect with jittered exponential back-off when lost."""
        backoff = 0.5
        while not self._closing:
            if self._connected.is_set():
                await asyncio.sleep(self._keepalive)
                try:
                    alive = await self.pool.run(self._ping, timeout=max(5.0, self._keepalive * 2), what="libvirt ping")
                except DeadlineExceeded:
                    alive = False
                if not alive:
                    self._mark_lost("ping failed")
                continue
            old, self._conn = self._conn, None
            if old is not None:
                try:
                    await self.pool.run(lambda: self._close_quietly(old), timeout=10, what="closing the lost libvirt connection")
                except Exception:
                    pass
            try:
                await self._connect_once()
                self.reconnects += 1
                backoff = 0.5
            except (libvirt.libvirtError, DeadlineExceeded) as exc:
                delay = min(self._max_backoff, backoff) * (0.5 + random.random() / 2)
                log.warning("event=libvirt.reconnect_failed uri=%s retry_in_s=%.1f error=%r", self.uri, delay, str(exc))
                backoff = min(self._max_backoff, backoff * 2)
                await asyncio.sleep(delay)

    def _ping(self) -> bool:
        conn = self._conn
        if conn is None:
            return False
        try:
            conn.getLibVersion()
            return bool(conn.isAlive())
        except libvirt.libvirtError:
            return False

    @staticmethod
    def _close_quietly(conn: libvirt.virConnect) -> None:
        try:
            conn.unregisterCloseCallback()
        except libvirt.libvirtError:
            pass
        try:
            conn.close()
        except libvirt.libvirtError:
            pass

    async def stop(self) -> None:
        self._closing = True
        await cancel_and_wait(self._watch_task)
        conn, self._conn = self._conn, None
        self._connected.clear()
        if conn is not None:
            try:
                await self.pool.run(lambda: self._close_quietly(conn), timeout=10, what="closing the libvirt connection")
            except Exception as exc:  # closing is best effort
                log.warning("event=libvirt.close_failed uri=%s error=%r", self.uri, str(exc))
        self.pool.shutdown()

    # -- calls ------------------------------------------------------------------------------

    async def call(self, fn: Callable[[libvirt.virConnect], T], *, timeout: float | None = None, what: str = "",
                   outlast: float = 0.0, pool: BlockingPool | None = None) -> T:
        """Run ``fn(conn)`` in the libvirt pool with a deadline (default ``call_timeout_s``).

        UNAVAILABLE while disconnected (the caller should retry), DEADLINE_EXCEEDED naming
        ``what`` when the call does not return in time (the thread stays busy until libvirt
        returns and counts as stuck; the pool is bounded so a wedged daemon cannot make the
        agent spawn threads without end). ``outlast``: see BlockingPool.run (a change that
        may complete late is waited for, not reported failed at its deadline). ``pool``: run
        in another bounded pool on the same connection (calls that wait on something slow
        outside libvirt, such as a guest agent, so they cannot take every libvirt thread).
        """
        conn = self._conn
        if conn is None or not self._connected.is_set():
            raise Unavailable(f"libvirt ({self.uri}) is not connected; the agent is reconnecting")
        what = what or _describe(fn)
        try:
            return await (pool or self.pool).run(lambda: fn(conn), timeout=timeout or None, what=what, outlast=outlast)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() in (libvirt.VIR_ERR_SYSTEM_ERROR, libvirt.VIR_ERR_RPC, libvirt.VIR_ERR_NO_CONNECT, libvirt.VIR_ERR_INTERNAL_ERROR) and not await self._still_alive():
                self._mark_lost(str(exc))
                raise Unavailable(f"libvirt connection lost: {exc}") from None
            raise

    async def _still_alive(self) -> bool:
        """False only when a ping ran and failed; a ping that cannot get a thread in time
        proves nothing (the watch task's periodic ping decides then)."""
        try:
            return await self.pool.run(self._ping, timeout=5, what="libvirt ping")
        except (DeadlineExceeded, Unavailable):
            return True

    # -- facts -----------------------------------------------------------------------------

    def _read_facts(self, conn: libvirt.virConnect) -> HypervisorFacts:
        caps = ElementTree.fromstring(conn.getCapabilities())
        host_uuid = caps.findtext("host/uuid") or ""
        arch = caps.findtext("host/cpu/arch") or os.uname().machine
        try:
            hv_version = _version_str(conn.getVersion())
        except libvirt.libvirtError:
            hv_version = ""
        emulator = ""
        machines: list[str] = []
        kvm = False
        for guest in caps.findall("guest"):
            if guest.findtext("arch") is None and guest.find("arch") is None:
                continue
            garch = guest.find("arch")
            if garch is None or garch.get("name") != arch or guest.findtext("os_type") != "hvm":
                continue
            emulator = garch.findtext("emulator") or emulator
            machines = sorted({m.text for m in garch.findall("machine") if m.text})
            kvm = any(d.get("type") == "kvm" for d in garch.findall("domain"))
        firmware: list[str] = []
        hyperv: tuple[str, ...] | None = None
        try:
            dcaps = ElementTree.fromstring(conn.getDomainCapabilities(emulator or None, arch, None, "qemu", 0))
            firmware = sorted({v.text for v in dcaps.findall("os/enum[@name='firmware']/value") if v.text})
            hv = dcaps.find("features/hyperv")
            if hv is not None:
                hyperv = tuple(v.text for v in hv.findall("enum[@name='features']/value") if v.text) if hv.get("supported") == "yes" else ()
        except libvirt.libvirtError:
            pass
        qemu_uid = qemu_gid = None
        for secmodel in caps.findall("host/secmodel"):
            if secmodel.findtext("model") != "dac":
                continue
            for label in secmodel.findall("baselabel"):
                if label.get("type") in ("kvm", "qemu") and label.text and ":" in label.text:
                    u, g = label.text.replace("+", "").split(":", 1)
                    if u.isdigit() and g.isdigit():
                        qemu_uid, qemu_gid = int(u), int(g)
                        break
        return HypervisorFacts(
            uri=self.uri,
            mode=self.mode,
            libvirt_version=_version_str(conn.getLibVersion()),
            hypervisor_type=conn.getType(),
            hypervisor_version=hv_version,
            host_uuid=host_uuid,
            arch=arch,
            emulator=emulator,
            kvm_in_domcaps=kvm,
            machine_types=tuple(machines),
            firmware=tuple(firmware),
            secure_boot="efi" in firmware and arch in secure_boot_arches(),
            qemu_uid=qemu_uid,
            qemu_gid=qemu_gid,
            hyperv_features=hyperv,
        )

    def qemu_user(self) -> QemuUser | None:
        """The DAC identity QEMU runs as on this connection (None until libvirt has said)."""
        f = self.facts
        return QemuUser(f.qemu_uid, f.qemu_gid) if f is not None and f.qemu_uid is not None else None

    async def counts(self) -> tuple[int, int]:
        """(running, total) domains."""

        def count(conn: libvirt.virConnect) -> tuple[int, int]:
            doms = conn.listAllDomains(0)
            return sum(1 for d in doms if d.isActive()), len(doms)

        return await self.call(count, timeout=10)
