"""The guest agent (qemu-guest-agent on the virtio channel render.py adds for spec.guest_agent):
guest info and the tools status.

Why its own part, with its own small thread pool: a guest agent is code inside the guest, and a
guest that is frozen, overloaded or hostile answers late or never. libvirt bounds each agent
command (5 s by default) and runs it as an agent job, apart from the monitor jobs every other
call takes, but the agent's libvirt pool would still lose a thread per waiting call; here the
calls wait in a pool of their own, so a hung guest agent can delay only guest-info reads.

Reads are bounded in rate: one per VM at a time (a second caller waits on the first), and a read
younger than ``min_interval_s`` is served from memory. A guest agent that connects (libvirt's
agent lifecycle event) is read once soon after, so GetVm's tools version is there without anyone
asking. When a read fails, the last good one is returned marked stale, with the error.

Tools status comes from the channel's state in the live domain XML (no call into the guest):
connected is RUNNING; disconnected is NOT_RUNNING when a guest agent was seen on this VM since
it started, NOT_INSTALLED otherwise. "Seen" outlives an agent restart: the first read of a
connected guest agent writes a mark (with qemu-ga's version) into the *live* definition's
metadata, which lives exactly as long as the QEMU process, so a restarted agent reads it back
from the live XML GetVm already fetched, and a new boot starts without it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, replace
from typing import Any, Callable

import libvirt

from cna_agent.blocking import BlockingPool
from cna_agent.compute import domxml as dx
from cna_agent.compute import state as st
from cna_agent.compute.inventory import VmInventory
from cna_agent.compute.marks import write_metadata
from cna_agent.compute.spec import VmSpec
from cna_agent.errors import FailedPrecondition
from cna_agent.hypervisor import Hypervisor

log = logging.getLogger(__name__)

GA_CHANNEL = "org.qemu.guest_agent.0"
NO_CHANNEL, NOT_INSTALLED, NOT_RUNNING, RUNNING, VM_NOT_RUNNING = (
    "no_channel", "not_installed", "not_running", "running", "vm_not_running")

_INFO_TYPES = (libvirt.VIR_DOMAIN_GUEST_INFO_OS | libvirt.VIR_DOMAIN_GUEST_INFO_HOSTNAME
               | libvirt.VIR_DOMAIN_GUEST_INFO_FILESYSTEM | libvirt.VIR_DOMAIN_GUEST_INFO_TIMEZONE
               | libvirt.VIR_DOMAIN_GUEST_INFO_USERS | getattr(libvirt, "VIR_DOMAIN_GUEST_INFO_INTERFACES", 0))
#: How long a read waits for libvirt (which itself gives the guest agent 5 s per command, and a
#: read is up to two commands) before the caller gets the last read marked stale.
READ_DEADLINE_S = 12.0
#: After a guest agent connects, its first read waits this long: qemu-ga opens the port before
#: it answers guest-sync reliably.
CONNECT_SETTLE_S = 1.0


@dataclass(frozen=True)
class GuestAddress:
    type: str
    address: str
    prefix: int


@dataclass(frozen=True)
class GuestInterface:
    name: str
    mac: str
    addresses: tuple[GuestAddress, ...]
    #: Index into spec.nics of the NIC with this MAC, -1 for a device the spec does not have.
    nic_index: int = -1


@dataclass(frozen=True)
class GuestFilesystem:
    mountpoint: str
    name: str
    fstype: str
    total_bytes: int
    used_bytes: int
    disks: tuple[str, ...] = ()


@dataclass(frozen=True)
class GuestInfo:
    tools_status: str
    tools_version: str = ""
    os_id: str = ""
    os_name: str = ""
    os_version: str = ""
    os_pretty_name: str = ""
    kernel_release: str = ""
    kernel_version: str = ""
    machine: str = ""
    hostname: str = ""
    timezone: str = ""
    interfaces: tuple[GuestInterface, ...] = ()
    filesystems: tuple[GuestFilesystem, ...] = ()
    users: tuple[str, ...] = ()
    #: When the guest answered (None: never, since the VM started).
    read_at: float | None = None
    stale: bool = False
    error: str = ""


def _indexed(params: dict[str, Any], prefix: str) -> list[str]:
    """['fs.0.', 'fs.1.', ...] for libvirt's ``<prefix>.count`` typed-parameter lists."""
    return [f"{prefix}.{i}." for i in range(int(params.get(f"{prefix}.count", 0)))]


