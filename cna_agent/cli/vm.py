"""cna-ctl vm list|show|define|start|stop|reboot|pause|resume|delete (console, snapshot, migrate,
guest-info: own modules).

``define`` reads a VmSpec from a YAML or JSON file. Field names are the proto's
(``memory_mib``, ``os_family``...); enum values may be the proto names (``OS_FAMILY_WINDOWS``)
or the short forms the agent uses (``windows``, ``uefi``, ``virtio``). ``--customization``
reads a GuestCustomization (first boot: hostname, users, keys, addresses) the same way; one file
may hold both, under ``spec:`` and ``customization:``. Mutating commands wait
for their operation (``--no-wait`` returns its id at once) and exit 1 when it failed.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import duration_pb2, json_format

from cna_agent.api import pb
from cna_agent.cli.common import CliError, Client, EXIT_USAGE, fmt_time, rpc_error, to_json
from cna_agent.cli.table import keyvalues, table

v = pb.vm_pb2

#: spec field -> enum prefix, for the short enum spellings accepted in spec files.
_ENUM_FIELDS = {
    "arch": "ARCH_", "firmware": "FIRMWARE_", "os_family": "OS_FAMILY_", "cpu_mode": "CPU_MODE_", "device": "DISK_DEVICE_",
    "bus": "DISK_BUS_", "cache": "DISK_CACHE_", "io": "DISK_IO_MODE_", "error_policy": "DISK_ERROR_POLICY_", "model": "NIC_MODEL_",
    "type": "CONSOLE_TYPE_",
}


def _normalise(data: Any, key: str = "") -> Any:
    if isinstance(data, dict):
        return {k: _normalise(val, k) for k, val in data.items()}
    if isinstance(data, list):
        return [_normalise(item, key) for item in data]
    if isinstance(data, str) and key in _ENUM_FIELDS and not data.isupper():
        return _ENUM_FIELDS[key] + data.replace("-", "_").upper()
    return data


def load_spec(path: str) -> Any:
    """A VmSpec from a YAML/JSON file; errors name the file and the problem."""
    return load_message(path, "spec", v.VmSpec())


def load_customization(path: str) -> Any:
    """A GuestCustomization from a YAML/JSON file (or the ``customization`` mapping of a
    define file holding both), for ``define --customization``."""
    return load_message(path, "customization", v.GuestCustomization())


def load_message(path: str, key: str, message: Any) -> Any:
    """``message`` filled from a YAML/JSON file: the file's ``key`` mapping when it has one,
    else the whole file."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise CliError(f"{path}: cannot read: {exc.strerror}", EXIT_USAGE) from None
    try:
        if path.endswith((".yaml", ".yml")):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as exc:  # yaml.YAMLError / json.JSONDecodeError
        raise CliError(f"{path}: not valid {'YAML' if path.endswith(('.yaml', '.yml')) else 'JSON'}: {exc}", EXIT_USAGE) from None
    kind = type(message).__name__
    if not isinstance(data, dict):
        raise CliError(f"{path}: expected a mapping of {kind} fields", EXIT_USAGE)
    if key in data and isinstance(data[key], dict):
        data = data[key]
    elif key == "spec" and "customization" in data:
        raise CliError(f"{path}: holds a customization but no spec mapping", EXIT_USAGE)
    try:
        return json_format.ParseDict(_normalise(data), message)
    except json_format.ParseError as exc:
        raise CliError(f"{path}: {exc}", EXIT_USAGE) from None


def _state(s: int) -> str:
    return v.VmState.Name(s).removeprefix("VM_STATE_").lower()


def _wait(client: Client, op: Any, args: argparse.Namespace) -> str:
    if not getattr(args, "wait", True) or op.done:
        final = op
    else:
        final = op
        try:
            for cur in client.ops.WatchOperation(pb.operations_pb2.WatchOperationRequest(id=op.id)):
                final = cur
        except grpc.RpcError as exc:
            raise rpc_error(exc, client.socket_path) from None
    if final.HasField("error"):
        fields = "".join(f"\n  {f.field}: {f.description}" for f in final.error.field_violations)
        raise CliError(f"{final.kind} failed: {final.error.message}{fields}")
    if args.json:
        return json.dumps(to_json(final), indent=2)
    if not final.done:
        return f"{final.kind} {final.id} started"
    result = ""
    if final.response.type_url.endswith("cna.v1.Vm"):
        vm = v.Vm()
        final.response.Unpack(vm)
        result = f": {vm.name} is {_state(vm.status.state)}"
    return f"{final.kind} done{result}"


