"""Host facts for the VRM: what this hypervisor host is (capabilities) and how busy it is (stats).

Capabilities are probed once at start and cached: topology comes from sysfs/cpuid/MIDR (the
native probe, ~ms), hypervisor facts from libvirt, the KVM verdict from a real firmware boot
(kvmprobe). ``refresh`` re-probes, for CPU hot-plug or hugepage changes.

Stats are sampled on request from psutil. CPU utilisation is computed from the difference
between this call's counters and the previous call's (kept here, not psutil's module-global
baseline, so other psutil users in the process cannot skew it).

Probing and sampling block (sysfs, /proc, psutil): they run in the shared "host" BlockingPool
(``HOST_POOL_THREADS`` threads, ``HOST_POOL_TIMEOUT_S`` per call) that the daemon also uses for
the KVM probe and the placement drift monitor, never on the event loop nor in its default
executor.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

import psutil

from cna_agent import __version__
from cna_agent.blocking import BlockingPool
from cna_agent.hypervisor import Hypervisor, HypervisorFacts
from cna_agent.host.kvmprobe import KvmVerdict
from cna_agent.host.topology import HostTopology, probe_topology


#: The shared "host" pool: sysfs/proc scans, psutil samples, the KVM probe, placement checks.
HOST_POOL_THREADS = 2
HOST_POOL_TIMEOUT_S = 30.0


def host_pool() -> BlockingPool:
    return BlockingPool("host", HOST_POOL_THREADS, HOST_POOL_TIMEOUT_S)


@dataclass(frozen=True)
class CacheSummary:
    level: int
    type: str
    size_kib: int
    instances: int
    cpus_per_instance: int


@dataclass(frozen=True)
class HostNicFacts:
    name: str
    mac: str
    driver: str
    speed_mbps: int
    link_up: bool
    mtu: int
    sriov_total_vfs: int = 0
    sriov_num_vfs: int = 0


@dataclass(frozen=True)
class Capabilities:
    hostname: str
    host_uuid: str
    agent_version: str
    topology: HostTopology
    caches: tuple[CacheSummary, ...]
    hypervisor: HypervisorFacts | None
    hypervisor_connected: bool
    kvm: KvmVerdict
    virt_type: str
    nics: tuple[HostNicFacts, ...]
    kernel_release: str
    os_release: str
    iscsi_iqn: str
    fc_wwpns: tuple[str, ...]
    probe_time: float


@dataclass(frozen=True)
class CpuSample:
    percent: float
    user: float
    system: float
    idle: float
    iowait: float
    steal: float
    per_cpu: tuple[float, ...] = ()


@dataclass(frozen=True)
class Stats:
    time: float
    cpu: CpuSample
    logical_cpus: int
    memory: dict[str, int]
    load: tuple[float, float, float]
    nics: tuple[dict[str, object], ...]
    disks: tuple[dict[str, object], ...]
    uptime_s: float
    vms_running: int
    vms_total: int
    hypervisor_connected: bool
    hypervisor_health: str = "ok"
    extra: dict[str, object] = field(default_factory=dict)


def summarize_caches(topology: HostTopology) -> tuple[CacheSummary, ...]:
    """Group cache instances by (level, type, size) into counts, as lscpu does."""
    groups: Counter[tuple[int, str, int, int]] = Counter()
    for cache in topology.caches:
        groups[(cache.level, cache.type, cache.size_kib, len(cache.cpus))] += 1
    return tuple(
        CacheSummary(level, ctype, size, count, per)
        for (level, ctype, size, per), count in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1]))
    )


def read_os_release(root: str = "/") -> str:
    for candidate in ("etc/os-release", "usr/lib/os-release"):
        path = Path(root, candidate)
        try:
            for line in path.read_text().splitlines():
                if line.startswith("PRETTY_NAME="):
                    return line.split("=", 1)[1].strip().strip('"')
        except OSError:
            continue
    return ""


def read_iscsi_iqn(path: str = "/etc/iscsi/initiatorname.iscsi") -> str:
    try:
        for line in Path(path).read_text().splitlines():
            line = line.strip()
            if line.startswith("InitiatorName="):
                return line.split("=", 1)[1].strip()
    except OSError:
        pass
    return ""


def read_fc_wwpns(sysfs: str = "/sys") -> tuple[str, ...]:
    base = Path(sysfs, "class", "fc_host")
    wwpns: list[str] = []
    try:
        hosts = sorted(base.iterdir())
    except OSError:
        return ()
    for host in hosts:
        try:
            raw = (host / "port_name").read_text().strip()
        except OSError:
            continue
        hexdigits = raw.lower().removeprefix("0x").rjust(16, "0")
        wwpns.append(":".join(hexdigits[i : i + 2] for i in range(0, 16, 2)))
    return tuple(wwpns)


def read_nics(sysfs: str = "/sys") -> tuple[HostNicFacts, ...]:
    """Physical-ish NICs (those with a device link) plus bridges/bonds the admin made."""
    nics: list[HostNicFacts] = []
    base = Path(sysfs, "class", "net")
    try:
        names = sorted(p.name for p in base.iterdir())
    except OSError:
        return ()
    for name in names:
        if name == "lo":
            continue
        d = base / name

        def read(rel: str, default: str = "") -> str:
            try:
                return (d / rel).read_text().strip()
            except OSError:
                return default

        driver = ""
        try:
            driver = os.path.basename(os.readlink(d / "device" / "driver"))
        except OSError:
            pass
        speed = read("speed", "-1")
        nics.append(
            HostNicFacts(
                name=name,
                mac=read("address"),
                driver=driver,
                speed_mbps=int(speed) if speed.lstrip("-").isdigit() else -1,
                link_up=read("operstate") == "up",
                mtu=int(read("mtu", "0") or 0),
                sriov_total_vfs=int(read("device/sriov_totalvfs", "0") or 0),
                sriov_num_vfs=int(read("device/sriov_numvfs", "0") or 0),
            )
        )
    return tuple(nics)


def _stable_host_uuid(configured: str, facts: HypervisorFacts | None) -> str:
    if configured:
        return configured
    try:
        machine_id = Path("/etc/machine-id").read_text().strip()
        if len(machine_id) == 32:
            return str(uuid.UUID(machine_id))
    except (OSError, ValueError):
        pass
    return facts.host_uuid if facts else ""


class HostService:
    def __init__(
        self,
        hypervisor: Hypervisor | None,
        *,
        kvm: KvmVerdict,
        virt_type: str,
        host_uuid: str = "",
        topology_root: str = "/",
        pool: BlockingPool | None = None,
    ) -> None:
        #: The shared host pool (the daemon's); a pool of its own when none is given.
        self.pool = pool or host_pool()
        self._hv = hypervisor
        self._kvm = kvm
        self._virt_type = virt_type
        self._host_uuid = host_uuid
        self._root = topology_root
        self._caps: Capabilities | None = None
        self._caps_lock = asyncio.Lock()
        self._last_cpu: tuple[float, object, list] | None = None

    @property
    def virt_type(self) -> str:
        return self._virt_type

    async def capabilities(self, refresh: bool = False) -> Capabilities:
        async with self._caps_lock:
            if self._caps is None or refresh:
                self._caps = await self.pool.run(self._probe, what="host capabilities probe")
            caps = self._caps
        connected = self._hv is not None and self._hv.connected
        if caps.hypervisor_connected != connected:

            caps = replace(caps, hypervisor_connected=connected, hypervisor=self._hv.facts if self._hv else None)
        return caps

    def _probe(self) -> Capabilities:
        topology = probe_topology(self._root)
        facts = self._hv.facts if self._hv is not None else None
        uname = os.uname()
        return Capabilities(
            hostname=socket.gethostname(),
            host_uuid=_stable_host_uuid(self._host_uuid, facts),
            agent_version=__version__,
            topology=topology,
            caches=summarize_caches(topology),
            hypervisor=facts,
            hypervisor_connected=self._hv is not None and self._hv.connected,
            kvm=self._kvm,
            virt_type=self._virt_type,
            nics=read_nics(),
            kernel_release=uname.release,
            os_release=read_os_release(),
            iscsi_iqn=read_iscsi_iqn(),
            fc_wwpns=read_fc_wwpns(),
            probe_time=time.time(),
        )

    async def stats(self, per_cpu: bool = False) -> Stats:
        sample = await self.pool.run(lambda: self._sample(per_cpu), what="host stats sample")
        running = total = 0
        connected = self._hv is not None and self._hv.connected
        if connected:
            try:
                running, total = await self._hv.counts()  # type: ignore[union-attr]
            except Exception:
                connected = False

        return replace(sample, vms_running=running, vms_total=total, hypervisor_connected=connected,
                       hypervisor_health="ok" if connected else "unreachable")

    def _sample(self, per_cpu: bool) -> Stats:
        prev = self._last_cpu
        if prev is None or time.monotonic() - prev[0] < 0.05:
            # First call, or two calls within 50 ms: measure over a short window instead of
            # dividing by (almost) nothing.
            base_total, base_per = psutil.cpu_times(), psutil.cpu_times(percpu=True)
            time.sleep(0.1)
        else:
            _, base_total, base_per = prev
        total_times, per_times = psutil.cpu_times(), psutil.cpu_times(percpu=True)
        self._last_cpu = (time.monotonic(), total_times, per_times)
        cpu = _cpu_delta(base_total, total_times)
        per = tuple(_cpu_delta(a, b).percent for a, b in zip(base_per, per_times)) if per_cpu else ()
        vm = psutil.virtual_memory()
        sw = psutil.swap_memory()
        memory = {
            "total": vm.total, "available": vm.available, "used": vm.used, "free": vm.free,
            "buffers": getattr(vm, "buffers", 0), "cached": getattr(vm, "cached", 0),
            "swap_total": sw.total, "swap_used": sw.used,
        }
        nic_stats = psutil.net_if_stats()
        nics = []
        for name, c in sorted(psutil.net_io_counters(pernic=True).items()):
            st = nic_stats.get(name)
            nics.append({
                "name": name, "rx_bytes": c.bytes_recv, "tx_bytes": c.bytes_sent,
                "rx_packets": c.packets_recv, "tx_packets": c.packets_sent,
                "rx_errors": c.errin, "tx_errors": c.errout, "rx_dropped": c.dropin, "tx_dropped": c.dropout,
                "is_up": bool(st and st.isup), "speed_mbps": (st.speed if st and st.speed else -1), "mtu": st.mtu if st else 0,
            })
        disks = []
        for name, d in sorted((psutil.disk_io_counters(perdisk=True) or {}).items()):
            disks.append({
                "name": name, "read_bytes": d.read_bytes, "write_bytes": d.write_bytes,
                "read_count": d.read_count, "write_count": d.write_count,
                "read_time_ms": d.read_time, "write_time_ms": d.write_time,
                "busy_time_ms": getattr(d, "busy_time", 0),
            })
        return Stats(
            time=time.time(),
            cpu=CpuSample(cpu.percent, cpu.user, cpu.system, cpu.idle, cpu.iowait, cpu.steal, per),
            logical_cpus=psutil.cpu_count() or 0,
            memory=memory,
            load=os.getloadavg(),
            nics=tuple(nics),
            disks=tuple(disks),
            uptime_s=time.time() - psutil.boot_time(),
            vms_running=0,
            vms_total=0,
            hypervisor_connected=False,
        )


def _cpu_delta(a, b) -> CpuSample:
    fields = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")
    da = {f: max(0.0, getattr(b, f, 0.0) - getattr(a, f, 0.0)) for f in fields}
    total = sum(da.values()) or 1e-9
    pct = {f: 100.0 * v / total for f, v in da.items()}
    busy = 100.0 - pct["idle"] - pct["iowait"]
    return CpuSample(
        percent=round(max(0.0, busy), 2),
        user=round(pct["user"] + pct["nice"], 2),
        system=round(pct["system"] + pct["irq"] + pct["softirq"], 2),
        idle=round(pct["idle"], 2),
        iowait=round(pct["iowait"], 2),
        steal=round(pct["steal"], 2),
    )
