"""``cna-ctl vm backup NAME --to DIR [--incremental]`` and ``cna-ctl vm restore NAME --from DIR
--to FILE``: a restorable chain of qcow2 files per disk, written from a pull backup.

DIR holds ``chain.json`` (which VM, and each backup in order: its checkpoint, the one it is
incremental from, its file per disk, bytes copied) and the files, ``<disk>.<n>.full.qcow2`` and
``<disk>.<n>.inc.qcow2`` (each incremental's backing file is the one before it, named relative
to DIR, so the directory can be moved as a whole). ``--incremental`` starts from the chain's
newest checkpoint; the agent refuses it when the VM no longer has that checkpoint (then a full
backup starts a new chain). The backup job is always stopped at the end, also on failure or
Ctrl-C, so no export or scratch file is left on the host.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

from cna_agent import backup_copy
from cna_agent.api import pb
from cna_agent.cli.common import CliError, Client, EXIT_USAGE
from cna_agent.cli.progress import ProgressLine
from cna_agent.cli.table import human_bytes
from cna_agent.cli.common import to_json

bk = pb.backup_pb2
CHAIN = "chain.json"


def _wait_ok(client: Client, op: Any) -> Any:
    if not op.done:
        for cur in client.ops.WatchOperation(pb.operations_pb2.WatchOperationRequest(id=op.id)):
            op = cur
    if op.HasField("error"):
        raise CliError(f"{op.kind} failed: {op.error.message}")
    return op


def read_chain(directory: str) -> dict:
    try:
        with open(os.path.join(directory, CHAIN), encoding="utf-8") as fh:
            return json.load(fh)
    except FileNotFoundError:
        return {}
    except ValueError as exc:
        raise CliError(f"{os.path.join(directory, CHAIN)} is not readable: {exc}") from None


def _write_chain(directory: str, chain: dict) -> None:
    tmp = os.path.join(directory, f".{CHAIN}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(chain, fh, indent=2, sort_keys=True)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, os.path.join(directory, CHAIN))


def cmd_backup(client: Client, args: argparse.Namespace) -> str:
    directory = os.path.abspath(args.to)
    os.makedirs(directory, mode=0o700, exist_ok=True)
    chain = read_chain(directory)
    vm = client.call(client.vms.GetVm, pb.vm_pb2.GetVmRequest(vm=args.vm))
    if chain and chain.get("vm_uuid") != vm.uuid:
        raise CliError(f"{directory} holds backups of another VM ({chain.get('vm_name')}, {chain.get('vm_uuid')})", EXIT_USAGE)
    backups = chain.get("backups", [])
    since = backups[-1]["checkpoint"] if args.incremental and backups else ""
    if args.incremental and not since:
        raise CliError(f"{directory} has no full backup to be incremental from; run without --incremental first", EXIT_USAGE)
    op = _wait_ok(client, client.call(client.backups.StartBackup, bk.StartBackupRequest(vm=args.vm, incremental_from=since,
                                                                                     quiesce=args.quiesce)))
    info = bk.Backup()
    op.response.Unpack(info)
    n = len(backups) + 1
    entry: dict[str, Any] = {"checkpoint": info.checkpoint, "incremental_from": since, "time": time.time(), "files": {},
                             "bytes": 0}
    line, out = ProgressLine(), sys.stderr
    started = time.monotonic()
    try:
        for disk in info.disks:
            kind = "inc" if since else "full"
            name = f"{disk.target}.{n:04d}.{kind}.qcow2"
            path = os.path.join(directory, name)
            backing = backups[-1]["files"].get(disk.target, "") if since else ""
            if since and not backing:
                raise CliError(f"the chain has no earlier file for disk {disk.target}; run a full backup", EXIT_USAGE)
            backup_copy.create_target(path, disk.size_bytes, backing)

            def show(done: int, total: int, target: str = disk.target) -> None:
                pct = int(100 * done / total) if total else 100
                out.write("\r" + line.render(pct, f"{kind} {target}", done, total)[:160].ljust(100))
                out.flush()

            stats = backup_copy.copy_export(info.socket, disk.export_name, path, dirty_bitmap=disk.dirty_bitmap, progress=show)
            entry["files"][disk.target] = name
            entry["bytes"] += stats.bytes_copied
        if out.isatty():
            out.write("\n")
    finally:
        _wait_ok(client, client.call(client.backups.StopBackup, bk.StopBackupRequest(vm=args.vm)))
    chain = {"vm_uuid": vm.uuid, "vm_name": vm.name, "backups": [*backups, entry]}
    _write_chain(directory, chain)
    if args.json:
        return json.dumps({"chain": chain, "backup": to_json(info)}, indent=2)
    took = time.monotonic() - started
    return (f"{'incremental' if since else 'full'} backup {n} of {vm.name} in {directory}: "
            f"{human_bytes(entry['bytes'])} copied in {took:.1f} s, checkpoint {info.checkpoint}")


def cmd_restore_backup(client: Client, args: argparse.Namespace) -> str:
    directory = os.path.abspath(args.from_dir)
    chain = read_chain(directory)
    if not chain:
        raise CliError(f"{directory} has no {CHAIN}: not a backup directory", EXIT_USAGE)
    if args.vm not in (chain.get("vm_uuid"), chain.get("vm_name")):
        raise CliError(f"{directory} holds backups of {chain.get('vm_name')} ({chain.get('vm_uuid')}), not {args.vm}", EXIT_USAGE)
    backups = chain["backups"]
    if args.checkpoint:
        upto = [i for i, b in enumerate(backups) if b["checkpoint"] == args.checkpoint]
        if not upto:
            raise CliError(f"no backup with checkpoint {args.checkpoint} in {directory}", EXIT_USAGE)
        backups = backups[:upto[0] + 1]
    disks = sorted(backups[-1]["files"])
    disk = args.disk or (disks[0] if len(disks) == 1 else "")
    if disk not in disks:
        raise CliError(f"name the disk to restore with --disk ({', '.join(disks)})", EXIT_USAGE)
    if os.path.exists(args.to):
        raise CliError(f"{args.to} exists; restore into a new file", EXIT_USAGE)
    backup_copy.restore_chain(os.path.join(directory, backups[-1]["files"][disk]), args.to)
    return f"{disk} of {chain['vm_name']} as of backup {len(backups)} ({backups[-1]['checkpoint']}) restored to {args.to}"


def register_backup(vms: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    q = vms.add_parser("backup", parents=[common], help="back a running VM up into a qcow2 chain in DIR (pull mode, NBD)")
    q.add_argument("vm", help="name or UUID")
    q.add_argument("--to", required=True, metavar="DIR", help="the backup directory (chain.json and the files)")
    q.add_argument("--incremental", action="store_true", help="only what changed since the newest backup in DIR")
    q.add_argument("--quiesce", action="store_true", help="freeze the guest's file systems for the backup's point "
                                                          "(needs qemu-guest-agent in the guest)")
    q.set_defaults(func=cmd_backup)
