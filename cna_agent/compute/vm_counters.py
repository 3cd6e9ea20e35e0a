"""Running VMs' counters, each from its cheapest correct source (the stats sampler's collector).

libvirt's bulk call (``virConnectGetAllDomainStats``) is one call, but not one cost: measured
on 100 paused TCG guests (``benchmarks.stats``), every group that needs QEMU's monitor costs
QEMU about 1 ms of CPU per VM and libvirt 0.3 ms more (cpu-total and vcpu included: libvirt
9 asks QEMU's ``query-stats`` for halt-polling figures), so the six groups cost 5.9 ms per VM
counted in every process, 5.9 s a sample on 1,000 VMs. Most of those figures need no monitor
at all:

* CPU time and RSS: ``/proc/<qemu>/stat`` (the whole process, the figure libvirt's cgroup
  read gives); each vCPU: ``/proc/<qemu>/task/<tid>/schedstat`` (nanoseconds run and waited).
* NIC counters: ``/proc/net/dev``, read ONCE per sample for every tap (libvirt re-reads and
  re-parses that file for each NIC of each VM), with libvirt's direction: a tap shows the
  guest's view (host tx = guest rx), a macvtap (``direct``) the host's.
* State: libvirt's STATE group alone (no monitor, no job).
* Balloon size and maximum, vCPU counts, disk names and paths: the live definition, read once
  per domain start (and again when the agent changes the definition, see :meth:`forget`).

Two figures exist only inside QEMU: per-disk I/O counters (``query-blockstats``) and the
guest's own memory report (``qom-get guest-stats``). They come from the agent's QMP side
channel (one command each, no libvirt job, 0.4-0.5 ms of QEMU CPU: the fixed cost of any
monitor command, ``query-status`` costs the same), and only from a guest whose vCPUs ran since
the last read: a guest's disk counters move only by requests its vCPUs issued and by their
completions, which raise an interrupt its vCPUs then run to take; a paused guest drained its
requests when it stopped. A running guest's timer ticks make its vCPUs run each interval, so
every running guest's disks are asked each sample (its memory report at most every
``GUEST_MEMORY_MIN_S``); a paused or halted one costs no monitor round trip. ``MAX_QUIET_S``
bounds the time any guest goes unasked.

A VM whose counters cannot be read this way (no side channel: defined outside the agent; a
NIC without a kernel device, e.g. vhost-user; a disk without an alias) is sampled by libvirt's
own ``virDomainListGetStats`` for just those domains, so nothing is missing, only costlier.
Records are libvirt's flat keys ("block.0.rd.bytes"), so one parser serves both paths.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Mapping, Sequence

from cna_agent.compute import domxml as dx

log = logging.getLogger(__name__)

Call = Callable[[Callable[[Any], Any]], Awaitable[Any]]
Execute = Callable[[str, str, "dict[str, Any] | None"], Awaitable[Any]]
Record = tuple[str, str, dict[str, Any]]

#: Longest a running guest goes without a monitor read, whatever its vCPUs did.
MAX_QUIET_S = 300.0
#: Shortest time between two reads of a guest's own memory report: the guest refreshes it
#: every stats period (10 s as rendered) and it serves placement and charts, not alarms, so
#: a running guest costs one monitor round trip a sample (its disks), not two.
GUEST_MEMORY_MIN_S = 60.0
#: A monitor answer later than this is left for the next sample (the sample does not wait).
QUERY_DEADLINE_S = 2.0
#: Monitor queries in flight at once (a sample of 1,000 guests does not open 1,000 at once).
MAX_CONCURRENT = 32
#: How long a VM that has to be sampled through libvirt stays so before it is tried again.
FALLBACK_RETRY_S = 120.0
#: NICs whose counters libvirt reports from the host's side (not swapped): macvtap, which
#: the guest shares with the host; every tap is reported as the guest sees it.
HOST_VIEW_NIC_TYPES = frozenset({"direct"})
#: Kernel-device NIC types (their target dev is a line of /proc/net/dev).
KERNEL_NIC_TYPES = frozenset({"ethernet", "direct", "bridge", "network"})

_CLK_TCK = os.sysconf("SC_CLK_TCK")
_PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024
_TICK_NS = 1_000_000_000 // _CLK_TCK


@dataclass
class Layout:
    """What one domain run looks like from the host: its QEMU process and its devices."""

    domain_id: int
    pid: int
    starttime: bytes
    vcpu_tids: tuple[int, ...]
    vcpus_maximum: int
    nics: tuple[tuple[str, bool], ...]  # (kernel device, counters swapped to the guest's view)
    disks: tuple[tuple[str, str, str], ...]  # (target dev, qdev alias, source path)
    balloon_current_kib: int
    balloon_maximum_kib: int
    balloon_qom: str  # "" = no virtio balloon with a stats period
    capacity: dict[str, int] = field(default_factory=dict)  # target dev -> virtual size (query-block)
    block: dict[str, dict[str, int]] = field(default_factory=dict)
    guest_memory: dict[str, int] = field(default_factory=dict)
    #: vCPU nanoseconds run (all vCPUs) at this sample, at the last block / guest-memory
    #: read, and when those reads were.
    vcpu_ns: int = -1
    block_cpu: int = -1
    block_at: float = 0.0
    memory_cpu: int = -1
    memory_at: float = 0.0


def read_stat(proc: str, pid: int) -> tuple[bytes, int, int, int]:
    """(starttime, user ns, system ns, rss KiB) from /proc/<pid>/stat."""
    with open(f"{proc}/{pid}/stat", "rb") as fh:
        fields = fh.read().rsplit(b")", 1)[1].split()
    return fields[19], int(fields[11]) * _TICK_NS, int(fields[12]) * _TICK_NS, int(fields[21]) * _PAGE_KIB


def read_schedstat(proc: str, pid: int, tid: int) -> tuple[int, int]:
    """(ns run, ns waited on a run queue) of one thread."""
    with open(f"{proc}/{pid}/task/{tid}/schedstat", "rb") as fh:
        run, wait, _ = fh.read().split()
    return int(run), int(wait)


def parse_net_dev(text: bytes) -> dict[str, tuple[int, ...]]:
    """/proc/net/dev -> device -> (rx bytes, packets, errs, drop, ..., tx bytes, packets, errs, drop, ...)."""
    out: dict[str, tuple[int, ...]] = {}
    for line in text.splitlines()[2:]:
        name, _, rest = line.partition(b":")
        values = rest.split()
        if len(values) >= 12:
            out[name.strip().decode()] = tuple(int(v) for v in values)
    return out


def nic_keys(i: int, dev: str, counters: Sequence[int], swapped: bool) -> dict[str, Any]:
    rx, tx = (counters[8:12], counters[0:4]) if swapped else (counters[0:4], counters[8:12])
    p = f"net.{i}."
    return {p + "name": dev, p + "rx.bytes": rx[0], p + "rx.pkts": rx[1], p + "rx.errs": rx[2], p + "rx.drop": rx[3],
            p + "tx.bytes": tx[0], p + "tx.pkts": tx[1], p + "tx.errs": tx[2], p + "tx.drop": tx[3]}


def _alias(entry: Mapping[str, Any]) -> str:
    """The libvirt device alias of a query-block/query-blockstats entry ("virtio-disk0", from
    qdev /machine/peripheral/<alias>/...; the drive id for a device without a qdev path)."""
    qdev = str(entry.get("qdev") or "")
    parts = qdev.split("/")
    return parts[3] if qdev.startswith("/machine/peripheral/") and len(parts) > 3 else str(entry.get("device") or "")


def blockstats_by_alias(reply: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, int]]:
    """query-blockstats -> device alias -> counters."""
    out: dict[str, dict[str, int]] = {}
    for entry in reply:
        s = entry.get("stats") or {}
        out[_alias(entry)] = {"rd.reqs": int(s.get("rd_operations", 0)), "rd.bytes": int(s.get("rd_bytes", 0)),
                      "rd.times": int(s.get("rd_total_time_ns", 0)), "wr.reqs": int(s.get("wr_operations", 0)),
                      "wr.bytes": int(s.get("wr_bytes", 0)), "wr.times": int(s.get("wr_total_time_ns", 0)),
                      "fl.reqs": int(s.get("flush_operations", 0)), "fl.times": int(s.get("flush_total_time_ns", 0))}
    return out


def capacity_by_alias(reply: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    """query-block -> device alias -> the image's virtual size (a drive with no medium has none)."""
    out: dict[str, int] = {}
    for entry in reply:
        image = (entry.get("inserted") or {}).get("image") or {}
        if "virtual-size" in image:
            out[_alias(entry)] = int(image["virtual-size"])
    return out


