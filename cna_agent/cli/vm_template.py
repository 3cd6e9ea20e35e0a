"""``cna-ctl vm template VM`` (ConvertVmToTemplate) and ``cna-ctl vm deploy TEMPLATE NAME...
[--linked] [--datastore DS] [--start] [--customization FILE]...``: make a stopped VM a template,
and VMs from it, one per name; with --customization once per name (in the same order) each
VM gets its own first boot. The summary line names what was made and what was not, and why.
"""

from __future__ import annotations

import argparse

from cna_agent.api import pb
from cna_agent.cli.common import CliError, Client
from cna_agent.cli.progress import elapsed_s, watched

v = pb.vm_pb2


def _convert_summary(vm: str, op) -> str:
    took = f" in {elapsed_s(op):.1f} s"
    if op.HasField("error"):
        return f"{vm} was not made a template{took}: {op.error.message}"
    return f"{vm} is a template now{took}; its volumes are read-only"


def _deploy_summary(template: str, op) -> str:
    took = f" in {elapsed_s(op):.1f} s"
    if op.HasField("error"):
        return f"nothing deployed from {template}{took}: {op.error.message}"
    got = v.DeployVmResponse()
    op.response.Unpack(got)
    line = f"{len(got.vms)} VM(s) deployed from {template}{took}: " + ", ".join(x.name for x in got.vms)
    return line + "".join(f"\n  not made: {f.name}: {f.code} {f.message}" for f in got.failures)


def cmd_template(client: Client, args: argparse.Namespace) -> str:
    request = v.VmActionRequest(vm=args.vm, request_id=args.request_id or "")
    return watched(client, args, client.call(client.vms.ConvertVmToTemplate, request), lambda o: _convert_summary(args.vm, o))


def cmd_deploy(client: Client, args: argparse.Namespace) -> str:
    from cna_agent.cli.vm import load_customization

    customizations = [load_customization(path) for path in args.customization or []]
    if customizations and len(customizations) != len(args.names):
        raise CliError(f"{len(customizations)} --customization files for {len(args.names)} names: give one per name, or none")
    request = v.DeployVmRequest(template=args.template, names=args.names, linked=args.linked, datastore=args.datastore,
                                start=args.start, customizations=customizations, request_id=args.request_id or "")
    return watched(client, args, client.call(client.vms.DeployVm, request), lambda o: _deploy_summary(args.template, o))


def register_template(vms: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    q = vms.add_parser("template", parents=[common], help="make a stopped VM a template (read-only; deploy VMs from it)")
    q.add_argument("vm", help="name or UUID")
    q.add_argument("--no-wait", dest="wait", action="store_false", help="return the operation id at once")
    q.add_argument("--request-id", help="idempotency key: repeating it returns the first operation")
    q.set_defaults(func=cmd_template)
    q = vms.add_parser("deploy", parents=[common], help="new VMs from a template, one per NAME")
    q.add_argument("template", help="the template's name or UUID")
    q.add_argument("names", nargs="+", metavar="NAME")
    q.add_argument("--linked", action="store_true", help="linked clones of the template's volumes (default: full copies)")
    q.add_argument("--datastore", default="", help="where the new volumes go (default: the template's)")
    q.add_argument("--start", action="store_true", help="start each VM once it is defined")
    q.add_argument("--customization", action="append", metavar="FILE",
                   help="first-boot customization (YAML/JSON GuestCustomization); once per NAME, in order")
    q.add_argument("--no-wait", dest="wait", action="store_false", help="return the operation id at once")
    q.add_argument("--request-id", help="idempotency key: repeating it returns the first operation")
    q.set_defaults(func=cmd_deploy)
