"""``cna-ctl vm migrate NAME --to HOST:PORT``: move a VM to another agent's host, with a progress
bar (percent, bytes, rate, time left) and a summary line.

The policy flags are MigrationPolicy's fields (vm.proto); unset ones take the agent's defaults.
``host maintenance on`` uses the same flags (add_policy_args / policy_from_args).
"""

from __future__ import annotations

import argparse

from cna_agent.api import pb
from cna_agent.cli.common import CliError, Client, EXIT_USAGE
from cna_agent.cli.progress import elapsed_s, watched
from cna_agent.cli.table import human_bytes

v = pb.vm_pb2


def add_policy_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("migration policy (defaults: the agent's)")
    g.add_argument("--max-downtime-ms", type=int, default=0, help="longest pause at the switch-over (default 300, stepped up on stalls)")
    g.add_argument("--bandwidth-mib-s", type=int, default=0, help="cap the memory stream (default: unlimited)")
    g.add_argument("--auto-converge", action="store_true", help="throttle a guest that dirties memory faster than it is sent")
    g.add_argument("--post-copy", action="store_true", help="permit post-copy (switch over, then pull the rest on demand)")
    g.add_argument("--progress-timeout-s", type=int, default=0, help="abort after this long without progress (default 60)")
    g.add_argument("--completion-timeout-s-per-gib", type=int, default=0, help="job time limit per GiB of RAM (default 120)")
    g.add_argument("--completion-action", choices=["abort", "post-copy", "pause"], default="",
                   help="what to do at the completion timeout (default abort)")


def policy_from_args(args: argparse.Namespace) -> "v.MigrationPolicy":
    for name in ("max_downtime_ms", "bandwidth_mib_s", "progress_timeout_s", "completion_timeout_s_per_gib"):
        if getattr(args, name) < 0:
            raise CliError(f"--{name.replace('_', '-')} must not be negative", EXIT_USAGE)
    return v.MigrationPolicy(max_downtime_ms=args.max_downtime_ms, bandwidth_mib_s=args.bandwidth_mib_s,
                             auto_converge=args.auto_converge, permit_post_copy=args.post_copy,
                             progress_timeout_s=args.progress_timeout_s,
                             completion_timeout_s_per_gib=args.completion_timeout_s_per_gib,
                             completion_action=args.completion_action)


def migrate_summary(name: str, destination: str, op) -> str:
    """The closing line of a finished migration."""
    took = f" in {elapsed_s(op):.1f} s"
    sent = f", {human_bytes(op.progress.bytes_total)} of memory" if op.progress.bytes_total else ""
    if op.HasField("error"):
        return f"{name} did not move to {destination}{took}: {op.error.message}"
    state = ""
    if op.response.type_url.endswith("cna.v1.Vm"):
        vm = v.Vm()
        op.response.Unpack(vm)
        state = f"; {v.VmState.Name(vm.status.state).removeprefix('VM_STATE_').lower()} there"
    return f"{name} moved to {destination}{took}{sent}{state}"


def cmd_migrate(client: Client, args: argparse.Namespace) -> str:
    op = client.call(client.vms.MigrateVm, v.MigrateVmRequest(vm=args.vm, destination=args.to, policy=policy_from_args(args),
                                                             request_id=args.request_id or ""))
    return watched(client, args, op, lambda o: migrate_summary(args.vm, args.to, o))


def register_migrate(vms: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    q = vms.add_parser("migrate", parents=[common], help="move a VM to another agent's host (live when it runs)")
    q.add_argument("vm", help="name or UUID")
    q.add_argument("--to", required=True, metavar="HOST:PORT", help="the destination agent's gRPC address")
    add_policy_args(q)
    q.add_argument("--no-wait", dest="wait", action="store_false", help="return the operation id at once")
    q.add_argument("--request-id", help="idempotency key: repeating it returns the first operation")
    q.set_defaults(func=cmd_migrate)
