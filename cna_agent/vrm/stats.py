"""VM statistics that scale: one sample of every VM per interval, never a call per VM and metric.

Asking libvirt per VM and per metric (dom.info, dom.blockStats per disk, dom.interfaceStats
per NIC, dom.vcpus...) costs a round trip and a QEMU monitor query each, so a host with
hundreds of guests spends its time polling (VDSM's sampling threads learned this).
``virConnectGetAllDomainStats`` returns the requested groups for all domains in one call, and
with ``..._STATS_NOWAIT`` a VM whose monitor is busy (a migration, a hung storage job) is
answered from what libvirt already has instead of stalling the whole sample. Even so, that
call costs QEMU a monitor round trip per VM and group; compute's VmCounters (the default
``collect``) takes each figure from its cheapest correct source instead (/proc for CPU, vCPU,
RSS and NICs, one QMP read for disks only from guests that ran) and keeps libvirt's bulk call
for the domains it cannot read that way.

Counters are cumulative; rates (CPU percent of one host CPU, disk and NIC bytes per second)
are the difference between this sample and the previous one over the elapsed monotonic time.
A counter that went backwards (the VM restarted, a disk was re-plugged) gives rate 0, not a
negative or absurd number.

Parsing is pure (``parse_records``) so it is tested on recorded bulk-call output as well as on
a live libvirt.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Mapping, Sequence

log = logging.getLogger(__name__)

#: Config group name -> libvirt VIR_DOMAIN_STATS_* constant name.
GROUP_FLAGS: dict[str, str] = {
    "state": "VIR_DOMAIN_STATS_STATE",
    "cpu-total": "VIR_DOMAIN_STATS_CPU_TOTAL",
    "vcpu": "VIR_DOMAIN_STATS_VCPU",
    "balloon": "VIR_DOMAIN_STATS_BALLOON",
    "block": "VIR_DOMAIN_STATS_BLOCK",
    "interface": "VIR_DOMAIN_STATS_INTERFACE",
}


def parse_groups(text: str) -> tuple[str, ...]:
    """"state,cpu-total" -> ("state", "cpu-total"); unknown names raise ValueError naming them."""
    groups = tuple(dict.fromkeys(g.strip() for g in text.split(",") if g.strip()))
    unknown = [g for g in groups if g not in GROUP_FLAGS]
    if unknown:
        raise ValueError(f"unknown stats groups {unknown} (known: {', '.join(GROUP_FLAGS)})")
    return groups


def stats_flags(groups: Sequence[str]) -> int:
    import libvirt

    flags = 0
    for g in groups:
        flags |= getattr(libvirt, GROUP_FLAGS[g])
    return flags


@dataclass(frozen=True)
class DiskSample:
    name: str
    path: str = ""
    read_bytes: int = 0
    write_bytes: int = 0
    read_requests: int = 0
    write_requests: int = 0
    flush_requests: int = 0
    read_time_ns: int = 0
    write_time_ns: int = 0
    capacity_bytes: int = 0
    allocation_bytes: int = 0
    read_bytes_per_s: float = 0.0
    write_bytes_per_s: float = 0.0


@dataclass(frozen=True)
class NicSample:
    name: str
    rx_bytes: int = 0
    tx_bytes: int = 0
    rx_packets: int = 0
    tx_packets: int = 0
    rx_errors: int = 0
    tx_errors: int = 0
    rx_dropped: int = 0
    tx_dropped: int = 0
    rx_bytes_per_s: float = 0.0
    tx_bytes_per_s: float = 0.0


@dataclass(frozen=True)
class VcpuSample:
    id: int
    state: int
    time_ns: int


@dataclass(frozen=True)
class VmSample:
    uuid: str
    name: str
    state: str = "unknown"
    reason: str = ""
    cpu_time_ns: int = 0
    cpu_percent: float = 0.0
    vcpus_current: int = 0
    vcpus_maximum: int = 0
    vcpus: tuple[VcpuSample, ...] = ()
    balloon_current_kib: int = 0
    balloon_maximum_kib: int = 0
    rss_kib: int = 0
    unused_kib: int = 0
    available_kib: int = 0
    disks: tuple[DiskSample, ...] = ()
    nics: tuple[NicSample, ...] = ()


@dataclass(frozen=True)
class StatsSnapshot:
    time: float
    monotonic: float
    #: Seconds since the previous sample (the rates' window); 0 for the first.
    interval_s: float
    vms: tuple[VmSample, ...] = ()
    #: Wall seconds the bulk call took, and the process CPU seconds collecting + parsing took.
    call_s: float = 0.0
    cpu_s: float = 0.0
    error: str = ""


def _rate(new: int, old: int | None, dt: float) -> float:
    if old is None or dt <= 0 or new < old:
        return 0.0
    return (new - old) / dt


def _map_state(state: int, reason: int) -> tuple[str, str]:
    from cna_agent.compute.state import map_state

    return map_state(state, reason)


def parse_record(uuid: str, name: str, raw: Mapping[str, Any], prev: VmSample | None, dt: float) -> VmSample:
    """One domain's bulk-stats dict (libvirt's flat "block.0.rd.bytes" keys) -> VmSample."""
    get = raw.get
    state, reason = ("unknown", "")
    if "state.state" in raw:
        state, reason = _map_state(int(raw["state.state"]), int(get("state.reason", 0)))
    cpu_time = int(get("cpu.time", 0))
    cpu_pct = 0.0
    if prev is not None and "cpu.time" in raw:
        cpu_pct = round(100.0 * _rate(cpu_time, prev.cpu_time_ns, dt) / 1e9, 2)
    vcpus = []
    vmax = int(get("vcpu.maximum", 0))
    for i in range(vmax):
        if f"vcpu.{i}.state" in raw or f"vcpu.{i}.time" in raw:
            vcpus.append(VcpuSample(i, int(get(f"vcpu.{i}.state", 0)), int(get(f"vcpu.{i}.time", 0))))
    prev_disks = {d.name: d for d in prev.disks} if prev else {}
    disks = []
    for i in range(int(get("block.count", 0))):
        p = f"block.{i}."
        dname = str(get(p + "name", f"block{i}"))
        old = prev_disks.get(dname)
        rd, wr = int(get(p + "rd.bytes", 0)), int(get(p + "wr.bytes", 0))
        disks.append(DiskSample(
            name=dname, path=str(get(p + "path", "")), read_bytes=rd, write_bytes=wr,
            read_requests=int(get(p + "rd.reqs", 0)), write_requests=int(get(p + "wr.reqs", 0)),
            flush_requests=int(get(p + "fl.reqs", 0)), read_time_ns=int(get(p + "rd.times", 0)),
            write_time_ns=int(get(p + "wr.times", 0)), capacity_bytes=int(get(p + "capacity", 0)),
            allocation_bytes=int(get(p + "allocation", 0)),
            read_bytes_per_s=round(_rate(rd, old.read_bytes if old else None, dt), 1),
            write_bytes_per_s=round(_rate(wr, old.write_bytes if old else None, dt), 1),
        ))
    prev_nics = {n.name: n for n in prev.nics} if prev else {}
    nics = []
    for i in range(int(get("net.count", 0))):
        p = f"net.{i}."
        nname = str(get(p + "name", f"net{i}"))
        old = prev_nics.get(nname)
        rx, tx = int(get(p + "rx.bytes", 0)), int(get(p + "tx.bytes", 0))
        nics.append(NicSample(
            name=nname, rx_bytes=rx, tx_bytes=tx, rx_packets=int(get(p + "rx.pkts", 0)), tx_packets=int(get(p + "tx.pkts", 0)),
            rx_errors=int(get(p + "rx.errs", 0)), tx_errors=int(get(p + "tx.errs", 0)),
            rx_dropped=int(get(p + "rx.drop", 0)), tx_dropped=int(get(p + "tx.drop", 0)),
            rx_bytes_per_s=round(_rate(rx, old.rx_bytes if old else None, dt), 1),
            tx_bytes_per_s=round(_rate(tx, old.tx_bytes if old else None, dt), 1),
        ))
    return VmSample(
        uuid=uuid, name=name, state=state, reason=reason, cpu_time_ns=cpu_time, cpu_percent=cpu_pct,
        vcpus_current=int(get("vcpu.current", 0)), vcpus_maximum=vmax, vcpus=tuple(vcpus),
        balloon_current_kib=int(get("balloon.current", 0)), balloon_maximum_kib=int(get("balloon.maximum", 0)),
        rss_kib=int(get("balloon.rss", 0)), unused_kib=int(get("balloon.unused", 0)),
        available_kib=int(get("balloon.available", 0)), disks=tuple(disks), nics=tuple(nics),
    )


def parse_records(records: Sequence[tuple[str, str, Mapping[str, Any]]], prev: Mapping[str, VmSample], dt: float) -> tuple[VmSample, ...]:
    return tuple(parse_record(u, n, raw, prev.get(u), dt) for u, n, raw in records)


def bulk_call(conn: Any, flags: int) -> list[tuple[str, str, dict[str, Any]]]:
    """The one libvirt call (run in the hypervisor pool): every domain's requested groups."""
    import libvirt

    try:
        records = conn.getAllDomainStats(flags, libvirt.VIR_CONNECT_GET_ALL_DOMAINS_STATS_NOWAIT)
    except libvirt.libvirtError as exc:
        # Drivers without NOWAIT support refuse the flag; ask again without it.
        if exc.get_error_code() not in (libvirt.VIR_ERR_INVALID_ARG, libvirt.VIR_ERR_NO_SUPPORT):
            raise
        records = conn.getAllDomainStats(flags, 0)
    return [(dom.UUIDString(), dom.name(), stats) for dom, stats in records]