def parse_guest_info(params: dict[str, Any], macs: list[str], disk_targets: dict[str, str]) -> dict[str, Any]:
    """virDomainGetGuestInfo's typed parameters -> GuestInfo fields. ``macs``: the spec's NIC
    MACs in order (for nic_index); ``disk_targets``: libvirt device alias -> target (vda)."""
    by_mac = {m.lower(): i for i, m in enumerate(macs) if m}
    interfaces = []
    for p in _indexed(params, "if"):
        mac = str(params.get(p + "hwaddr", "")).lower()
        name = str(params.get(p + "name", ""))
        if name == "lo" or not mac or mac == "00:00:00:00:00:00":
            continue
        addrs = tuple(GuestAddress(str(params.get(a + "type", "")), str(params.get(a + "addr", "")),
                                   int(params.get(a + "prefix", 0))) for a in _indexed(params, p + "addr"))
        interfaces.append(GuestInterface(name, mac, addrs, by_mac.get(mac, -1)))
    filesystems = []
    for p in _indexed(params, "fs"):
        disks = []
        for d in _indexed(params, p + "disk"):
            alias = str(params.get(d + "alias", ""))
            if alias:
                disks.append(disk_targets.get(alias, alias))
        filesystems.append(GuestFilesystem(
            mountpoint=str(params.get(p + "mountpoint", "")), name=str(params.get(p + "name", "")),
            fstype=str(params.get(p + "fstype", "")), total_bytes=int(params.get(p + "total-bytes", 0)),
            used_bytes=int(params.get(p + "used-bytes", 0)), disks=tuple(disks)))
    users = tuple(sorted({str(params[p + "name"]) for p in _indexed(params, "user") if p + "name" in params}))
    return dict(
        os_id=str(params.get("os.id", "")), os_name=str(params.get("os.name", "")),
        os_version=str(params.get("os.version-id", "") or params.get("os.version", "")),
        os_pretty_name=str(params.get("os.pretty-name", "")), kernel_release=str(params.get("os.kernel-release", "")),
        kernel_version=str(params.get("os.kernel-version", "")), machine=str(params.get("os.machine", "")),
        hostname=str(params.get("hostname", "")), timezone=str(params.get("timezone.name", "")),
        interfaces=tuple(interfaces), filesystems=tuple(filesystems), users=users)


def channel_state(live: dx.Domain) -> str | None:
    """The guest agent channel's state in a running domain's XML: "connected", "disconnected",
    or None when the domain has no such channel."""
    for c in (live.devices.channels if live.devices else []):
        if c.target_name == GA_CHANNEL:
            return c.target_state or "disconnected"
    return None


def _agent_error(exc: BaseException) -> str:
    if isinstance(exc, libvirt.libvirtError):
        return exc.get_error_message() or str(exc)
    return getattr(exc, "message", None) or str(exc) or type(exc).__name__


@dataclass
class _Seen:
    """What is known about one running VM's guest agent."""

    ever_connected: bool = False
    version: str = ""
    last: GuestInfo | None = None
    read_at_mono: float = 0.0
    reading: asyncio.Task[GuestInfo] | None = None
    refresh: asyncio.TimerHandle | None = None


#: The live-only mark "a guest agent answered in this QEMU process" (its version in it).
SEEN_NS = "https://cna-agent.org/xmlns/guest-agent/1.0"
SEEN_KEY = "ga"


def seen_mark(live: dx.Domain) -> str | None:
    """qemu-ga's version from the live definition's mark ("" when it gave none), None without one."""
    for el in live.metadata or ():
        if el.tag == f"{{{SEEN_NS}}}seen":
            return el.get("version", "")
    return None


