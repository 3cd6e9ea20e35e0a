"""cna-ctl events tail."""

from __future__ import annotations

import argparse
import json

import grpc

from cna_agent.api import pb
from cna_agent.cli.common import Client, fmt_time, rpc_error, to_json


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
    # Batches: following a busy host costs the agent one send per burst, not one per event.
    stream = client.events.WatchEventBatches(pb.events_pb2.WatchEventsRequest(after_sequence=after, types=args.type or []))
    try:
        for batch in stream:
            for e in batch.events:
                print(json.dumps(to_json(e)) if args.json else _event_line(e))
            print(end="", flush=True)
    except grpc.RpcError as exc:
        if exc.code() == grpc.StatusCode.CANCELLED:
            return
        raise rpc_error(exc, client.socket_path) from None


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    ev = sub.add_parser("events", help="the event log").add_subparsers(dest="cmd", metavar="COMMAND", required=True)
    et = ev.add_parser("tail", parents=[common], help="recent events; -f to follow")
    et.add_argument("--follow", "-f", action="store_true", help="keep printing new events")
    et.add_argument("--lines", "-n", type=int, default=20, help="how many recent events (default 20)")
    et.add_argument("--after", type=int, default=None, help="start after this sequence number")
    et.add_argument("--type", action="append", help="only events of this type or prefix (repeatable), e.g. vm.")
    et.set_defaults(func=cmd_events_tail)
