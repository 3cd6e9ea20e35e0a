"""``cna-ctl vm update VM [--vcpus N] [--max-vcpus N] [--memory-mib N] [--max-memory-mib N]
[--allow-pending]``: resize a VM. A running VM takes vCPU and memory hot-plug at once; with
``--allow-pending`` what cannot change live is kept for its next start, and the summary line
says which of the asked changes applied now and which wait (GetVm's status.pending_changes).
"""

from __future__ import annotations

import argparse

from cna_agent.api import pb
from cna_agent.cli.common import CliError, Client
from cna_agent.cli.progress import elapsed_s, watched

v = pb.vm_pb2
#: The flags, as UpdateVm's update_mask names them.
FIELDS = ("vcpus", "max_vcpus", "memory_mib", "max_memory_mib")


def _summary(vm: str, asked: list[str], op) -> str:
    took = f" in {elapsed_s(op):.1f} s"
    if op.HasField("error"):
        return f"{vm} was not updated{took}: {op.error.message}"
    got = v.Vm()
    op.response.Unpack(got)
    waiting = [f for f in asked if f in got.status.pending_changes]
    now = [f for f in asked if f not in waiting]
    line = f"{vm} updated{took}: " + (", ".join(now) or "nothing") + " now"
    return line + (f"; {', '.join(waiting)} at its next start" if waiting else "")


def cmd_update(client: Client, args: argparse.Namespace) -> str:
    asked = [f for f in FIELDS if getattr(args, f) is not None]
    if not asked:
        raise CliError("name a change: --vcpus, --max-vcpus, --memory-mib or --max-memory-mib")
    spec = v.VmSpec(**{f: getattr(args, f) for f in asked})
    request = v.UpdateVmRequest(vm=args.vm, spec=spec, update_mask=asked, allow_pending=args.allow_pending,
                                request_id=args.request_id or "")
    return watched(client, args, client.call(client.vms.UpdateVm, request), lambda o: _summary(args.vm, asked, o))


def register_update(vms: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    q = vms.add_parser("update", parents=[common], help="change a VM's vCPUs or memory (live where it can)")
    q.add_argument("vm", help="name or UUID")
    for f in FIELDS:
        q.add_argument("--" + f.replace("_", "-"), dest=f, type=int, metavar="N")
    q.add_argument("--allow-pending", action="store_true",
                   help="on a running VM, keep what cannot change live for its next start instead of failing")
    q.add_argument("--no-wait", dest="wait", action="store_false", help="return the operation id at once")
    q.add_argument("--request-id", help="idempotency key: repeating it returns the first operation")
    q.set_defaults(func=cmd_update)
