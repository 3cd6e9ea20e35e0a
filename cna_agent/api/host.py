"""HostService: capabilities and stats, translated from cna_agent.host.service."""

from __future__ import annotations

from typing import TYPE_CHECKING

import grpc

from cna_agent.api import pb
from cna_agent.api.convert import timestamp
from cna_agent.api.maintenance import MaintenanceCalls
from cna_agent.errors import Unimplemented
from cna_agent.host.service import Capabilities, HostService, Stats

if TYPE_CHECKING:
    from cna_agent.compute.evacuation import HostEvacuation
    from cna_agent.host.drift import HostPlacementReport, PlacementMonitor

_ARCH = {"x86_64": pb.common_pb2.ARCH_X86_64, "aarch64": pb.common_pb2.ARCH_AARCH64}
_HEALTH = {"ok": pb.common_pb2.HEALTH_OK, "degraded": pb.common_pb2.HEALTH_DEGRADED, "unreachable": pb.common_pb2.HEALTH_UNREACHABLE}


def capabilities_to_pb(caps: Capabilities) -> pb.host_pb2.HostCapabilities:
    topo = caps.topology
    hv = caps.hypervisor
    midr = None
    if topo.midr is not None:
        m = topo.midr
        midr = pb.host_pb2.MidrInfo(
            raw=m.raw, implementer=m.implementer, implementer_name=m.implementer_name, variant=m.variant,
            architecture=m.architecture, part=m.part, part_name=m.part_name, revision=m.revision,
        )
    return pb.host_pb2.HostCapabilities(
        hostname=caps.hostname,
        host_uuid=caps.host_uuid,
        agent_version=caps.agent_version,
        cpu=pb.host_pb2.CpuInfo(
            arch=_ARCH.get(topo.arch, pb.common_pb2.ARCH_UNSPECIFIED),
            vendor=topo.cpu_vendor,
            model=topo.cpu_model,
            midr=midr,
            hw_virt=topo.hw_virt,
            kvm_available=caps.kvm.usable,
            virt_type=caps.virt_type,
            kvm_unusable_reason="" if caps.kvm.usable else caps.kvm.reason,
        ),
        topology=pb.host_pb2.CpuTopology(
            sockets=topo.sockets,
            dies_per_socket=topo.dies_per_socket,
            clusters_per_die=topo.clusters_per_die,
            cores_per_cluster=topo.cores_per_cluster,
            threads_per_core=topo.threads_per_core,
            logical_cpus=len(topo.cpus),
            online_cpus=list(topo.online_cpus),
            cpus=[
                pb.host_pb2.LogicalCpu(
                    id=c.id, online=c.online, socket=c.socket, die=c.die, cluster=c.cluster, core=c.core,
                    numa_node=c.node, thread_siblings=list(c.thread_siblings),
                )
                for c in topo.cpus
            ],
        ),
        numa_nodes=[
            pb.host_pb2.NumaNode(
                id=n.id, cpus=list(n.cpus), memory_total_bytes=n.memory_total_kib * 1024,
                memory_free_bytes=n.memory_free_kib * 1024, distances=list(n.distances),
                hugepages=[pb.host_pb2.HugePagePool(page_size_kib=h.size_kib, total=h.total, free=h.free) for h in n.hugepages],
            )
            for n in topo.numa_nodes
        ],
        caches=[
            pb.host_pb2.CacheInfo(level=c.level, type=c.type, size_bytes=c.size_kib * 1024, instances=c.instances, cpus_per_instance=c.cpus_per_instance)
            for c in caps.caches
        ],
        memory_total_bytes=topo.memory_total_kib * 1024,
        hugepages=[pb.host_pb2.HugePagePool(page_size_kib=h.size_kib, total=h.total, free=h.free) for h in topo.hugepages],
        hypervisor=pb.host_pb2.HypervisorInfo(
            type=hv.hypervisor_type if hv else "",
            version=hv.hypervisor_version if hv else "",
            libvirt_version=hv.libvirt_version if hv else "",
            uri=hv.uri if hv else "",
            mode=hv.mode if hv else "",
            connected=caps.hypervisor_connected,
            machine_types=list(hv.machine_types) if hv else [],
            firmware=list(hv.firmware) if hv else [],
            secure_boot=hv.secure_boot if hv else False,
        ),
        initiators=pb.host_pb2.Initiators(iscsi_iqn=caps.iscsi_iqn, fc_wwpns=list(caps.fc_wwpns)),
        nics=[
            pb.host_pb2.HostNic(name=n.name, mac=n.mac, driver=n.driver, speed_mbps=n.speed_mbps, link_up=n.link_up,
                                mtu=n.mtu, sriov_total_vfs=n.sriov_total_vfs, sriov_num_vfs=n.sriov_num_vfs)
            for n in caps.nics
        ],
        kernel_release=caps.kernel_release,
        os_release=caps.os_release,
        probe_time=timestamp(caps.probe_time),
    )


