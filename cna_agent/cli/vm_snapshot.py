"""``cna-ctl vm snapshot create|list|revert|delete``: VM snapshots, listed as a tree."""

from __future__ import annotations

import argparse
import json

from cna_agent.api import pb
from cna_agent.cli.common import Client, fmt_time, to_json
from cna_agent.cli.table import table

v = pb.vm_pb2


def _wait(client: Client, op, args: argparse.Namespace) -> str:
    from cna_agent.cli.vm import _wait as wait_op

    return wait_op(client, op, args)


def cmd_create(client: Client, args: argparse.Namespace) -> str:
    op = client.call(client.vms.CreateSnapshot, v.CreateSnapshotRequest(
        vm=args.vm, name=args.name, description=args.description or "", quiesce=args.quiesce, memory=args.memory,
        request_id=args.request_id or ""))
    return _wait(client, op, args)


def cmd_list(client: Client, args: argparse.Namespace) -> str:
    resp = client.call(client.vms.ListSnapshots, v.ListSnapshotsRequest(vm=args.vm))
    if args.json:
        return json.dumps(to_json(resp), indent=2)
    if not resp.snapshots:
        return "no snapshots"
    depth: dict[str, int] = {}
    rows = []
    for s in resp.snapshots:
        depth[s.name] = depth.get(s.parent, -1) + 1 if s.parent else 0
        rows.append(["  " * depth[s.name] + s.name + (" *" if s.current else ""), s.kind + ("+memory" if s.memory else ""),
                     fmt_time(s.create_time),
                     s.description or "-"])
    return table(["NAME (* current)", "KIND", "CREATED", "DESCRIPTION"], rows)


def cmd_revert(client: Client, args: argparse.Namespace) -> str:
    op = client.call(client.vms.RevertSnapshot, v.SnapshotActionRequest(vm=args.vm, snapshot=args.name, request_id=args.request_id or ""))
    return _wait(client, op, args)


def cmd_delete(client: Client, args: argparse.Namespace) -> str:
    op = client.call(client.vms.DeleteSnapshot, v.SnapshotActionRequest(vm=args.vm, snapshot=args.name, request_id=args.request_id or ""))
    return _wait(client, op, args)


def register_snapshot(vms: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    snap = vms.add_parser("snapshot", help="VM snapshots").add_subparsers(dest="snapcmd", metavar="COMMAND", required=True)
    p = snap.add_parser("list", parents=[common], help="a VM's snapshots as a tree")
    p.add_argument("vm")
    p.set_defaults(func=cmd_list)
    for name, func, help_ in (("create", cmd_create, "internal when stopped, external disk-only when running, "
                                                       "internal with RAM when running with --memory"),
                              ("revert", cmd_revert, "revert the VM to a snapshot"), ("delete", cmd_delete, "delete a snapshot")):
        p = snap.add_parser(name, parents=[common], help=help_)
        p.add_argument("vm")
        p.add_argument("name")
        p.add_argument("--no-wait", dest="wait", action="store_false", help="return the operation id at once")
        p.add_argument("--request-id", help="idempotency key")
        if name == "create":
            p.add_argument("--description")
            p.add_argument("--quiesce", action="store_true", help="freeze guest filesystems via the guest agent (running VMs)")
            p.add_argument("--memory", action="store_true",
                           help="include RAM and device state (running VMs): a revert resumes the guest at that point")
        p.set_defaults(func=func)
