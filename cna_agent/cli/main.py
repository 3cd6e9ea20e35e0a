"""``cna-ctl``: the admin's debug CLI, talking to the local agent over its unix socket.

Reads like virsh / vdsm-client: ``cna-ctl host info``, ``cna-ctl ops list``; aligned tables by
default, ``--json`` for scripts. Exit codes scripts can test: 0 ok, 1 the agent refused or
failed the request, 2 bad usage, 69 (EX_UNAVAILABLE) the agent is not reachable.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
from typing import Any, Callable

import grpc
from google.protobuf import json_format

from cna_agent import __version__
from cna_agent.api import pb
from cna_agent.cli.table import human_bytes, keyvalues, table
from cna_agent.host.cpulist import format_cpulist

DEFAULT_SOCKET = "/run/cna-agent/cna-agent.sock"
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNAVAILABLE = 0, 1, 2, 69


class CliError(Exception):
    def __init__(self, message: str, code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.code = code


def to_json(message: Any) -> dict[str, Any]:
    return json_format.MessageToDict(message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)


def fmt_time(ts) -> str:
    if ts is None or (ts.seconds == 0 and ts.nanos == 0):
        return "-"
    return dt.datetime.fromtimestamp(ts.seconds + ts.nanos / 1e9).strftime("%Y-%m-%d %H:%M:%S")


class Client:
    def __init__(self, socket_path: str, timeout: float) -> None:
        self.socket_path = socket_path
        self.timeout = timeout
        if not os.path.exists(socket_path):
            raise CliError(
                f"cannot reach the agent: {socket_path} does not exist (is cna-agent running? "
                "try 'systemctl status cna-agent', or pass --socket)", EXIT_UNAVAILABLE)
        self.channel = grpc.insecure_channel(f"unix:{socket_path}")
        self.host = pb.host_pb2_grpc.HostServiceStub(self.channel)
        self.ops = pb.operations_pb2_grpc.OperationsServiceStub(self.channel)
        self.events = pb.events_pb2_grpc.EventServiceStub(self.channel)

    def call(self, method: Callable, request: Any, **kw: Any) -> Any:
        try:
            return method(request, timeout=kw.pop("timeout", self.timeout), **kw)
        except grpc.RpcError as exc:
            raise rpc_error(exc, self.socket_path) from None


def rpc_error(exc: grpc.RpcError, socket_path: str) -> CliError:
    code = exc.code() if hasattr(exc, "code") else None
    details = exc.details() if hasattr(exc, "details") else str(exc)
    if code == grpc.StatusCode.UNAVAILABLE and ("connect" in (details or "").lower() or "socket" in (details or "").lower()):
        return CliError(f"cannot reach the agent at {socket_path}: {details} (is cna-agent running?)", EXIT_UNAVAILABLE)
    if code == grpc.StatusCode.PERMISSION_DENIED or "Permission denied" in (details or ""):
        return CliError(f"permission denied on {socket_path}: cna-ctl must run as root", EXIT_UNAVAILABLE)
    name = code.name if code else "ERROR"
    return CliError(f"{name}: {details}")


# -- host ---------------------------------------------------------------------------------


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


# -- operations ---------------------------------------------------------------------------

def _op_state(op) -> str:
    return pb.operations_pb2.OperationState.Name(op.state).removeprefix("OPERATION_STATE_").lower()


def cmd_ops_list(client: Client, args: argparse.Namespace) -> str:
    resp = client.call(client.ops.ListOperations, pb.operations_pb2.ListOperationsRequest(
        active_only=args.active, kinds=args.kind or [], page_size=args.limit))
    if args.json:
        return json.dumps(to_json(resp), indent=2)
    if not resp.operations:
        return "no operations"
    return table(["ID", "KIND", "TARGET", "STATE", "PROGRESS", "CREATED", "ERROR"],
                 [[o.id, o.kind, o.target or "-", _op_state(o),
                   f"{o.progress.percent}%" if o.progress.percent >= 0 else "-", fmt_time(o.create_time),
                   o.error.message if o.HasField("error") else ""] for o in resp.operations])


def _op_block(o) -> str:
    pairs = [("ID", o.id), ("Kind", o.kind), ("Target", o.target or "-"), ("Request id", o.request_id or "-"),
             ("State", _op_state(o)), ("Progress", f"{o.progress.percent}% {o.progress.stage}".strip() if o.progress.percent >= 0 else o.progress.stage or "-"),
             ("Created", fmt_time(o.create_time)), ("Updated", fmt_time(o.update_time)), ("Ended", fmt_time(o.end_time))]
    if o.HasField("error"):
        pairs.append(("Error", f"{o.error.code} {o.error.message}"))
        for v in o.error.field_violations:
            pairs.append(("  field", f"{v.field}: {v.description}"))
    if o.HasField("response"):
        pairs.append(("Response", o.response.type_url.rsplit("/", 1)[-1]))
    for k, v in sorted(o.metadata.items()):
        pairs.append((f"  {k}", v))
    return keyvalues(pairs)


def cmd_ops_show(client: Client, args: argparse.Namespace) -> str | None:
    if args.watch:
        stream = client.ops.WatchOperation(pb.operations_pb2.WatchOperationRequest(id=args.id))
        last = None
        try:
            for op in stream:
                last = op
                if args.json:
                    print(json.dumps(to_json(op)), flush=True)
                else:
                    pct = op.progress.percent
                    bar = "#" * (max(pct, 0) // 5)
                    print(f"\r[{bar:<20}] {pct:>3}% {_op_state(op)} {op.progress.stage}".ljust(60), end="", flush=True)
        except grpc.RpcError as exc:
            raise rpc_error(exc, client.socket_path) from None
        if not args.json:
            print()
            if last is not None:
                print(_op_block(last))
        if last is not None and last.HasField("error"):
            raise CliError(f"operation {last.id} {_op_state(last)}: {last.error.message}")
        return None
    op = client.call(client.ops.GetOperation, pb.operations_pb2.GetOperationRequest(id=args.id))
    return json.dumps(to_json(op), indent=2) if args.json else _op_block(op)


# -- events -------------------------------------------------------------------------------

def _event_line(e) -> str:
    sev = pb.events_pb2.EventSeverity.Name(e.severity).removeprefix("EVENT_SEVERITY_").lower()
    who = e.resource_name or e.resource_id or "-"
    attrs = " ".join(f"{k}={v}" for k, v in sorted(e.attributes.items()))
    return f"{e.sequence:>8}  {fmt_time(e.time)}  {sev:<7}  {e.type:<22}  {who}  {e.message}  {attrs}".rstrip()


def cmd_events_tail(client: Client, args: argparse.Namespace) -> None:
    after = args.after
    if after is None:
        last = client.call(client.events.ListEvents, pb.events_pb2.ListEventsRequest(limit=1)).last_sequence
        after = max(0, last - args.lines)
    if not args.follow:
        resp = client.call(client.events.ListEvents, pb.events_pb2.ListEventsRequest(
            after_sequence=after, types=args.type or [], limit=min(max(args.lines, 1), 1000)))
        for e in resp.events:
            print(json.dumps(to_json(e)) if args.json else _event_line(e))
        return
    stream = client.events.WatchEvents(pb.events_pb2.WatchEventsRequest(after_sequence=after, types=args.type or []))
    try:
        for e in stream:
            print(json.dumps(to_json(e)) if args.json else _event_line(e), flush=True)
    except grpc.RpcError as exc:
        if exc.code() == grpc.StatusCode.CANCELLED:
            return
        raise rpc_error(exc, client.socket_path) from None


# -- wiring -------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    # --json is accepted before or after the command; the subcommands' copy must not reset a
    # global --json to False, hence SUPPRESS there.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="machine-readable JSON output")
    p = argparse.ArgumentParser(prog="cna-ctl", description="Debug CLI for the local cna-agent.")
    p.add_argument("--json", action="store_true", help="machine-readable JSON output")
    p.add_argument("--socket", default=os.environ.get("CNA_CTL_SOCKET", DEFAULT_SOCKET),
                   help=f"agent unix socket (default {DEFAULT_SOCKET}, or $CNA_CTL_SOCKET)")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for an answer (default 30)")
    p.add_argument("--version", action="version", version=f"cna-ctl {__version__}")
    sub = p.add_subparsers(dest="group", metavar="GROUP", required=True)

    host = sub.add_parser("host", help="host capabilities and stats").add_subparsers(dest="cmd", metavar="COMMAND", required=True)
    hi = host.add_parser("info", parents=[common], help="CPU, topology, NUMA, memory, hypervisor")
    hi.add_argument("--refresh", action="store_true", help="re-probe instead of the cached capabilities")
    hi.set_defaults(func=cmd_host_info)
    hs = host.add_parser("stats", parents=[common], help="CPU, memory, load, NIC and disk counters")
    hs.add_argument("--per-cpu", action="store_true", help="include per-CPU utilisation")
    hs.set_defaults(func=cmd_host_stats)

    ops = sub.add_parser("ops", help="long-running operations").add_subparsers(dest="cmd", metavar="COMMAND", required=True)
    ol = ops.add_parser("list", parents=[common], help="recent operations, newest first")
    ol.add_argument("--active", action="store_true", help="only operations not yet done")
    ol.add_argument("--kind", action="append", help="only this kind (repeatable), e.g. vm.start")
    ol.add_argument("--limit", type=int, default=50)
    ol.set_defaults(func=cmd_ops_list)
    os_ = ops.add_parser("show", parents=[common], help="one operation")
    os_.add_argument("id")
    os_.add_argument("--watch", "-w", action="store_true", help="follow it with a progress bar until done")
    os_.set_defaults(func=cmd_ops_show)

    ev = sub.add_parser("events", help="the event log").add_subparsers(dest="cmd", metavar="COMMAND", required=True)
    et = ev.add_parser("tail", parents=[common], help="recent events; -f to follow")
    et.add_argument("--follow", "-f", action="store_true", help="keep printing new events")
    et.add_argument("--lines", "-n", type=int, default=20, help="how many recent events (default 20)")
    et.add_argument("--after", type=int, default=None, help="start after this sequence number")
    et.add_argument("--type", action="append", help="only events of this type or prefix (repeatable), e.g. vm.")
    et.set_defaults(func=cmd_events_tail)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        client = Client(args.socket, args.timeout)
        out = args.func(client, args)
        if out is not None:
            print(out)
        return EXIT_OK
    except CliError as exc:
        print(f"cna-ctl: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
