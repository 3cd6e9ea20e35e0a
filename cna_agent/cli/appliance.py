"""``cna-ctl appliance inspect|import|export``: OVF/OVA packages on a datastore.

``inspect`` shows what an import would make (the VM, its disks, the package's networks) and
every note: what is changed, dropped or ignored. ``import`` converts the disks with the
progress bar and prints the notes again with the summary, so nothing the package asked for
goes unsaid; ``--network NAME=PORTGROUP`` maps each of the package's networks. ``export``
writes a stopped VM as a directory (.ovf, .mf, streamOptimized .vmdk) or one .ova.
"""

from __future__ import annotations

import argparse
import json
import textwrap
from typing import Any

from cna_agent.api import pb
from cna_agent.cli.common import EXIT_USAGE, CliError, Client, to_json
from cna_agent.cli.progress import elapsed_s, watched
from cna_agent.cli.table import human_bytes, keyvalues, table

ap = pb.appliance_pb2


def _network_map(pairs: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for pair in pairs or []:
        name, sep, pg = pair.rpartition("=")
        if not sep or not name or not pg:
            raise CliError(f"--network {pair!r}: expected NETWORK=PORTGROUP", EXIT_USAGE)
        out[name] = pg
    return out


def _notes(notes: Any) -> str:
    """One wrapped entry per note, 80 columns wide: ``  dropped  Sound card: why``."""
    if not notes:
        return "notes: none (everything the package asks for is given as asked)"
    lines = [f"notes ({len(notes)}):"]
    for n in notes:
        lines += textwrap.wrap(f"{n.item}: {n.detail}", width=80, initial_indent=f"  {n.action:<8} ",
                               subsequent_indent=" " * 11)
    return "\n".join(lines)


def cmd_inspect(client: Client, args: argparse.Namespace) -> str:
    got = client.call(client.appliances.InspectAppliance,
                      ap.InspectApplianceRequest(source=args.source, network_map=_network_map(args.network)))
    if args.json:
        return json.dumps(to_json(got), indent=2)
    s = got.spec
    head = keyvalues([("name", s.name), ("package", f"{got.package_kind}, {'with' if got.has_manifest else 'no'} manifest"),
                      ("vcpus", s.vcpus), ("memory", f"{s.memory_mib} MiB"), ("networks", ", ".join(got.networks) or "-")])
    disks = table(["DISK", "BUS", "FROM PACKAGE"], [
        (d.volume.rsplit("/", 1)[-1], pb.vm_pb2.DiskBus.Name(d.bus).removeprefix("DISK_BUS_").lower(),
         human_bytes(size) if size else "blank") for d, size in zip(s.disks, list(got.disk_file_bytes) + [0] * len(s.disks))])
    return f"{head}\n{disks}\n{_notes(got.notes)}"


def _import_summary(args: argparse.Namespace, op: Any) -> str:
    took = f" in {elapsed_s(op):.1f} s"
    if op.HasField("error"):
        return f"{args.source} was not imported{took}: {op.error.message}"
    got = ap.ApplianceImport()
    op.response.Unpack(got)
    checked = f"manifest checked ({got.manifest_files} files)" if got.manifest_files else "no manifest"
    return (f"{got.vm.spec.name} ({got.vm.uuid}) imported{took}:\n  {len(got.vm.spec.disks)} disk(s) on "
            f"{args.datastore}, {len(got.vm.spec.nics)} NIC(s), {checked}\n{_notes(got.notes)}")


def cmd_import(client: Client, args: argparse.Namespace) -> str:
    fmt = {"qcow2": pb.storage_pb2.VOLUME_FORMAT_QCOW2, "raw": pb.storage_pb2.VOLUME_FORMAT_RAW}[args.format]
    op = client.call(client.appliances.ImportAppliance, ap.ImportApplianceRequest(
        source=args.source, datastore=args.datastore, folder=args.folder or "", name=args.name or "",
        network_map=_network_map(args.network), format=fmt, keep_macs=args.keep_macs, start=args.start,
        strict=args.strict, request_id=args.request_id or ""))
    return watched(client, args, op, lambda o: _import_summary(args, o))


def _export_summary(args: argparse.Namespace, op: Any) -> str:
    took = f" in {elapsed_s(op):.1f} s"
    if op.HasField("error"):
        return f"{args.vm} was not exported{took}: {op.error.message}"
    got = ap.ApplianceExport()
    op.response.Unpack(got)
    notes = f"\n{_notes(got.notes)}" if got.notes else ""
    return f"{args.vm} exported to {args.destination}{took}: {len(got.files)} file(s), {human_bytes(got.bytes)}{notes}"


def cmd_export(client: Client, args: argparse.Namespace) -> str:
    op = client.call(client.appliances.ExportAppliance, ap.ExportApplianceRequest(
        vm=args.vm, destination=args.destination, request_id=args.request_id or ""))
    return watched(client, args, op, lambda o: _export_summary(args, o))


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    g = sub.add_parser("appliance", help="OVF/OVA packages: inspect, import, export").add_subparsers(
        dest="cmd", metavar="COMMAND", required=True)
    q = g.add_parser("inspect", parents=[common], help="what an import of a package would make, and every note")
    q.add_argument("source", metavar="DATASTORE/PATH", help="an .ova, or an .ovf with its files beside it")
    q.add_argument("--network", action="append", metavar="NAME=PORTGROUP", help="map a package network (repeatable)")
    q.set_defaults(func=cmd_inspect)

    q = g.add_parser("import", parents=[common], help="define a VM from a package, its disks converted onto a datastore")
    q.add_argument("source", metavar="DATASTORE/PATH", help="an .ova, or an .ovf with its files beside it")
    q.add_argument("--datastore", required=True, help="the dir datastore the disks go to")
    q.add_argument("--folder", help="directory in the datastore (default: the VM's name)")
    q.add_argument("--name", help="the VM's name (default: the package's)")
    q.add_argument("--network", action="append", metavar="NAME=PORTGROUP",
                   help="map each of the package's networks to a port group (repeatable)")
    q.add_argument("--format", choices=("qcow2", "raw"), default="qcow2", help="the disks' volume format (default qcow2)")
    q.add_argument("--keep-macs", action="store_true", help="keep the package's MAC addresses")
    q.add_argument("--start", action="store_true", help="start the VM once it is defined")
    q.add_argument("--strict", action="store_true", help="refuse when anything the package asks for would be dropped")
    q.add_argument("--no-wait", dest="wait", action="store_false", help="return the operation id at once")
    q.add_argument("--request-id", help="idempotency key: repeating it returns the first operation")
    q.set_defaults(func=cmd_import)

    q = g.add_parser("export", parents=[common], help="write a stopped VM as an OVF directory or an .ova")
    q.add_argument("vm", help="name or UUID")
    q.add_argument("destination", metavar="DATASTORE/PATH", help="a new directory, or a path ending in .ova")
    q.add_argument("--no-wait", dest="wait", action="store_false", help="return the operation id at once")
    q.add_argument("--request-id", help="idempotency key: repeating it returns the first operation")
    q.set_defaults(func=cmd_export)