def guest_memory_keys(reply: Mapping[str, Any]) -> dict[str, int]:
    """qom-get guest-stats -> libvirt's balloon.* names (KiB); a figure the guest never sent is left out."""
    stats = reply.get("stats") or {}
    out: dict[str, int] = {}
    for qemu_name, key in (("stat-free-memory", "unused"), ("stat-total-memory", "available"),
                           ("stat-available-memory", "usable"), ("stat-disk-caches", "disk_caches")):
        value = stats.get(qemu_name)
        if isinstance(value, int) and value >= 0:
            out[key] = value // 1024
    if int(reply.get("last-update") or 0) > 0:
        out["last-update"] = int(reply["last-update"])
    return out


def layout_from_xml(xml: str, domain_id: int) -> tuple[Layout | None, str]:
    """(layout without the process and disk sizes, "") or (None, why it has to be sampled through libvirt)."""
    dom = dx.Domain.from_xml(xml)
    devs = dom.devices or dx.Devices()
    nics = []
    for nic in devs.interfaces:
        if nic.type not in KERNEL_NIC_TYPES or not nic.target_dev:
            return None, f"NIC of type {nic.type} has no kernel device"
        nics.append((nic.target_dev, nic.type not in HOST_VIEW_NIC_TYPES))
    disks = []
    for disk in devs.disks:
        if not disk.alias:
            return None, f"disk {disk.target_dev} has no alias"
        disks.append((disk.target_dev or "", disk.alias, disk.source_file or disk.source_dev or ""))
    balloon = devs.memballoon
    qom = ""
    if balloon is not None and balloon.model == "virtio" and (balloon.stats_period or 0) > 0:
        qom = f"/machine/peripheral/{balloon.alias or 'balloon0'}"
    return Layout(domain_id=domain_id, pid=0, starttime=b"", vcpu_tids=(), vcpus_maximum=int(dom.vcpu or 0),
                  nics=tuple(nics), disks=tuple(disks),
                  balloon_current_kib=int(dom.current_memory_kib or dom.memory_kib or 0),
                  balloon_maximum_kib=int(dom.memory_kib or 0), balloon_qom=qom), ""