#: (groups, their libvirt flags) -> one (uuid, name, libvirt-style flat stats) per domain.
Collect = Callable[[Sequence[str], int], Awaitable[Sequence[tuple[str, str, Mapping[str, Any]]]]]


class StatsSampler:
    """Samples all VMs every ``interval_s`` and keeps the latest snapshot for its readers.

    Readers (VRM heartbeats, the metrics endpoint) take :attr:`latest` instead of sampling on
    demand, so a burst of scrapes or a fast heartbeat never multiplies libvirt calls.
    """

    def __init__(self, call: Callable[[Callable[[Any], Any]], Awaitable[Any]], *, interval_s: float,
                 groups: Sequence[str], host_stats: Callable[[], Awaitable[Any]] | None = None,
                 clock: Callable[[], float] = time.monotonic, collect: Collect | None = None) -> None:
        self._call = call
        #: Where the records come from: compute's VmCounters (each figure from its cheapest
        #: source), or None for libvirt's bulk call alone ([stats] vm_sources = "libvirt").
        self._collect = collect
        self._host_stats = host_stats
        #: The host's latest psutil sample (cna_agent.host.service.Stats), sampled with the VMs.
        self.latest_host: Any = None
        self.interval_s = interval_s
        self.groups = tuple(groups)
        self._flags: int | None = None
        self._clock = clock
        self._prev: dict[str, VmSample] = {}
        self._prev_mono: float | None = None
        self.latest: StatsSnapshot | None = None
        self.samples = 0
        self.errors = 0
        self._task: asyncio.Task | None = None

    async def sample(self) -> StatsSnapshot:
        if self._flags is None:
            self._flags = stats_flags(self.groups)
        flags = self._flags
        cpu0 = time.process_time()
        t0 = time.perf_counter()
        if self._collect is not None:
            records = await self._collect(self.groups, flags)
        else:
            records = await self._call(lambda conn: bulk_call(conn, flags))
        call_s = time.perf_counter() - t0
        now = self._clock()
        dt = 0.0 if self._prev_mono is None else now - self._prev_mono
        vms = parse_records(records, self._prev, dt)
        self._prev = {v.uuid: v for v in vms}
        self._prev_mono = now
        snap = StatsSnapshot(time=time.time(), monotonic=now, interval_s=round(dt, 3), vms=vms,
                             call_s=call_s, cpu_s=time.process_time() - cpu0)
        self.latest = snap
        self.samples += 1
        return snap

    async def run(self) -> None:
        """Sample forever; a failed sample (libvirt down) is logged and retried next interval."""
        while True:
            if self._host_stats is not None:
                try:
                    self.latest_host = await self._host_stats()
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    log.warning("event=stats.host_sample_failed error=%r", str(exc))
            try:
                await self.sample()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.errors += 1
                log.warning("event=stats.sample_failed error=%r", str(exc))
            await asyncio.sleep(self.interval_s)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self.run(), name="stats-sampler")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
            self._task = None

