"""Stats samples -> the cna.v1 messages the VRM link sends (translation only)."""

from __future__ import annotations

from cna_agent.api import pb
from cna_agent.vrm.stats import VmSample

_STATE = {
    "stopped": pb.vm_pb2.VM_STATE_STOPPED, "running": pb.vm_pb2.VM_STATE_RUNNING, "paused": pb.vm_pb2.VM_STATE_PAUSED,
    "shutting_down": pb.vm_pb2.VM_STATE_SHUTTING_DOWN, "crashed": pb.vm_pb2.VM_STATE_CRASHED,
    "migrating": pb.vm_pb2.VM_STATE_MIGRATING, "suspended": pb.vm_pb2.VM_STATE_SUSPENDED,
    "starting": pb.vm_pb2.VM_STATE_STARTING, "unknown": pb.vm_pb2.VM_STATE_UNKNOWN,
    "hibernated": pb.vm_pb2.VM_STATE_HIBERNATED,
}


def vm_stats_to_pb(s: VmSample) -> pb.vrm_pb2.VmStats:
    v = pb.vrm_pb2
    return v.VmStats(
        uuid=s.uuid, name=s.name, state=_STATE.get(s.state, pb.vm_pb2.VM_STATE_UNKNOWN),
        cpu_time_ns=s.cpu_time_ns, cpu_percent=s.cpu_percent,
        vcpus_current=s.vcpus_current, vcpus_maximum=s.vcpus_maximum,
        vcpus=[v.VcpuStats(id=c.id, state=c.state, time_ns=c.time_ns) for c in s.vcpus],
        balloon_current_bytes=s.balloon_current_kib * 1024, balloon_maximum_bytes=s.balloon_maximum_kib * 1024,
        memory_rss_bytes=s.rss_kib * 1024, memory_unused_bytes=s.unused_kib * 1024,
        memory_available_bytes=s.available_kib * 1024,
        disks=[v.VmDiskStats(
            name=d.name, path=d.path, read_bytes=d.read_bytes, write_bytes=d.write_bytes,
            read_requests=d.read_requests, write_requests=d.write_requests, flush_requests=d.flush_requests,
            read_time_ns=d.read_time_ns, write_time_ns=d.write_time_ns, capacity_bytes=d.capacity_bytes,
            allocation_bytes=d.allocation_bytes, read_bytes_per_second=d.read_bytes_per_s,
            write_bytes_per_second=d.write_bytes_per_s,
        ) for d in s.disks],
        nics=[v.VmNicStats(
            name=n.name, rx_bytes=n.rx_bytes, tx_bytes=n.tx_bytes, rx_packets=n.rx_packets, tx_packets=n.tx_packets,
            rx_errors=n.rx_errors, tx_errors=n.tx_errors, rx_dropped=n.rx_dropped, tx_dropped=n.tx_dropped,
            rx_bytes_per_second=n.rx_bytes_per_s, tx_bytes_per_second=n.tx_bytes_per_s,
        ) for n in s.nics],
    )