def cmd_list(client: Client, args: argparse.Namespace) -> str:
    states = [v.VmState.Value("VM_STATE_" + s.upper()) for s in args.state or []]
    resp = client.call(client.vms.ListVms, v.ListVmsRequest(states=states, include_unmanaged=args.all, status_only=not args.json,
                                                           recycled=args.recycled))
    if args.json:
        return json.dumps(to_json(resp), indent=2)
    if not resp.vms:
        return "the recycle bin is empty" if args.recycled else "no VMs"
    if args.recycled:
        return table(["NAME", "UUID", "DELETED ON EXPIRY"], [[x.name, x.uuid, fmt_time(x.status.recycle_expire_time)] for x in resp.vms])
    return table(["NAME", "UUID", "STATE", "REASON", "MANAGED"],
                 [[x.name, x.uuid, "template" if x.status.template else _state(x.status.state), x.status.state_reason or "-",
                   "yes" if x.managed else "no"] for x in resp.vms])


def cmd_show(client: Client, args: argparse.Namespace) -> str:
    x = client.call(client.vms.GetVm, v.GetVmRequest(vm=args.vm))
    if args.json:
        return json.dumps(to_json(x), indent=2)
    s, st = x.spec, x.status
    pairs = [("Name", x.name), ("UUID", x.uuid), ("Managed", "yes" if x.managed else "no"),
             ("State", f"{_state(st.state)} ({st.state_reason or '-'})"), ("Since", fmt_time(st.state_time)),
             ("vCPUs", f"{s.vcpus} (max {s.max_vcpus or s.vcpus})"), ("Memory", f"{s.memory_mib} MiB"),
             ("OS family", v.OsFamily.Name(s.os_family).removeprefix("OS_FAMILY_").lower()),
             ("Disks", ", ".join(d.volume or d.lun.lun_id for d in s.disks) or "-"),
             ("NICs", ", ".join(f"{n.port_group} {n.mac}" for n in s.nics) or "-"),
             ("QEMU pid", st.qemu_pid or "-"), ("Operation", st.active_operation_id or "-")]
    if st.tools_status:
        from cna_agent.cli.vm_guest import tools_text

        pairs.append(("Tools", tools_text(st.tools_status, st.tools_version)))
    if st.HasField("customization"):
        word = v.CustomizationState.Name(st.customization.state).removeprefix("CUSTOMIZATION_STATE_").lower()
        pairs.append(("First boot", f"{word}" + (f" ({st.customization.message})" if st.customization.message else "")))
    if st.template:
        pairs.append(("Template", "yes (read-only; `vm deploy` makes VMs from it)"))
    if st.pending_changes:
        pairs.append(("Pending", ", ".join(st.pending_changes) + " (at the next start)"))
    if st.HasField("console") and st.console.port:
        pairs.append(("Console", f"{v.ConsoleType.Name(st.console.type).removeprefix('CONSOLE_TYPE_').lower()} {st.console.host}:{st.console.port}"))
    return keyvalues(pairs)


def cmd_define(client: Client, args: argparse.Namespace) -> str:
    spec = load_spec(args.file)
    request = v.CreateVmRequest(spec=spec, start=args.start, request_id=args.request_id or "")
    if args.customization:
        request.customization.CopyFrom(load_customization(args.customization))
    op = client.call(client.vms.CreateVm, request)
    return _wait(client, op, args)


def _lock(args: argparse.Namespace) -> duration_pb2.Duration:
    return duration_pb2.Duration(seconds=int(args.lock_timeout))


def cmd_action(client: Client, args: argparse.Namespace) -> str:
    method = {"start": client.vms.StartVm, "pause": client.vms.PauseVm, "resume": client.vms.ResumeVm}[args.cmd]
    op = client.call(method, v.VmActionRequest(vm=args.vm, lock_timeout=_lock(args), request_id=args.request_id or ""))
    return _wait(client, op, args)


def cmd_stop(client: Client, args: argparse.Namespace) -> str:
    op = client.call(client.vms.ShutdownVm, v.ShutdownVmRequest(
        vm=args.vm, timeout=duration_pb2.Duration(seconds=int(args.shutdown_timeout)), force=args.force, hard=args.hard,
        lock_timeout=_lock(args), request_id=args.request_id or ""))
    return _wait(client, op, args)


def cmd_reboot(client: Client, args: argparse.Namespace) -> str:
    op = client.call(client.vms.RebootVm, v.RebootVmRequest(vm=args.vm, hard=args.hard, lock_timeout=_lock(args),
                                                             request_id=args.request_id or ""))
    return _wait(client, op, args)


