"""``cna-ctl vm move-disk NAME TARGET --to DATASTORE/PATH [--bandwidth-mib-s N] [--keep-source]``:
live storage migration of one disk of a running VM, with the progress bar (bytes, rate, time
left) and a summary line; Ctrl-C offers to cancel (the VM then stays on the source)."""

from __future__ import annotations

import argparse

from cna_agent.api import pb
from cna_agent.cli.common import CliError, Client, EXIT_USAGE
from cna_agent.cli.progress import elapsed_s, watched
from cna_agent.cli.table import human_bytes


def _summary(args: argparse.Namespace, op) -> str:
    took = f" in {elapsed_s(op):.1f} s"
    if op.HasField("error"):
        return f"{args.target} of {args.vm} did not move{took}: {op.error.message}"
    copied = f", {human_bytes(op.progress.bytes_total)} copied" if op.progress.bytes_total else ""
    return f"{args.target} of {args.vm} moved to {args.to}{took}{copied}" + ("; source kept" if args.keep_source else "")


def cmd_move_disk(client: Client, args: argparse.Namespace) -> str:
    if args.bandwidth_mib_s < 0:
        raise CliError("--bandwidth-mib-s must not be negative", EXIT_USAGE)
    op = client.call(client.storage.MoveDisk, pb.storage_pb2.MoveDiskRequest(
        vm=args.vm, target=args.target, destination=args.to, bandwidth_mib_s=args.bandwidth_mib_s,
        keep_source=args.keep_source, request_id=args.request_id or ""))
    return watched(client, args, op, lambda o: _summary(args, o))


def register_move_disk(vms: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    q = vms.add_parser("move-disk", parents=[common], help="move a running VM's disk to another volume (live storage migration)")
    q.add_argument("vm", help="name or UUID")
    q.add_argument("target", help="the disk, e.g. vdb")
    q.add_argument("--to", required=True, metavar="DATASTORE/PATH", help="the new volume (.qcow2, else raw); must not exist")
    q.add_argument("--bandwidth-mib-s", type=int, default=0, help="cap the copy (default: unlimited)")
    q.add_argument("--keep-source", action="store_true", help="keep the old volume after the switch")
    q.add_argument("--no-wait", dest="wait", action="store_false", help="return the operation id at once")
    q.add_argument("--request-id", help="idempotency key: repeating it returns the first operation")
    q.set_defaults(func=cmd_move_disk)
