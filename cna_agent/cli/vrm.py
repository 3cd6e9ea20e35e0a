"""cna-ctl vrm status: is this host talking to its central manager, and how far behind is it."""

from __future__ import annotations

import argparse
import json

from cna_agent.api import pb
from cna_agent.cli.common import EXIT_FAILED, CliError, Client, fmt_time, to_json
from cna_agent.cli.table import keyvalues


def cmd_vrm_status(client: Client, args: argparse.Namespace) -> str:
    stub = pb.agent_pb2_grpc.AgentServiceStub(client.channel)
    st = client.call(stub.GetVrmStatus, pb.agent_pb2.GetVrmStatusRequest())
    state = pb.agent_pb2.VrmLinkState.Name(st.state).removeprefix("VRM_LINK_STATE_").lower()
    if args.json:
        out = json.dumps(to_json(st), indent=2)
    else:
        lines: list[tuple[str, object]] = [("State", state), ("VRM", st.address or "- (vrm.address not set)")]
        if st.state != pb.agent_pb2.VRM_LINK_STATE_DISABLED:
            lines += [
                ("Host UUID", st.host_uuid or "-"),
                ("Session", st.session_id or "-"),
                ("Connected since", fmt_time(st.connected_since)),
                ("Last event", st.last_sequence),
                ("Last ack", f"{st.acked_sequence} at {fmt_time(st.last_ack_time)}"),
                ("Backlog", f"{st.backlog} event(s) not yet acknowledged"),
                ("Heartbeat", f"every {st.heartbeat_interval_seconds:g}s, last {fmt_time(st.last_heartbeat_time)}"),
                ("Sent", f"{st.events_sent} event(s), {st.heartbeats_sent} heartbeat(s)"),
                ("Connects/failures", f"{st.connects}/{st.failures}"),
            ]
            if st.last_error:
                lines.append(("Last error", f"{st.last_error} ({fmt_time(st.last_error_time)})"))
            if st.state == pb.agent_pb2.VRM_LINK_STATE_DISCONNECTED:
                lines.append(("Next attempt", fmt_time(st.next_attempt_time)))
        out = keyvalues(lines)
    if args.check and st.state != pb.agent_pb2.VRM_LINK_STATE_CONNECTED:
        print(out)
        raise CliError(f"the VRM link is {state}", EXIT_FAILED)
    return out


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("vrm", help="the link to the central manager (VRM)")
    vs = p.add_subparsers(dest="vrm_cmd", metavar="COMMAND", required=True)
    s = vs.add_parser("status", parents=[common], help="connection state, last ack, backlog")
    s.add_argument("--check", action="store_true", help="exit 1 unless connected (for scripts and monitoring)")
    s.set_defaults(func=cmd_vrm_status)