def hold_seconds(text: str) -> int:
    """``--hold``: seconds, or a number with s, m, h or d ("7d")."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    try:
        if text and text[-1] in units:
            return int(float(text[:-1]) * units[text[-1]])
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration like 3600, 90m, 12h or 7d") from None


def cmd_delete(client: Client, args: argparse.Namespace) -> str:
    op = client.call(client.vms.DeleteVm, v.DeleteVmRequest(vm=args.vm, delete_disks=args.delete_disks, force=args.force,
                                                             hold_time_s=args.hold, request_id=args.request_id or ""))
    return _wait(client, op, args)


def cmd_restore(client: Client, args: argparse.Namespace) -> str:
    if args.from_dir:  # from a backup directory (vm_backup.py), not from the recycle bin
        if not args.to:
            raise CliError("--from needs --to FILE, the new image to write", EXIT_USAGE)
        from cna_agent.cli.vm_backup import cmd_restore_backup

        return cmd_restore_backup(client, args)
    op = client.call(client.vms.RestoreVm, v.VmActionRequest(vm=args.vm, request_id=args.request_id or ""))
    return _wait(client, op, args)


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    vms = sub.add_parser("vm", help="virtual machines").add_subparsers(dest="cmd", metavar="COMMAND", required=True)
    p = vms.add_parser("list", parents=[common], help="VMs on this host")
    p.add_argument("--state", action="append", choices=["stopped", "running", "paused", "shutting_down", "crashed", "migrating",
                                                        "suspended", "starting", "unknown", "hibernated"], help="only VMs in this state (repeatable)")
    p.add_argument("--all", action="store_true", help="also domains not created by the agent")
    p.add_argument("--recycled", action="store_true", help="only the VMs in the recycle bin, with when each is deleted")
    p.set_defaults(func=cmd_list)
    p = vms.add_parser("show", aliases=["info"], parents=[common], help="one VM's spec and status")
    p.add_argument("vm", help="name or UUID")
    p.set_defaults(func=cmd_show)

    def mutating(name: str, help_: str, func, *, vm_arg: bool = True, **kw) -> argparse.ArgumentParser:
        q = vms.add_parser(name, parents=[common], help=help_, **kw)
        if vm_arg:
            q.add_argument("vm", help="name or UUID")
        q.add_argument("--no-wait", dest="wait", action="store_false", help="return the operation id at once")
        q.add_argument("--request-id", help="idempotency key: repeating it returns the first operation")
        q.set_defaults(func=func)
        return q

    q = mutating("define", "define a VM from a YAML/JSON VmSpec file", cmd_define, vm_arg=False)
    q.add_argument("file")
    q.add_argument("--start", action="store_true", help="start it after defining")
    q.add_argument("--customization", metavar="FILE", help="first-boot customization (YAML/JSON GuestCustomization; "
                                                           "may be FILE itself when it holds spec: and customization:)")
    for name in ("start", "pause", "resume"):
        q = mutating(name, f"{name} a VM", cmd_action)
        q.add_argument("--lock-timeout", type=float, default=0, help="seconds to wait when the VM is busy (default: fail at once)")
    q = mutating("stop", "shut a VM down (ACPI, then power off with --force)", cmd_stop, aliases=["shutdown"])
    q.add_argument("--timeout", dest="shutdown_timeout", type=float, default=120, help="seconds to wait for the guest (default 120)")
    q.add_argument("--force", action="store_true", help="power off when the guest does not shut down in time")
    q.add_argument("--hard", action="store_true", help="power off at once")
    q.add_argument("--lock-timeout", type=float, default=0)
    q = mutating("reboot", "reboot a VM (ACPI; --hard resets)", cmd_reboot)
    q.add_argument("--hard", action="store_true")
    q.add_argument("--lock-timeout", type=float, default=0)
    q = mutating("delete", "delete a VM (keeps its disks unless --delete-disks)", cmd_delete)
    q.add_argument("--delete-disks", action="store_true")
    q.add_argument("--force", action="store_true", help="power off a running VM first")
    q.add_argument("--hold", type=hold_seconds, default=0, metavar="DURATION",
                   help="keep it in the recycle bin this long (e.g. 7d), restorable, then delete it")
    q = mutating("restore", "bring a VM back from the recycle bin (stopped), or --from a backup directory into a file",
                 cmd_restore)
    q.add_argument("--from", dest="from_dir", metavar="DIR", help="a `vm backup` directory: restore a disk from its chain")
    q.add_argument("--to", metavar="FILE", help="with --from: the standalone qcow2 to write")
    q.add_argument("--disk", default="", help="with --from: which disk (default: the only one)")
    q.add_argument("--checkpoint", default="", help="with --from: as of this backup (default: the newest)")
    from cna_agent.cli.vm_console import register_console

    register_console(vms, common)
    from cna_agent.cli.vm_snapshot import register_snapshot

    register_snapshot(vms, common)
    from cna_agent.cli.vm_migrate import register_migrate

    register_migrate(vms, common)
    from cna_agent.cli.vm_hibernate import register_hibernate
    from cna_agent.cli.vm_backup import register_backup
    from cna_agent.cli.vm_disk_move import register_move_disk

    register_move_disk(vms, common)

    register_backup(vms, common)

    register_hibernate(vms, common)
    from cna_agent.cli.vm_guest import register_guest

    register_guest(vms, common)
    from cna_agent.cli.vm_update import register_update

    register_update(vms, common)
    from cna_agent.cli.vm_template import register_template

    register_template(vms, common)