def stats_to_pb(stats: Stats) -> pb.host_pb2.HostStats:
    m = stats.memory
    return pb.host_pb2.HostStats(
        time=timestamp(stats.time),
        cpu=pb.host_pb2.CpuStats(
            percent=stats.cpu.percent, user_percent=stats.cpu.user, system_percent=stats.cpu.system,
            idle_percent=stats.cpu.idle, iowait_percent=stats.cpu.iowait, steal_percent=stats.cpu.steal,
            per_cpu_percent=list(stats.cpu.per_cpu), logical_cpus=stats.logical_cpus,
        ),
        memory=pb.host_pb2.MemoryStats(
            total_bytes=m["total"], available_bytes=m["available"], used_bytes=m["used"], free_bytes=m["free"],
            buffers_bytes=m["buffers"], cached_bytes=m["cached"], swap_total_bytes=m["swap_total"], swap_used_bytes=m["swap_used"],
        ),
        load=pb.host_pb2.LoadAverage(load1=stats.load[0], load5=stats.load[1], load15=stats.load[2]),
        nics=[pb.host_pb2.NicCounters(**n) for n in stats.nics],
        disks=[pb.host_pb2.DiskCounters(**d) for d in stats.disks],
        uptime_seconds=stats.uptime_s,
        vms_running=stats.vms_running,
        vms_total=stats.vms_total,
        hypervisor_health=_HEALTH.get(stats.hypervisor_health, pb.common_pb2.HEALTH_UNSPECIFIED),
    )


def placement_to_pb(report: "HostPlacementReport") -> pb.host_pb2.PlacementReport:
    vms = []
    for v in report.vms:
        plan = v.plan
        vms.append(pb.host_pb2.VmPlacement(
            vm_uuid=v.uuid, vm_name=v.name, state=v.state, qemu_pid=v.pid, dedicated=plan.dedicated,
            memory_nodes=list(plan.memory_nodes), memory_mode=plan.memory_mode, hugepage_kib=plan.hugepage_kib or 0,
            emulator_cpus=list(plan.emulator_cpus),
            memory=[pb.host_pb2.NodeMemory(node=n, resident_bytes=k * 1024, planned=n in plan.memory_nodes)
                    for n, k in sorted(v.memory_kib.items())],
            threads=[pb.host_pb2.ThreadPlacement(
                tid=t.tid, name=t.name, role=t.role, index=t.index, planned_cpus=list(t.planned),
                allowed_cpus=list(t.allowed), last_cpu=t.last_cpu, cpu_seconds=t.cpu_seconds, drifted=t.drifted)
                for t in v.threads],
            drift=list(v.drift),
        ))
    return pb.host_pb2.PlacementReport(time=timestamp(report.time), reserved_cpus=list(report.reserved_cpus),
                                       shared_cpus=list(report.shared_cpus), vms=vms, native=report.native)


class HostServicer(MaintenanceCalls, pb.host_pb2_grpc.HostServiceServicer):
    """``placement``: the placement component's drift monitor; that component registers this
    servicer with it (replacing the daemon's plain one), so GetPlacement answers only where a
    planner runs. ``maintenance``: the evacuation (SetMaintenance/GetMaintenance, api/maintenance.py)."""

    def __init__(self, service: HostService, placement: "PlacementMonitor | None" = None,
                 maintenance: "HostEvacuation | None" = None) -> None:
        self._service = service
        self._placement = placement
        self._maintenance = maintenance

    async def GetPlacement(self, request: pb.host_pb2.GetPlacementRequest, context: grpc.aio.ServicerContext) -> pb.host_pb2.PlacementReport:
        from cna_agent.host.drift import host_report

        if self._placement is None:
            raise Unimplemented("this agent runs no placement planner")
        return placement_to_pb(await host_report(self._placement, request.vm))

    async def GetCapabilities(self, request: pb.host_pb2.GetCapabilitiesRequest, context: grpc.aio.ServicerContext) -> pb.host_pb2.HostCapabilities:
        return capabilities_to_pb(await self._service.capabilities(refresh=request.refresh))

    async def GetStats(self, request: pb.host_pb2.GetStatsRequest, context: grpc.aio.ServicerContext) -> pb.host_pb2.HostStats:
        return stats_to_pb(await self._service.stats(per_cpu=request.per_cpu))
