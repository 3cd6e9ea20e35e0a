"""cna-ctl host info|stats (placement: cli/placement.py; maintenance: cli/maintenance.py)."""

from __future__ import annotations

import argparse
import datetime as dt
import json

from cna_agent.api import pb
from cna_agent.cli.common import Client, fmt_time, to_json
from cna_agent.cli.table import human_bytes, keyvalues, table
from cna_agent.host.cpulist import format_cpulist


def cmd_host_info(client: Client, args: argparse.Namespace) -> str:
    caps = client.call(client.host.GetCapabilities, pb.host_pb2.GetCapabilitiesRequest(refresh=args.refresh))
    if args.json:
        return json.dumps(to_json(caps), indent=2)
    cpu, topo, hv = caps.cpu, caps.topology, caps.hypervisor
    arch = pb.common_pb2.Arch.Name(cpu.arch).removeprefix("ARCH_").lower()
    lines: list[tuple[str, object]] = [
        ("Hostname", caps.hostname),
        ("Host UUID", caps.host_uuid),
        ("Agent", caps.agent_version),
        ("OS", f"{caps.os_release} (kernel {caps.kernel_release})"),
        ("CPU", f"{arch} {cpu.vendor} {cpu.model}".strip()),
    ]
    if cpu.HasField("midr"):
        m = cpu.midr
        lines.append(("MIDR", f"{m.raw:#010x} implementer {m.implementer:#04x} ({m.implementer_name}) part {m.part:#05x} ({m.part_name}) r{m.variant}p{m.revision}"))
    kvm = "yes" if cpu.kvm_available else f"no ({cpu.kvm_unusable_reason})"
    lines += [
        ("Virtualization", f"{cpu.hw_virt or 'none'}; KVM usable: {kvm}"),
        ("Guests run with", "KVM" if cpu.virt_type == "kvm" else "QEMU TCG (software emulation)"),
        ("Topology", f"{topo.sockets} socket(s) x {topo.dies_per_socket} die(s) x {topo.clusters_per_die} cluster(s) x "
                     f"{topo.cores_per_cluster} core(s) x {topo.threads_per_core} thread(s) = {topo.logical_cpus} CPUs"),
        ("Online CPUs", format_cpulist(topo.online_cpus)),
        ("Memory", human_bytes(caps.memory_total_bytes)),
        ("Hugepages", ", ".join(f"{h.page_size_kib} KiB: {h.free}/{h.total} free" for h in caps.hugepages) or "none"),
        ("Hypervisor", f"{hv.type} {hv.version}, libvirt {hv.libvirt_version}" if hv.type else "-"),
        ("libvirt URI", f"{hv.uri} ({hv.mode}, {'connected' if hv.connected else 'DISCONNECTED'})"),
        ("iSCSI IQN", caps.initiators.iscsi_iqn or "-"),
        ("FC WWPNs", ", ".join(caps.initiators.fc_wwpns) or "-"),
    ]
    out = [keyvalues(lines), "", "NUMA nodes:"]
    out.append(table(
        ["NODE", "CPUS", "MEMORY", "FREE", "DISTANCES", "HUGEPAGES (free/total)"],
        [[n.id, format_cpulist(n.cpus), human_bytes(n.memory_total_bytes), human_bytes(n.memory_free_bytes),
          " ".join(map(str, n.distances)),
          ", ".join(f"{h.page_size_kib}K {h.free}/{h.total}" for h in n.hugepages if h.total) or "-"]
         for n in caps.numa_nodes]))
    out += ["", "Caches:"]
    out.append(table(["LEVEL", "TYPE", "SIZE", "INSTANCES", "CPUS EACH"],
                     [[f"L{c.level}", c.type, human_bytes(c.size_bytes), c.instances, c.cpus_per_instance] for c in caps.caches]))
    if caps.nics:
        out += ["", "NICs:"]
        out.append(table(["NAME", "MAC", "DRIVER", "SPEED", "LINK", "MTU", "SR-IOV VFS"],
                         [[n.name, n.mac, n.driver or "-", f"{n.speed_mbps} Mb/s" if n.speed_mbps > 0 else "-",
                           "up" if n.link_up else "down", n.mtu, f"{n.sriov_num_vfs}/{n.sriov_total_vfs}" if n.sriov_total_vfs else "-"]
                          for n in caps.nics]))
    return "\n".join(out)


def cmd_host_stats(client: Client, args: argparse.Namespace) -> str:
    st = client.call(client.host.GetStats, pb.host_pb2.GetStatsRequest(per_cpu=args.per_cpu))
    if args.json:
        return json.dumps(to_json(st), indent=2)
    c, m = st.cpu, st.memory
    out = [keyvalues([
        ("Time", fmt_time(st.time)),
        ("CPU", f"{c.percent:.1f}% busy (user {c.user_percent:.1f}%, system {c.system_percent:.1f}%, iowait {c.iowait_percent:.1f}%, steal {c.steal_percent:.1f}%) on {c.logical_cpus} CPUs"),
        ("Load", f"{st.load.load1:.2f} {st.load.load5:.2f} {st.load.load15:.2f}"),
        ("Memory", f"{human_bytes(m.used_bytes)} used, {human_bytes(m.available_bytes)} available of {human_bytes(m.total_bytes)}"),
        ("Swap", f"{human_bytes(m.swap_used_bytes)} of {human_bytes(m.swap_total_bytes)}"),
        ("Uptime", str(dt.timedelta(seconds=int(st.uptime_seconds)))),
        ("VMs", f"{st.vms_running} running, {st.vms_total} defined"),
        ("Hypervisor", pb.common_pb2.Health.Name(st.hypervisor_health).removeprefix("HEALTH_").lower()),
    ])]
    if c.per_cpu_percent:
        out += ["", "Per CPU: " + " ".join(f"{i}:{p:.0f}%" for i, p in enumerate(c.per_cpu_percent))]
    out += ["", "NICs:", table(["NAME", "RX", "TX", "RX PKTS", "TX PKTS", "ERR IN/OUT", "DROP IN/OUT", "STATE"],
                               [[n.name, human_bytes(n.rx_bytes), human_bytes(n.tx_bytes), n.rx_packets, n.tx_packets,
                                 f"{n.rx_errors}/{n.tx_errors}", f"{n.rx_dropped}/{n.tx_dropped}", "up" if n.is_up else "down"] for n in st.nics])]
    if st.disks:
        out += ["", "Disks:", table(["NAME", "READ", "WRITTEN", "READS", "WRITES", "BUSY ms"],
                                    [[d.name, human_bytes(d.read_bytes), human_bytes(d.write_bytes), d.read_count, d.write_count, d.busy_time_ms] for d in st.disks])]
    return "\n".join(out)


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    host = sub.add_parser("host", help="host capabilities, stats, placement, maintenance").add_subparsers(dest="cmd", metavar="COMMAND", required=True)
    hi = host.add_parser("info", parents=[common], help="CPU, topology, NUMA, memory, hypervisor")
    hi.add_argument("--refresh", action="store_true", help="re-probe instead of the cached capabilities")
    hi.set_defaults(func=cmd_host_info)
    hs = host.add_parser("stats", parents=[common], help="CPU, memory, load, NIC and disk counters")
    hs.add_argument("--per-cpu", action="store_true", help="include per-CPU utilisation")
    hs.set_defaults(func=cmd_host_stats)
    from cna_agent.cli import placement
    from cna_agent.cli.maintenance import register_maintenance

    placement.register(host, common)
    register_maintenance(host, common)
