"""``cna-ctl host maintenance on --to HOST:PORT[,HOST:PORT] | off | status``.

``on`` puts the host in maintenance (no new VMs from that moment) and follows the evacuation
with a progress bar, then prints what happened to each VM. Exit status: 0 when every VM moved,
1 when any stayed (the table says why; the host stays in maintenance either way).
"""

from __future__ import annotations

import argparse
import json

from cna_agent.api import pb
from cna_agent.cli.common import CliError, Client, EXIT_USAGE, fmt_time, to_json
from cna_agent.cli.progress import follow
from cna_agent.cli.table import keyvalues, table
from cna_agent.cli.vm_migrate import add_policy_args, policy_from_args

h = pb.host_pb2


def _outcome(o: int) -> str:
    return h.EvacuationOutcome.Name(o).removeprefix("EVACUATION_OUTCOME_").lower().replace("_", " ")


def report_table(r) -> str:
    if not r.vms:
        return "no VMs on this host"
    rows = [[x.vm_name, x.state or "-", _outcome(x.outcome), x.destination or "-",
             f"{x.duration_ms / 1000:.1f}s" if x.duration_ms else "-", x.error or ""] for x in r.vms]
    summary = f"{r.moved} moved, {r.not_moved} not moved" + (" (host empty)" if r.complete else "")
    return table(["VM", "STATE", "OUTCOME", "DESTINATION", "TOOK", "WHY"], rows) + "\n" + summary


def _destinations(text: str) -> list[str]:
    dests = [d.strip() for d in text.split(",") if d.strip()]
    if not dests:
        raise CliError("--to needs at least one HOST:PORT", EXIT_USAGE)
    return dests


def cmd_on(client: Client, args: argparse.Namespace) -> str:
    dests = _destinations(args.to) if args.to else []
    op = client.call(client.host.SetMaintenance, h.SetMaintenanceRequest(
        enabled=True, destinations=dests, policy=policy_from_args(args), request_id=args.request_id or ""))
    if not args.wait:
        return json.dumps(to_json(op), indent=2) if args.json else f"maintenance on; evacuation {op.id} started"
    op = follow(client, op)
    if args.json:
        print(json.dumps(to_json(op), indent=2))
    if op.HasField("error") or not op.HasField("response"):
        why = op.error.message if op.HasField("error") else "it ended without a report"
        ended = "was cancelled" if op.state == pb.operations_pb2.OPERATION_STATE_CANCELLED else "failed"
        raise CliError(f"maintenance on, but the evacuation {op.id} {ended}: {why} "
                       "(each VM's outcome: cna-ctl host maintenance status)")
    report = h.EvacuationReport()
    op.response.Unpack(report)
    if not args.json:
        print("maintenance on\n" + report_table(report))
    if not report.complete and report.vms:
        raise CliError(f"{report.not_moved} VM(s) stayed on this host; see WHY above")
    return None


def cmd_off(client: Client, args: argparse.Namespace) -> str:
    op = client.call(client.host.SetMaintenance, h.SetMaintenanceRequest(enabled=False, request_id=args.request_id or ""),
                     timeout=max(client.timeout, 90))
    op = follow(client, op)
    if op.HasField("error"):
        raise CliError(f"maintenance off failed: {op.error.message}")
    return json.dumps(to_json(op), indent=2) if args.json else "maintenance off: this host takes new VMs again"


def cmd_status(client: Client, args: argparse.Namespace) -> str:
    s = client.call(client.host.GetMaintenance, h.GetMaintenanceRequest())
    if args.json:
        return json.dumps(to_json(s), indent=2)
    pairs = [("Maintenance", "on" if s.enabled else "off")]
    if s.enabled:
        pairs += [("Since", fmt_time(s.since)), ("Destinations", ", ".join(s.destinations) or "-")]
    pairs.append(("Evacuating", s.evacuation_operation_id or "no"))
    out = [keyvalues(pairs)]
    if s.HasField("last_report"):
        r = s.last_report
        out += ["", f"Last evacuation {r.operation_id} (started {fmt_time(r.start_time)}, "
                    f"{'ended ' + fmt_time(r.end_time) if r.HasField('end_time') else 'running'}):", report_table(r)]
    return "\n".join(out)


def register_maintenance(host: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    m = host.add_parser("maintenance", help="maintenance mode: refuse new VMs and drain this host").add_subparsers(
        dest="mcmd", metavar="ACTION", required=True)
    on = m.add_parser("on", parents=[common], help="refuse new VMs and move every VM to the destinations given")
    on.add_argument("--to", metavar="HOST:PORT[,HOST:PORT]", default="",
                    help="destination agents (comma-separated); without it the VMs stay and only new ones are refused")
    add_policy_args(on)
    on.add_argument("--no-wait", dest="wait", action="store_false", help="return once maintenance is on")
    on.add_argument("--request-id", help="idempotency key: repeating it returns the first operation")
    on.set_defaults(func=cmd_on)
    off = m.add_parser("off", parents=[common], help="take new VMs again (cancels an evacuation still running)")
    off.add_argument("--request-id")
    off.set_defaults(func=cmd_off)
    st = m.add_parser("status", parents=[common], help="the mode and the last evacuation's report")
    st.set_defaults(func=cmd_status)
