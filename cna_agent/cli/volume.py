"""cna-ctl volume list|info|create|resize|delete|clone|import|export, with a progress bar.

Long operations (copies, conversions) are followed through OperationsService.WatchOperation
until done, drawing a bar on a terminal (one JSON line per update with --json); --no-wait
prints the operation and returns at once.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from typing import Any, Callable

import grpc

from cna_agent.api import pb
from cna_agent.cli.common import CliError, Client, rpc_error, to_json
from cna_agent.cli.progress import ProgressLine, on_interrupt
from cna_agent.cli.table import human_bytes, keyvalues, table

S = pb.storage_pb2
_FORMATS = {"qcow2": S.VOLUME_FORMAT_QCOW2, "raw": S.VOLUME_FORMAT_RAW, "vmdk": S.VOLUME_FORMAT_VMDK,
            "vpc": S.VOLUME_FORMAT_VPC, "vhd": S.VOLUME_FORMAT_VPC, "vhdx": S.VOLUME_FORMAT_VHDX}
_UNITS = {"": 1, "b": 1, "k": 1024, "kib": 1024, "m": 1024**2, "mib": 1024**2, "g": 1024**3, "gib": 1024**3,
          "t": 1024**4, "tib": 1024**4}


def parse_size(text: str) -> int:
    """"20G", "512MiB", "1048576" -> bytes (binary units, as qemu-img)."""
    m = re.fullmatch(r"\s*(\d+)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 20G, 512M or a byte count")
    return int(m.group(1)) * _UNITS[m.group(2).lower()]


def _fmt(v) -> str:
    return S.VolumeFormat.Name(v.format).removeprefix("VOLUME_FORMAT_").lower()


def _vol_block(v) -> str:
    pairs = [("Id", v.id), ("Datastore", v.datastore), ("Path", v.path), ("Format", _fmt(v)),
             ("Virtual size", f"{human_bytes(v.virtual_size_bytes)} ({v.virtual_size_bytes} bytes)"),
             ("Allocated", human_bytes(v.actual_size_bytes)), ("Backing volume", v.backing_volume or "-"),
             ("Template", "yes" if v.template else "no"), ("Used by", ", ".join(v.used_by) or "-")]
    if v.HasField("check"):
        # An import's qemu-img check ran on its source (before the conversion), not on this volume.
        pairs.append(("Source check", v.check.summary if v.check.supported else f"none ({v.check.summary})"))
    return keyvalues(pairs)


def follow(client: Client, args: argparse.Namespace, op, response_type: Any, render: Callable[[Any], str]) -> str | None:
    """Watch ``op`` to the end with a progress bar; print its response (or fail with its error)."""
    if getattr(args, "no_wait", False):
        return json.dumps(to_json(op), indent=2) if args.json else f"operation {op.id} ({op.kind}) started; follow it with: cna-ctl ops show -w {op.id}"
    last = op
    tty = sys.stdout.isatty()
    bar = ProgressLine()  # cli/progress.py: the one rendering of a bar (bytes, rate, time left)

    def show(update) -> None:
        if args.json:
            print(json.dumps({"operation": update.id, "percent": update.progress.percent, "stage": update.progress.stage,
                              "bytes_done": update.progress.bytes_done, "bytes_total": update.progress.bytes_total}), flush=True)
        elif tty:
            p = update.progress
            print("\r" + bar.render(p.percent, p.stage, p.bytes_done, p.bytes_total).ljust(78), end="", flush=True)

    if op.done:
        show(op)
    else:
        try:
            with on_interrupt(client, op):
                for update in client.ops.WatchOperation(pb.operations_pb2.WatchOperationRequest(id=op.id)):
                    last = update
                    show(update)
        except grpc.RpcError as exc:
            raise rpc_error(exc, client.socket_path) from None
    if tty and not args.json:
        print(flush=True)
    if last.HasField("error"):
        fields = "".join(f"\n  {v.field}: {v.description}" for v in last.error.field_violations)
        raise CliError(f"{last.kind} failed: {last.error.message}{fields}")
    if last.HasField("response") and response_type is not None:
        msg = response_type()
        last.response.Unpack(msg)
        return json.dumps(to_json(msg), indent=2) if args.json else render(msg)
    return json.dumps(to_json(last), indent=2) if args.json else f"{last.kind} done"


def _split(text: str) -> tuple[str, str]:
    ds, sep, path = text.partition("/")
    if not sep or not ds or not path:
        raise CliError(f"{text!r}: expected DATASTORE/PATH", 2)
    return ds, path


def cmd_list(client: Client, args: argparse.Namespace) -> str:
    resp = client.call(client.storage.ListVolumes, S.ListVolumesRequest(datastore=args.datastore))
    if args.json:
        return json.dumps(to_json(resp), indent=2)
    if not resp.volumes:
        return f"no volumes on {args.datastore}"
    return table(["ID", "FORMAT", "SIZE", "ALLOCATED", "BACKING", "TEMPLATE", "USED BY"],
                 [[v.id, _fmt(v), human_bytes(v.virtual_size_bytes), human_bytes(v.actual_size_bytes), v.backing_volume or "-",
                   "yes" if v.template else "", ",".join(v.used_by) or "-"] for v in resp.volumes])


def cmd_info(client: Client, args: argparse.Namespace) -> str:
    v = client.call(client.storage.GetVolume, S.GetVolumeRequest(id=args.id))
    return json.dumps(to_json(v), indent=2) if args.json else _vol_block(v)


def cmd_create(client: Client, args: argparse.Namespace) -> str | None:
    ds, path = _split(args.volume)
    op = client.call(client.storage.CreateVolume, S.CreateVolumeRequest(
        request_id=args.request_id or "", datastore=ds, path=path, format=_FORMATS[args.format], size_bytes=args.size,
        preallocate=args.preallocate))
    return follow(client, args, op, S.Volume, _vol_block)


def cmd_resize(client: Client, args: argparse.Namespace) -> str | None:
    op = client.call(client.storage.ResizeVolume, S.ResizeVolumeRequest(request_id=args.request_id or "", id=args.id, new_size_bytes=args.size))
    return follow(client, args, op, S.Volume, _vol_block)


def cmd_delete(client: Client, args: argparse.Namespace) -> str | None:
    op = client.call(client.storage.DeleteVolume, S.DeleteVolumeRequest(request_id=args.request_id or "", id=args.id))
    return follow(client, args, op, None, str)


def cmd_clone(client: Client, args: argparse.Namespace) -> str | None:
    ds, path = _split(args.target)
    op = client.call(client.storage.CloneVolume, S.CloneVolumeRequest(
        request_id=args.request_id or "", source=args.source, datastore=ds, path=path, linked=args.linked,
        format=_FORMATS[args.format] if args.format else S.VOLUME_FORMAT_UNSPECIFIED))
    return follow(client, args, op, S.Volume, _vol_block)


def cmd_import(client: Client, args: argparse.Namespace) -> str | None:
    ds, path = _split(args.target)
    op = client.call(client.storage.ImportVolume, S.ImportVolumeRequest(
        request_id=args.request_id or "", source=args.source, datastore=ds, path=path,
        source_format=_FORMATS[args.source_format] if args.source_format else S.VOLUME_FORMAT_UNSPECIFIED,
        format=_FORMATS[args.format] if args.format else S.VOLUME_FORMAT_UNSPECIFIED))
    return follow(client, args, op, S.Volume, _vol_block)


def cmd_export(client: Client, args: argparse.Namespace) -> str | None:
    ds, path = _split(args.target)
    op = client.call(client.storage.ExportVolume, S.ExportVolumeRequest(
        request_id=args.request_id or "", id=args.id, datastore=ds, path=path,
        format=_FORMATS[args.format] if args.format else S.VOLUME_FORMAT_UNSPECIFIED))
    return follow(client, args, op, S.Volume, _vol_block)


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    vol = sub.add_parser("volume", help="volumes on datastores (qcow2/raw), clones, imports").add_subparsers(
        dest="cmd", metavar="COMMAND", required=True)

    def op_parser(name: str, help: str) -> argparse.ArgumentParser:
        p = vol.add_parser(name, parents=[common], help=help)
        p.add_argument("--request-id", help="idempotency key (a repeat returns the first result)")
        p.add_argument("--no-wait", action="store_true", help="print the operation and return at once")
        return p

    p = vol.add_parser("list", parents=[common], help="volumes of a directory datastore")
    p.add_argument("datastore")
    p.set_defaults(func=cmd_list)
    p = vol.add_parser("info", parents=[common], help="one volume")
    p.add_argument("id", help="DATASTORE/PATH")
    p.set_defaults(func=cmd_info)
    p = op_parser("create", "create a volume")
    p.add_argument("volume", help="DATASTORE/PATH (.qcow2 for qcow2)")
    p.add_argument("--size", type=parse_size, required=True, help="e.g. 20G")
    p.add_argument("--format", choices=["qcow2", "raw"], default="qcow2")
    p.add_argument("--preallocate", action="store_true", help="allocate every block now")
    p.set_defaults(func=cmd_create)
    p = op_parser("resize", "grow a volume (shrinking is refused)")
    p.add_argument("id")
    p.add_argument("--size", type=parse_size, required=True)
    p.set_defaults(func=cmd_resize)
    p = op_parser("delete", "delete a volume")
    p.add_argument("id")
    p.set_defaults(func=cmd_delete)
    p = op_parser("clone", "full copy, or --linked qcow2 overlay of a template")
    p.add_argument("source")
    p.add_argument("target", help="DATASTORE/PATH")
    p.add_argument("--linked", action="store_true")
    p.add_argument("--format", choices=["qcow2", "raw"])
    p.set_defaults(func=cmd_clone)
    p = op_parser("import", "convert a vmdk/vhd/vhdx/raw/qcow2 file on a datastore into a volume")
    p.add_argument("source", help="DATASTORE/PATH of the file to import")
    p.add_argument("target", help="DATASTORE/PATH of the new volume")
    p.add_argument("--source-format", choices=sorted(_FORMATS))
    p.add_argument("--format", choices=["qcow2", "raw"])
    p.set_defaults(func=cmd_import)
    p = op_parser("export", "write a volume out as qcow2/raw/vmdk/vhd")
    p.add_argument("id")
    p.add_argument("target", help="DATASTORE/PATH")
    p.add_argument("--format", choices=["qcow2", "raw", "vmdk", "vpc", "vhd"])
    p.set_defaults(func=cmd_export)
