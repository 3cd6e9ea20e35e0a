"""cna-ctl vm guest-info | set-password: what the guest agent (qemu-guest-agent) reports from
inside a guest, and a guest user's password set through it.

Why its own command: GetVm shows only the tools status (read from the host side); the OS,
hostname, addresses and filesystems are a call into the guest, which an admin asks for
deliberately and which may come back stale when the guest agent does not answer.
"""

from __future__ import annotations

import argparse
import getpass
import json
import sys

from cna_agent.api import pb
from cna_agent.cli.common import EXIT_USAGE, CliError, Client, fmt_time, to_json
from cna_agent.cli.table import keyvalues, table

v = pb.vm_pb2


def tools_text(status: int, version: str) -> str:
    """ "running (7.2.22)", "not installed", ... for a ToolsStatus."""
    word = v.ToolsStatus.Name(status).removeprefix("TOOLS_STATUS_").lower().replace("_", " ")
    return f"{word} ({version})" if version else word


def _gib(n: int) -> str:
    return f"{n / 1024**3:.1f}G"


def cmd_guest_info(client: Client, args: argparse.Namespace) -> str:
    g = client.call(client.vms.GetGuestInfo, v.GetGuestInfoRequest(vm=args.vm, max_age_s=args.max_age))
    if args.json:
        return json.dumps(to_json(g), indent=2)
    pairs = [("Tools", tools_text(g.tools_status, g.tools_version)),
             ("OS", g.os_pretty_name or " ".join(x for x in (g.os_name, g.os_version) if x) or "-"),
             ("Kernel", g.kernel_release or "-"), ("Hostname", g.hostname or "-"), ("Timezone", g.timezone or "-"),
             ("Users", ", ".join(g.users) or "-"),
             ("Read", fmt_time(g.read_time) if g.HasField("read_time") else "never")]
    if g.stale or g.error:
        pairs.append(("Stale", g.error or "yes"))
    out = [keyvalues(pairs)]
    if g.interfaces:
        out.append(table(["NIC", "GUEST NAME", "MAC", "ADDRESSES"],
                         [[str(i.nic_index) if i.nic_index >= 0 else "-", i.name, i.mac,
                           " ".join(f"{a.address}/{a.prefix}" for a in i.addresses) or "-"] for i in g.interfaces]))
    if g.filesystems:
        out.append(table(["MOUNT", "TYPE", "DEVICE", "SIZE", "USED", "DISKS"],
                         [[f.mountpoint, f.fstype, f.name, _gib(f.total_bytes), _gib(f.used_bytes), ",".join(f.disks) or "-"]
                          for f in g.filesystems]))
    return "\n\n".join(out)


def _read_password(crypted: bool) -> str:
    """From the terminal (asked twice, not echoed) or, when stdin is not one, its first line: a
    password never goes on the command line, where ps and the shell's history would show it."""
    what = "hash" if crypted else "password"
    if not sys.stdin.isatty():
        return sys.stdin.readline().rstrip("\n")
    first = getpass.getpass(f"new {what}: ")
    if getpass.getpass("again: ") != first:
        raise CliError(f"the two {what}s differ; nothing was changed", EXIT_USAGE)
    return first


def cmd_set_password(client: Client, args: argparse.Namespace) -> str:
    from cna_agent.cli.vm import _wait

    password = _read_password(args.crypted)
    op = client.call(client.vms.SetGuestPassword, v.SetGuestPasswordRequest(
        vm=args.vm, user=args.user, password=password, crypted=args.crypted, request_id=args.request_id or ""))
    out = _wait(client, op, args)
    return out if args.json else f"password of {args.user} set in {args.vm}"


def register_guest(vms: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = vms.add_parser("guest-info", parents=[common], help="what the guest agent reports: OS, hostname, addresses, filesystems")
    p.add_argument("vm", help="name or UUID")
    p.add_argument("--max-age", type=int, default=0, metavar="SECONDS",
                   help="accept a read this old (default: the agent's minimum interval)")
    p.set_defaults(func=cmd_guest_info)
    p = vms.add_parser("set-password", parents=[common],
                       help="set a guest user's password through the guest agent (read from the terminal or stdin)")
    p.add_argument("vm", help="name or UUID")
    p.add_argument("user", help="the account in the guest")
    p.add_argument("--crypted", action="store_true", help="the input is a crypt(3) hash ($6$salt$hash), not a password")
    p.add_argument("--request-id", help="idempotency key: repeating it returns the first operation")
    p.set_defaults(func=cmd_set_password, wait=True)