def write_seen_mark(dom: libvirt.virDomain, version: str) -> None:
    el = ET.Element("seen")  # libvirt adds the namespace and its prefix
    el.set("version", version)
    write_metadata(dom, SEEN_NS, SEEN_KEY, ET.tostring(el, encoding="unicode"), live=True)


class GuestAgents:
    def __init__(self, hypervisor: Hypervisor, inventory: VmInventory, *, pool: BlockingPool,
                 min_interval_s: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._hv = hypervisor
        self._inv = inventory
        self.pool = pool
        self._min_interval = min_interval_s
        self._clock = clock
        self._seen: dict[str, _Seen] = {}

    # -- what other parts tell us -------------------------------------------------------------

    def agent_changed(self, uuid: str, connected: bool) -> None:
        """libvirt's agent lifecycle event (events.py): a guest agent connected or went away."""
        seen = self._seen.setdefault(uuid, _Seen())
        if not connected:
            return
        seen.ever_connected = True
        if seen.refresh is None:
            loop = asyncio.get_running_loop()
            seen.refresh = loop.call_later(CONNECT_SETTLE_S, lambda: self._refresh_soon(uuid))

    def vm_state_changed(self, uuid: str, state: str) -> None:
        """A stopped or deleted VM forgets its guest agent: the next boot starts from nothing."""
        if state in (st.RUNNING, st.PAUSED):
            return
        seen = self._seen.pop(uuid, None)
        if seen is not None and seen.refresh is not None:
            seen.refresh.cancel()

    def _refresh_soon(self, uuid: str) -> None:
        seen = self._seen.get(uuid)
        if seen is None:
            return
        seen.refresh = None
        if seen.reading is None and self._clock() - seen.read_at_mono >= self._min_interval:
            self._start_read(uuid, seen)

    # -- tools status (GetVm) -----------------------------------------------------------------

    def tools_status(self, uuid: str, spec: VmSpec | None, live: dx.Domain | None) -> tuple[str, str]:
        """(status, version) for GetVm, from the live domain already read (no further call)."""
        if live is None:
            return VM_NOT_RUNNING, ""
        state = channel_state(live)
        if state is None:
            return NO_CHANNEL, ""
        seen = self._seen.get(uuid)
        if seen is None or not seen.ever_connected:
            marked = seen_mark(live)  # seen by an earlier agent process, in this QEMU process
            if marked is not None:
                seen = self._seen.setdefault(uuid, _Seen())
                seen.ever_connected, seen.version = True, seen.version or marked
        if state == "connected":
            if seen is None:  # connected before this agent process started: a read fills the version
                seen = self._seen.setdefault(uuid, _Seen())
            seen.ever_connected = True
            return RUNNING, seen.version
        if seen is not None and seen.ever_connected:
            return NOT_RUNNING, seen.version
        return NOT_INSTALLED, ""

    # -- clock -------------------------------------------------------------------------------

    async def sync_clock(self, uuid: str, spec: VmSpec | None) -> bool:
        """After a resume (a pause, a hibernation), the guest's clock is behind by the time it
        stood still; set it from the host through the guest agent. Only for a VM with one, in
        this part's pool (a hung guest agent delays nothing else), and never an error: a guest
        agent that does not answer leaves the clock to the guest's own NTP."""
        if spec is None or not spec.guest_agent:
            return False
        try:
            await self._hv.call(lambda c: set_guest_clock(c.lookupByUUIDString(uuid)), timeout=READ_DEADLINE_S,
                                what="guest clock sync", pool=self.pool)
            return True
        except Exception as exc:
            log.info("event=vm.clock_sync_skipped vm=%s error=%r", uuid, _agent_error(exc))
            return False

    # -- guest info (GetGuestInfo) ------------------------------------------------------------

    async def info(self, ref: str, *, max_age_s: float = 0.0) -> GuestInfo:
        uuid, name = await self._inv.lookup_uuid(ref)
        if await self._inv.state(uuid) not in (st.RUNNING, st.PAUSED):
            raise FailedPrecondition(f"vm {name!r} is not running; its guest agent answers only while it runs", field="vm")
        spec = (await self._inv.definition(uuid)).spec
        if spec is not None and not spec.guest_agent:
            return GuestInfo(tools_status=NO_CHANNEL,
                             error=f"vm {name!r} has no guest agent channel (spec.guest_agent is off)")
        seen = self._seen.setdefault(uuid, _Seen())
        age = self._clock() - seen.read_at_mono
        if seen.last is not None and seen.reading is None and age < max(max_age_s, self._min_interval):
            return seen.last
        if seen.reading is None:
            self._start_read(uuid, seen)
        assert seen.reading is not None
        return await asyncio.shield(seen.reading)

    def _start_read(self, uuid: str, seen: _Seen) -> None:
        task = asyncio.get_running_loop().create_task(self._read(uuid, seen), name=f"guest-info-{uuid[:8]}")
        seen.reading = task

        def done(t: asyncio.Task[GuestInfo]) -> None:
            seen.reading = None
            seen.read_at_mono = self._clock()
            if not t.cancelled() and t.exception() is not None:
                log.warning("event=vm.guest_info_failed vm=%s error=%r", uuid, _agent_error(t.exception()))

        task.add_done_callback(done)

    async def _read(self, uuid: str, seen: _Seen) -> GuestInfo:
        want_version = not seen.version

        def read(conn: libvirt.virConnect) -> tuple[dict[str, Any], str, dx.Domain]:
            dom = conn.lookupByUUIDString(uuid)
            live = dx.Domain.from_xml(dom.XMLDesc(0))
            params = dom.guestInfo(_INFO_TYPES, 0)
            version = ""
            if want_version:
                version = _agent_version(dom)
                if seen_mark(live) is None:
                    try:
                        write_seen_mark(dom, version)
                    except libvirt.libvirtError as exc:  # only a later agent process misses it
                        log.info("event=vm.guest_agent_mark_skipped vm=%s error=%r", uuid, str(exc))
            return params, version, live

        try:
            params, version, live = await self._hv.call(read, timeout=READ_DEADLINE_S, what="guest agent read",
                                                        pool=self.pool)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            status = NOT_RUNNING if seen.ever_connected else NOT_INSTALLED
            last = seen.last
            if last is None:
                return GuestInfo(tools_status=status, tools_version=seen.version, stale=True, error=_agent_error(exc))
            return replace(last, tools_status=status, stale=True, error=_agent_error(exc))
        spec = (await self._inv.definition(uuid)).spec
        macs = [n.mac for n in spec.nics] if spec is not None else []
        if version:
            seen.version = version
        seen.ever_connected = True
        fields = parse_guest_info(params, macs, _disk_targets(live))
        seen.last = GuestInfo(tools_status=RUNNING, tools_version=seen.version, read_at=time.time(), **fields)
        return seen.last


def set_guest_clock(dom: libvirt.virDomain) -> None:
    """The guest's clock set to the host's now, through the guest agent (guest-set-time)."""
    now = time.time()
    dom.setTime({"seconds": int(now), "nseconds": int((now % 1) * 1e9)}, 0)


def _disk_targets(live: dx.Domain) -> dict[str, str]:
    return {d.alias: d.target_dev for d in (live.devices.disks if live.devices else []) if d.alias and d.target_dev}


def _agent_version(dom: libvirt.virDomain) -> str:
    """qemu-ga's version (guest-info). libvirt has no typed call for it, so this is the one raw
    agent command the agent sends; libvirt marks the domain tainted (custom-ga-command) once,
    in its log. A guest agent that refuses it leaves the version empty, not the read failed."""
    import libvirt_qemu

    try:
        out = libvirt_qemu.qemuAgentCommand(dom, json.dumps({"execute": "guest-info"}), 5, 0)
        return str(json.loads(out).get("return", {}).get("version", ""))
    except (libvirt.libvirtError, ValueError, AttributeError):
        return ""
