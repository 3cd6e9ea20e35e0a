"""cna-ctl ops list|show|cancel."""

from __future__ import annotations

import argparse
import json

import grpc

from cna_agent.api import pb
from cna_agent.cli.common import CliError, Client, fmt_time, rpc_error, to_json
from cna_agent.cli.progress import ProgressLine, on_interrupt
from cna_agent.cli.table import keyvalues, table


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
        first = client.call(client.ops.GetOperation, pb.operations_pb2.GetOperationRequest(id=args.id))  # its kind, for Ctrl-C
        stream = client.ops.WatchOperation(pb.operations_pb2.WatchOperationRequest(id=args.id))
        last = None
        bar = ProgressLine()
        try:
            with on_interrupt(client, first):
                for op in stream:
                    last = op
                    if args.json:
                        print(json.dumps(to_json(op)), flush=True)
                    else:
                        p = op.progress
                        line = bar.render(p.percent, f"{_op_state(op)} {p.stage}".strip(), p.bytes_done, p.bytes_total)
                        print("\r" + line.ljust(60), end="", flush=True)
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


def cmd_ops_cancel(client: Client, args: argparse.Namespace) -> str:
    """Cancel a running operation and show where it got to. The agent refuses (exit 1, with its
    reason) a kind that cannot be cancelled, or one past its point of no return."""
    op = client.call(client.ops.CancelOperation, pb.operations_pb2.CancelOperationRequest(id=args.id))
    return json.dumps(to_json(op), indent=2) if args.json else _op_block(op)


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
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
    oc = ops.add_parser("cancel", parents=[common], help="cancel a running operation (stops its work, or says why not)")
    oc.add_argument("id")
    oc.set_defaults(func=cmd_ops_cancel)
