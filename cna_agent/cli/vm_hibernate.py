"""``cna-ctl vm hibernate NAME [--datastore DS]`` and ``cna-ctl vm unhibernate VM
[--datastore DS]``: save a running VM's RAM to a datastore and bring it back, here or (named by
UUID, with the datastore) on another host that sees it; a progress bar while the RAM is written,
and a summary line.
"""

from __future__ import annotations

import argparse

from cna_agent.api import pb
from cna_agent.cli.common import Client
from cna_agent.cli.progress import elapsed_s, watched

v = pb.vm_pb2


def _summary(verb: str, vm: str, op) -> str:
    took = f" in {elapsed_s(op):.1f} s"
    if op.HasField("error"):
        return f"{vm} was not {verb}{took}: {op.error.message}"
    where = ""
    if op.response.type_url.endswith("cna.v1.Vm"):
        got = v.Vm()
        op.response.Unpack(got)
        state = v.VmState.Name(got.status.state).removeprefix("VM_STATE_").lower()
        where = f"; {state}" + (f", state on datastore {got.status.hibernation.datastore}"
                                if got.status.HasField("hibernation") else "")
    return f"{vm} {verb}{took}{where}"


def _run(client: Client, args: argparse.Namespace, verb: str, call, request) -> str:
    return watched(client, args, client.call(call, request), lambda o: _summary(verb, args.vm, o))


def cmd_hibernate(client: Client, args: argparse.Namespace) -> str:
    return _run(client, args, "hibernated", client.vms.HibernateVm,
                v.HibernateVmRequest(vm=args.vm, datastore=args.datastore, request_id=args.request_id or ""))


def cmd_unhibernate(client: Client, args: argparse.Namespace) -> str:
    return _run(client, args, "resumed", client.vms.UnhibernateVm,
                v.UnhibernateVmRequest(vm=args.vm, datastore=args.datastore, request_id=args.request_id or ""))


def register_hibernate(vms: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    q = vms.add_parser("hibernate", parents=[common], help="save a running VM's RAM to a datastore; it holds nothing here then")
    q.add_argument("vm", help="name or UUID")
    q.add_argument("--datastore", default="", help="dir datastore for the RAM (default: the one of the VM's first disk)")
    q.add_argument("--no-wait", dest="wait", action="store_false", help="return the operation id at once")
    q.add_argument("--request-id", help="idempotency key: repeating it returns the first operation")
    q.set_defaults(func=cmd_hibernate)
    q = vms.add_parser("unhibernate", parents=[common],
                       help="resume a hibernated VM where it stopped (here, or by UUID with --datastore from another host)")
    q.add_argument("vm", help="name or UUID (UUID for a VM hibernated on another host)")
    q.add_argument("--datastore", default="", help="where its state is (required for a VM hibernated on another host)")
    q.add_argument("--no-wait", dest="wait", action="store_false", help="return the operation id at once")
    q.add_argument("--request-id", help="idempotency key: repeating it returns the first operation")
    q.set_defaults(func=cmd_unhibernate)
