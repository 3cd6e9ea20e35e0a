"""cna-ctl host placement: where every placed VM's vCPUs and memory really are vs the plan.

The agent reads the kernel's view (sched_getaffinity, /proc stat, numa_maps) through its
native hot path; this module only prints it. ``--check`` exits 1 when anything drifted, so
monitoring scripts can run it.
"""

from __future__ import annotations

import argparse
import json

from cna_agent.api import pb
from cna_agent.cli.common import EXIT_FAILED, CliError, Client, fmt_time, to_json
from cna_agent.cli.table import human_bytes, keyvalues, table
from cna_agent.host.cpulist import format_cpulist


def _cpus(cpus) -> str:
    return format_cpulist(cpus) or "-"


def render(report: pb.host_pb2.PlacementReport, *, all_threads: bool) -> str:
    out = [keyvalues([
        ("Time", fmt_time(report.time)),
        ("Reserved CPUs", _cpus(report.reserved_cpus)),
        ("Shared pool", _cpus(report.shared_cpus)),
        ("Read by", "native hot path" if report.native else "Python fallback"),
    ])]
    if not report.vms:
        return "\n".join(out + ["", "No placed VMs (only dedicated-CPU and hugepage VMs are placed)."])
    out += ["", table(
        ["VM", "STATE", "PID", "CPUS", "MEMORY PLAN", "MEMORY NOW", "DRIFT"],
        [[v.vm_name or v.vm_uuid, v.state, v.qemu_pid or "-", "dedicated" if v.dedicated else "shared",
          f"{v.memory_mode} node {_cpus(v.memory_nodes)}" + (f" ({v.hugepage_kib} KiB pages)" if v.hugepage_kib else ""),
          ", ".join(f"node {m.node}: {human_bytes(m.resident_bytes)}" + ("" if m.planned else " (!)") for m in v.memory) or "-",
          "yes" if v.drift else "no"]
         for v in report.vms])]
    for v in report.vms:
        threads = [t for t in v.threads if all_threads or t.role != "emulator" or t.tid == v.qemu_pid or t.drifted]
        if not threads and not v.drift:
            continue
        out += ["", f"{v.vm_name or v.vm_uuid} (emulator CPUs {_cpus(v.emulator_cpus)}):"]
        if threads:
            out.append(table(
                ["TID", "THREAD", "ROLE", "PLANNED", "ALLOWED", "LAST CPU", "CPU s", "OK"],
                [[t.tid, t.name, t.role if t.index < 0 else f"{t.role} {t.index}", _cpus(t.planned_cpus),
                  _cpus(t.allowed_cpus), t.last_cpu, f"{t.cpu_seconds:.2f}", "DRIFT" if t.drifted else "ok"]
                 for t in threads]))
        out += [f"  drift: {d}" for d in v.drift]
    return "\n".join(out)


def cmd_host_placement(client: Client, args: argparse.Namespace) -> str:
    report = client.call(client.host.GetPlacement, pb.host_pb2.GetPlacementRequest(vm=args.vm or ""))
    text = json.dumps(to_json(report), indent=2) if args.json else render(report, all_threads=args.all)
    if args.check and any(v.drift for v in report.vms):
        print(text)
        raise CliError("placement drift found (see above)", EXIT_FAILED)
    return text


def register(host: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """Add ``placement`` to the ``host`` command group."""
    hp = host.add_parser("placement", parents=[common], help="where VMs' vCPUs and memory really are vs the plan")
    hp.add_argument("vm", nargs="?", help="one VM (UUID or name); default every placed VM")
    hp.add_argument("--all", action="store_true", help="list every emulator thread too (default: main thread and drifted ones)")
    hp.add_argument("--check", action="store_true", help="exit 1 when any VM drifted from its plan")
    hp.set_defaults(func=cmd_host_placement)
