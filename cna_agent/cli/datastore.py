"""cna-ctl datastore list|info|rescan."""

from __future__ import annotations

import argparse
import json

from cna_agent.api import pb
from cna_agent.cli.common import Client, to_json
from cna_agent.cli.table import human_bytes, keyvalues, table

S = pb.storage_pb2


def _type(d) -> str:
    return S.DatastoreType.Name(d.type).removeprefix("DATASTORE_TYPE_").lower()


def _health(d) -> str:
    name = pb.common_pb2.Health.Name(d.health).removeprefix("HEALTH_").lower()
    return {"degraded": "slow"}.get(name, name)


def cmd_list(client: Client, args: argparse.Namespace) -> str:
    resp = client.call(client.storage.ListDatastores, S.ListDatastoresRequest())
    if args.json:
        return json.dumps(to_json(resp), indent=2)
    if not resp.datastores:
        return "no datastores configured (add [storage.datastores.NAME] tables to agent.toml)"
    return table(["NAME", "TYPE", "HEALTH", "CAPACITY", "FREE", "PROBE", "LOCATION"],
                 [[d.name, _type(d) + (f"/{d.initiator}" if d.initiator else ""), _health(d), human_bytes(d.capacity_bytes),
                   human_bytes(d.free_bytes), f"{d.probe_latency_ms:.1f} ms", d.location] for d in resp.datastores])


def _block(d) -> str:
    pairs = [("Name", d.name), ("Type", _type(d)), ("Initiator", d.initiator or "-"), ("Health", _health(d)),
             ("Reason", d.health_reason or "-"), ("Probe latency", f"{d.probe_latency_ms:.1f} ms"),
             ("Direct I/O", "yes" if d.direct_io else "no"), ("Capacity", human_bytes(d.capacity_bytes)),
             ("Free", human_bytes(d.free_bytes)), ("Location", d.location)]
    out = keyvalues(pairs)
    if d.luns:
        out += "\n\n" + table(["LUN", "SIZE", "VENDOR", "PRODUCT", "PATHS", "DEVICE", "USED BY"],
                              [[lun.id, human_bytes(lun.size_bytes), lun.vendor or "-", lun.product or "-", lun.paths or "-",
                                lun.device or "-", ",".join(lun.used_by) or "-"] for lun in d.luns])
    return out


def cmd_info(client: Client, args: argparse.Namespace) -> str:
    d = client.call(client.storage.GetDatastore, S.GetDatastoreRequest(name=args.name))
    return json.dumps(to_json(d), indent=2) if args.json else _block(d)


def cmd_rescan(client: Client, args: argparse.Namespace) -> str | None:
    from cna_agent.cli.volume import follow

    op = client.call(client.storage.RescanDatastore, S.RescanDatastoreRequest(name=args.name, request_id=args.request_id or ""))
    return follow(client, args, op, S.Datastore, _block)


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    ds = sub.add_parser("datastore", help="datastores (local directories, iSCSI and FC SAN)").add_subparsers(
        dest="cmd", metavar="COMMAND", required=True)
    p = ds.add_parser("list", parents=[common], help="datastores with health and capacity")
    p.set_defaults(func=cmd_list)
    p = ds.add_parser("info", parents=[common], help="one datastore with its LUNs")
    p.add_argument("name")
    p.set_defaults(func=cmd_info)
    p = ds.add_parser("rescan", parents=[common], help="rescan a SAN datastore's LUNs and re-probe its health")
    p.add_argument("name")
    p.add_argument("--request-id", help="idempotency key (a repeat returns the first result)")
    p.add_argument("--no-wait", action="store_true", help="print the operation and return at once")
    p.set_defaults(func=cmd_rescan)