class VmCounters:
    """Collects every domain's record per sample; keeps one :class:`Layout` per domain run.

    ``call`` runs a function on the libvirt connection in the agent's libvirt pool;
    ``execute(uuid, command, args)`` sends a command on the VM's QMP side channel.
    """

    def __init__(self, call: Call, execute: Execute, *, proc: str = "/proc",
                 clock: Callable[[], float] = time.monotonic, assume_ran: bool = False) -> None:
        self._call = call
        self._execute = execute
        self._proc = proc
        self._clock = clock
        #: Take every guest for one whose vCPUs ran since the last read (benchmarks: what a host
        #: of running guests costs, measured on paused ones).
        self.assume_ran = assume_ran
        self._layouts: dict[str, Layout] = {}
        self._fallback: dict[str, tuple[int, float, str]] = {}  # uuid -> (domain id, since, why)
        self._inflight: set[tuple[str, str]] = set()  # (uuid, "block" | "memory") asked, not answered
        self._limit = asyncio.Semaphore(MAX_CONCURRENT)
        #: Monitor commands sent, and VMs sampled through libvirt, since start (tests, benchmarks).
        self.queries = 0
        self.fallbacks = 0

    def forget(self, uuid: str) -> None:
        """The definition changed (device plugged, balloon set) or went: read it again."""
        self._layouts.pop(uuid, None)
        self._fallback.pop(uuid, None)

    async def collect(self, groups: Sequence[str], flags: int) -> list[Record]:
        """One record per domain: the STATE group from libvirt, the rest as described above."""
        import libvirt

        def states(conn: Any) -> list[tuple[Any, str, str, int, dict[str, Any]]]:
            records = conn.getAllDomainStats(libvirt.VIR_DOMAIN_STATS_STATE, libvirt.VIR_CONNECT_GET_ALL_DOMAINS_STATS_NOWAIT)
            return [(dom, dom.UUIDString(), dom.name(), dom.ID(), stats) for dom, stats in records]

        now = self._clock()
        rows = await self._call(states)
        live = {uuid for _, uuid, _, dom_id, _ in rows if dom_id > 0}
        for gone in [u for u in self._layouts if u not in live]:
            del self._layouts[gone]
        await self._refresh_layouts([(dom, uuid, dom_id) for dom, uuid, _, dom_id, _ in rows if dom_id > 0], now)
        with open(f"{self._proc}/net/dev", "rb") as fh:
            netdev = parse_net_dev(fh.read())
        out: list[Record] = []
        slow: list[tuple[Any, int]] = []
        queries: list[Awaitable[None]] = []
        for index, (dom, uuid, name, dom_id, stats) in enumerate(rows):
            record = dict(stats)
            out.append((uuid, name, record))
            if dom_id <= 0:
                continue
            layout = self._layouts.get(uuid)
            if layout is not None and not self._host_figures(layout, record, netdev, groups):
                # A NIC not in /proc/net/dev, a QEMU that is not the one read: through libvirt,
                # and not rebuilt every sample (the layout is read again with a new domain id).
                del self._layouts[uuid]
                self._fallback[uuid] = (dom_id, now, "the host's figures do not match the definition")
                layout = None
            if layout is None:
                slow.append((dom, index))
                continue
            queries.extend(self._due_queries(uuid, layout, groups, now))
        if queries:
            await asyncio.wait([asyncio.ensure_future(q) for q in queries], timeout=QUERY_DEADLINE_S)
        for uuid, _, record in out:
            layout = self._layouts.get(uuid)
            if layout is not None:
                self._monitor_figures(layout, record, groups)
        if slow:
            self.fallbacks += len(slow)
            await self._libvirt_records(slow, flags, out)
        return out

    # -- layouts ------------------------------------------------------------------------------

    async def _refresh_layouts(self, active: list[tuple[Any, str, int]], now: float) -> None:
        wanted = []
        for dom, uuid, dom_id in active:
            have = self._layouts.get(uuid)
            if have is not None and have.domain_id == dom_id:
                continue
            parked = self._fallback.get(uuid)
            if parked is not None and parked[0] == dom_id and now - parked[1] < FALLBACK_RETRY_S:
                continue
            wanted.append((dom, uuid, dom_id))
        if wanted:
            await asyncio.gather(*(self._build(dom, uuid, dom_id, now) for dom, uuid, dom_id in wanted))

    async def _build(self, dom: Any, uuid: str, dom_id: int, now: float) -> None:
        async with self._limit:
            try:
                xml = await self._call(lambda _conn: dom.XMLDesc(0))
                layout, why = layout_from_xml(xml, dom_id)
                if layout is not None:
                    # Sizes from QEMU on the side channel, not virDomainGetBlockInfo: a QEMU stuck
                    # on dead storage must cost a deadline here, not a libvirt thread.
                    sizes = capacity_by_alias(await self._execute(uuid, "query-block", None))
                    layout.capacity = {dev: sizes[alias] for dev, alias, _ in layout.disks if alias in sizes}
                    cpus = await self._execute(uuid, "query-cpus-fast", None)
                    layout.vcpu_tids = tuple(int(c["thread-id"]) for c in sorted(cpus, key=lambda c: int(c.get("cpu-index", 0))))
                    layout.pid = self._thread_group(layout.vcpu_tids[0]) if layout.vcpu_tids else 0
                    layout.starttime = read_stat(self._proc, layout.pid)[0] if layout.pid else b""
                    if not layout.pid:
                        layout, why = None, "QEMU reported no vCPU threads"
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # no side channel, the domain stopped meanwhile, a closed monitor
                layout, why = None, str(exc)
        if layout is None:
            self._fallback[uuid] = (dom_id, now, why)
            log.info("event=stats.libvirt_sampled vm=%s why=%r", uuid, why)
        else:
            self._fallback.pop(uuid, None)
            self._layouts[uuid] = layout

    def _thread_group(self, tid: int) -> int:
        with open(f"{self._proc}/{tid}/status", "rb") as fh:
            for line in fh:
                if line.startswith(b"Tgid:"):
                    return int(line.split()[1])
        return 0

    # -- per sample -----------------------------------------------------------------------------

    def _host_figures(self, layout: Layout, record: dict[str, Any], netdev: Mapping[str, tuple[int, ...]],
                      groups: Sequence[str]) -> bool:
        """Add what /proc gives; False when the process or a device is not what the layout says."""
        try:
            start, user, system, rss = read_stat(self._proc, layout.pid)
            if start != layout.starttime:
                return False  # another process took the pid: the domain restarted
            vcpu = [read_schedstat(self._proc, layout.pid, tid) for tid in layout.vcpu_tids]
        except (OSError, ValueError, IndexError):
            return False
        if any(dev not in netdev for dev, _ in layout.nics):
            return False
        layout.vcpu_ns = sum(run for run, _ in vcpu)
        if "cpu-total" in groups:
            record.update({"cpu.time": user + system, "cpu.user": user, "cpu.system": system})
        if "vcpu" in groups:
            record["vcpu.current"] = len(layout.vcpu_tids)
            record["vcpu.maximum"] = layout.vcpus_maximum or len(layout.vcpu_tids)
            for i, (run, wait) in enumerate(vcpu):
                record.update({f"vcpu.{i}.state": 1, f"vcpu.{i}.time": run, f"vcpu.{i}.wait": wait})
        if "balloon" in groups:
            record.update({"balloon.current": layout.balloon_current_kib, "balloon.maximum": layout.balloon_maximum_kib,
                           "balloon.rss": rss})
        if "interface" in groups:
            record["net.count"] = len(layout.nics)
            for i, (dev, swapped) in enumerate(layout.nics):
                record.update(nic_keys(i, dev, netdev[dev], swapped))
        return True

    def _due_queries(self, uuid: str, layout: Layout, groups: Sequence[str], now: float) -> list[Awaitable[None]]:
        # A query the last sample sent that has not come back is not sent again: nothing piles
        # up behind a stuck monitor.
        due: list[Awaitable[None]] = []
        cpu = layout.vcpu_ns
        ran = self.assume_ran
        if "block" in groups and layout.disks and (uuid, "block") not in self._inflight and (
                ran or cpu != layout.block_cpu or now - layout.block_at > MAX_QUIET_S):
            due.append(self._query(uuid, layout, "block", cpu, now))
        memory_age = now - layout.memory_at
        if "balloon" in groups and layout.balloon_qom and (uuid, "memory") not in self._inflight and (
                ((ran or cpu != layout.memory_cpu) and memory_age >= GUEST_MEMORY_MIN_S) or memory_age > MAX_QUIET_S):
            due.append(self._query(uuid, layout, "memory", cpu, now))
        return due

    async def _query(self, uuid: str, layout: Layout, what: str, cpu: int, now: float) -> None:
        self._inflight.add((uuid, what))
        try:
            async with self._limit:
                self.queries += 1
                if what == "block":
                    layout.block = blockstats_by_alias(await self._execute(uuid, "query-blockstats", None))
                    layout.block_cpu, layout.block_at = cpu, now
                else:
                    layout.guest_memory = guest_memory_keys(await self._execute(
                        uuid, "qom-get", {"path": layout.balloon_qom, "property": "guest-stats"}))
                    layout.memory_cpu, layout.memory_at = cpu, now
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.debug("event=stats.query_failed vm=%s what=%s error=%r", uuid, what, str(exc))
        finally:
            self._inflight.discard((uuid, what))

    def _monitor_figures(self, layout: Layout, record: dict[str, Any], groups: Sequence[str]) -> None:
        if "balloon" in groups:
            record.update({f"balloon.{k}": v for k, v in layout.guest_memory.items()})
        if "block" in groups and layout.block:
            record["block.count"] = len(layout.disks)
            for i, (dev, alias, path) in enumerate(layout.disks):
                p = f"block.{i}."
                record.update({p + "name": dev, p + "path": path, p + "capacity": layout.capacity.get(dev, 0)})
                if path.startswith("/"):
                    try:
                        record[p + "allocation"] = os.stat(path).st_blocks * 512
                    except OSError:
                        pass
                record.update({p + k: v for k, v in layout.block.get(alias, {}).items()})

    async def _libvirt_records(self, slow: list[tuple[Any, int]], flags: int, out: list[Record]) -> None:
        import libvirt

        def read(conn: Any) -> list[tuple[Any, dict[str, Any]]]:
            return conn.domainListGetStats([dom for dom, _ in slow], flags, libvirt.VIR_CONNECT_GET_ALL_DOMAINS_STATS_NOWAIT)

        by_uuid = {dom.UUIDString(): stats for dom, stats in await self._call(read)}
        for _, index in slow:
            uuid, name, record = out[index]
            record.update(by_uuid.get(uuid, {}))
