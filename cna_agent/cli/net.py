"""cna-ctl net bridges|port-groups|vifs|drift|reconcile: the host's networks as the agent sees them."""

from __future__ import annotations

import argparse
import json

from cna_agent.api import pb
from cna_agent.cli.common import Client, to_json
from cna_agent.cli.table import table

npb = pb.network_pb2


def _bw(b) -> str:
    if not b.average_kbps:
        return "-"
    return f"{b.average_kbps}" + (f"/{b.peak_kbps}" if b.peak_kbps else "") + " kbit/s"


def cmd_bridges(client: Client, args: argparse.Namespace) -> str:
    resp = client.call(client.network.ListBridges, npb.ListBridgesRequest())
    if args.json:
        return json.dumps([to_json(b) for b in resp.bridges], indent=2)
    rows = []
    for b in resp.bridges:
        kind = npb.BridgeType.Name(b.type).removeprefix("BRIDGE_TYPE_").lower()
        if b.type == npb.BRIDGE_TYPE_OVS:
            kind += f" ({b.datapath_type}, {b.fail_mode})"
        health = pb.common_pb2.Health.Name(b.health).removeprefix("HEALTH_").lower()
        rows.append([b.name, kind, b.uplink or "-", b.mtu or "-", ", ".join(b.addresses) or "-",
                     health + (f": {b.health_reason}" if b.health_reason else "")])
    return table(["NAME", "TYPE", "UPLINK", "MTU", "ADDRESSES", "HEALTH"], rows)


def cmd_port_groups(client: Client, args: argparse.Namespace) -> str:
    resp = client.call(client.network.ListPortGroups, npb.ListPortGroupsRequest(bridge=args.bridge or ""))
    if args.json:
        return json.dumps([to_json(p) for p in resp.port_groups], indent=2)
    rows = []
    for p in resp.port_groups:
        vlan = str(p.vlan) if p.vlan else ("trunk " + ",".join(map(str, p.trunk_vlans)) if p.trunk_vlans else "untagged")
        spoof = "+".join(x for x, on in (("mac", p.mac_anti_spoofing), ("ip", p.ip_anti_spoofing)) if on) or "-"
        rows.append([p.name, p.bridge, vlan, _bw(p.inbound), _bw(p.outbound), spoof, len(p.vifs)])
    return table(["NAME", "BRIDGE", "VLAN", "INBOUND", "OUTBOUND", "ANTI-SPOOF", "VIFS"], rows)


def cmd_vifs(client: Client, args: argparse.Namespace) -> str:
    resp = client.call(client.network.ListPortGroups, npb.ListPortGroupsRequest(bridge=args.bridge or ""))
    rows = [[p.name, p.bridge, v.vm_uuid, v.mac, v.device or "-", v.interface_id or "-", "up" if v.link_up else "down"]
            for p in resp.port_groups for v in p.vifs]
    if args.json:
        keys = ["port_group", "bridge", "vm_uuid", "mac", "device", "interface_id", "link"]
        return json.dumps([dict(zip(keys, r)) for r in rows], indent=2)
    return table(["PORT GROUP", "BRIDGE", "VM", "MAC", "DEVICE", "IFACE-ID", "LINK"], rows)


def _drift(client: Client, args: argparse.Namespace, repair: bool) -> str:
    resp = client.call(client.network.Reconcile, npb.ReconcileRequest(repair=repair))
    if args.json:
        return json.dumps([to_json(d) for d in resp.drift], indent=2)
    if not resp.drift:
        return "no drift: the host matches the declared networks and VM NICs"
    return table(["RESOURCE", "PROBLEM", "REPAIRED", "ACTION"],
                 [[d.resource, d.problem, "yes" if d.repaired else "no", d.action or "-"] for d in resp.drift])


def cmd_drift(client: Client, args: argparse.Namespace) -> str:
    return _drift(client, args, repair=False)


def cmd_reconcile(client: Client, args: argparse.Namespace) -> str:
    return _drift(client, args, repair=True)


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    net = sub.add_parser("net", help="bridges, port groups, VM NICs, drift").add_subparsers(dest="cmd", metavar="COMMAND", required=True)
    net.add_parser("bridges", parents=[common], help="declared bridges and their health").set_defaults(func=cmd_bridges)
    for name, func, text in (("port-groups", cmd_port_groups, "port groups (VLAN, limits, VIF count)"),
                             ("vifs", cmd_vifs, "VM NICs on each port group")):
        p = net.add_parser(name, parents=[common], help=text)
        p.add_argument("--bridge", help="only this bridge")
        p.set_defaults(func=func)
    net.add_parser("drift", parents=[common], help="compare declared networks and VM NICs with the host (changes nothing)").set_defaults(func=cmd_drift)
    net.add_parser("reconcile", parents=[common], help="repair drift and show what was repaired").set_defaults(func=cmd_reconcile)
