"""The fault suite: the agent killed (SIGKILL) at every crash point of fault_points.py (38 across
VM lifecycle, disks, snapshots, updates, volumes and network declarations), libvirtd killed
mid-operation and a datastore filling up (fault_daemons.py), the iSCSI array (tgtd) killed or
frozen and the switch database (ovsdb-server) restarted (fault_deps.py), each judged from outside.

    python -m benchmarks.faults            # the full matrix
    python -m benchmarks.faults --quick    # the reduced one CI runs (tests/e2e/test_fault_matrix.py)
    python -m benchmarks.faults --only vm.create:done,volume.placed

Why a matrix run as one program and not one test per point: the promise it checks is about
the whole node (guests keep running, every operation ends with the truth, nothing is left
behind, the event log has no holes), so one agent home lives through every kill, with a
neighbour guest started first that must keep its QEMU process through all of them.

For each crash point: the agent starts with that crash point armed (CNA_FAILPOINTS), prepares what
the operation needs, sends the request and dies at the point; it starts again unarmed, and:
- the operation (found by kind and request id) must be done, and SUCCEEDED exactly when its
  effect is there as seen from outside (``untruthful_operations`` otherwise);
- everything the point made is deleted through the API, and then no file, domain definition,
  run directory, QEMU process or libvirt secret may remain that was not there before
  (``leaked_resources``);
- the neighbour guest's QEMU pid is unchanged and it runs (``guests_lost``).
The libvirtd and datastore-full points run on a live agent, judged the same way (an operation
refused before it was journalled must have changed nothing). At the end the event log of each
node is read whole: sequences without holes or repeats, and one
``operation.done`` per operation (``event_gaps``).

The last line is JSON; ``ratio`` is the median time to become ready after a kill (start-up
recovery included) over the median after a clean stop, both measured in this run.
"""

from __future__ import annotations

import cna_agent  # noqa: F401  (first: turns gRPC fork support off before grpc loads)

import argparse
import json
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

import grpc  # noqa: E402

from benchmarks import fault_node as fn  # noqa: E402
from benchmarks.fault_daemons import FaultPoint, full_points, libvirtd_points, run_fault  # noqa: E402
from benchmarks.fault_deps import Deps, deps_points  # noqa: E402
from benchmarks.fault_points import Ctx, Point, _rid, matrix  # noqa: E402
from cna_agent.api import pb  # noqa: E402
from support import libvirt as test_libvirt  # noqa: E402
from support.guests import guest_spec  # noqa: E402

vm = pb.vm_pb2


def run_point(node: fn.Node, ctx: Ctx, point: Point, baseline: dict[str, set[str]], volumes: set[str],
              neighbour: tuple[str, int]) -> dict[str, Any]:
    """One crash point: armed agent, prepare, request, death; unarmed agent, judge, clean up."""
    out: dict[str, Any] = {"point": point.failpoint, "kind": point.kind, "group": "agent-kill"}
    state: dict[str, Any] = {}
    if point.prepare_unarmed:
        with node.start().channel() as ch:
            ctx.channel = ch
            state = point.prepare(ctx)
        node.stop()
    agent = node.start(point.failpoint)
    with agent.channel() as ch:
        ctx.channel = ch
        if not point.prepare_unarmed:
            state = point.prepare(ctx)
        try:
            point.request(ctx, state)
        except grpc.RpcError as exc:
            out["rpc"] = exc.code().name
    try:
        agent.proc.wait(timeout=120)
        out["reached"] = agent.proc.returncode == -signal.SIGKILL
    except Exception:
        out["reached"] = False
    if not out["reached"]:
        node.stop()
    agent = node.start(after_kill=out["reached"])
    with agent.channel() as ch:
        ctx.channel = ch
        op = fn.operation(ch, point.kind, _rid(point.failpoint))
        effect = point.effect(ctx, state)
        out.update(effect=effect, state=pb.operations_pb2.OperationState.Name(op.state) if op else "-",
                   message=op.error.message if op else "")
        why = fn.truth(op, effect)
        if why:
            out["untruthful"] = why
        out["cleanup"] = fn.clean_up(ch, volumes)
        ctx.channel = None
    out["leaks"] = fn.leaks(node, baseline) + out["cleanup"]
    lost = fn.neighbour_lost(node, neighbour, ctx.status(fn.NEIGHBOUR))
    if lost:
        out["guest_lost"] = lost
    node.stop()
    return out


def _report(r: dict[str, Any]) -> None:
    bad = r.get("untruthful") or r["leaks"] or r.get("guest_lost") or not r["reached"]
    rpc = f" rpc={r['rpc']}" if r.get("rpc") else ""
    if "request_done_before_kill" in r:
        rpc += " (answered before the kill)" if r["request_done_before_kill"] else " (in flight at the kill)"
    print(f"{'FAIL' if bad else 'ok':4} {r['point']:40} {r.get('state', '-'):28} effect={r.get('effect')!s:5}{rpc} "
          f"{r.get('untruthful') or ''}{'; leaks ' + str(r['leaks']) if r['leaks'] else ''}"
          f"{'; ' + r['guest_lost'] if r.get('guest_lost') else ''}{'' if r['reached'] else '; crash point not reached'}"
          f"{'  (' + r['message'][-200:] + ')' if r.get('message') else ''}", flush=True)


def _begin(node: fn.Node, ctx: Ctx) -> tuple[Any, set[str], tuple[str, int]]:
    """Start the agent, boot the neighbour guest; the node's baseline to count leaks against."""
    agent = node.start()
    with agent.channel() as ch:
        ctx.channel = ch
        uuid = ctx.new_vm(fn.NEIGHBOUR, start=True)
        volumes = {v.id for v in fn.all_volumes(ch)}
    return fn.inventory(node), volumes, (uuid, fn.qemu_of(node.home)[uuid])


def _end(node: fn.Node, ctx: Ctx, neighbour: tuple[str, int]) -> list[str]:
    """The event log's problems; the neighbour is deleted."""
    agent = node.agent or node.start()
    with agent.channel() as ch:
        problems = fn.event_problems(ch)
        fn.wait(ch, pb.vm_pb2_grpc.VmServiceStub(ch).DeleteVm(vm.DeleteVmRequest(vm=neighbour[0], force=True), timeout=60))
    node.stop()
    return problems


def kill_matrix(base: Path, points: list[Point], full: list[FaultPoint]) -> tuple[list[dict[str, Any]], list[str], fn.Node]:
    """The crash points, then the datastore-full points, on one embedded-libvirt node."""
    node = fn.Node(base / "embedded")
    ctx = Ctx(node.base, node.etc, node.run, guest_spec)
    try:
        baseline, volumes, neighbour = _begin(node, ctx)
        node.stop()
        results = []
        for point in points:
            results.append(run_point(node, ctx, point, baseline, volumes, neighbour))
            _report(results[-1])
        agent = node.start()
        with agent.channel() as ch:
            ctx.channel = ch
            for point in full:
                results.append(run_fault(node, ctx, point, baseline, volumes, neighbour))
                _report(results[-1])
        return results, _end(node, ctx, neighbour), node
    finally:
        node.close()


def live_matrix(node: fn.Node, ctx: Ctx, points: list[FaultPoint]) -> tuple[list[dict[str, Any]], list[str]]:
    """``points`` on one live agent of ``node`` (nothing kills the agent), then the node's
    event-log problems; the node is closed in any case."""
    try:
        baseline, volumes, neighbour = _begin(node, ctx)
        results = []
        with node.agent.channel() as ch:  # type: ignore[union-attr]
            ctx.channel = ch
            for point in points:
                results.append(run_fault(node, ctx, point, baseline, volumes, neighbour))
                _report(results[-1])
        return results, _end(node, ctx, neighbour)
    finally:
        node.close()


def libvirtd_matrix(base: Path, points: list[FaultPoint]) -> tuple[list[dict[str, Any]], list[str]]:
    """The libvirtd points, on the host's libvirtd (started if it was not running, and left as
    it was found)."""
    was_running = test_libvirt.libvirtd_answers()
    if not was_running:
        test_libvirt.start_libvirtd()
    try:
        node = fn.Node(base / "system", mode="system")
        return live_matrix(node, Ctx(node.base, node.etc, node.run, guest_spec), points)
    finally:
        if not was_running and test_libvirt.libvirtd_answers():
            test_libvirt.stop_libvirtd()


def deps_matrix(base: Path, points: list[FaultPoint]) -> tuple[list[dict[str, Any]], list[str]]:
    """The array and switch-database points (fault_deps.py), on an embedded-libvirt node whose
    agent has a libiscsi SAN datastore on the testbed's tgtd and the testbed's OVSDB."""
    deps = Deps(base / "deps")
    try:
        node = fn.Node(base / "withdeps", extra=deps.config(),
                       observers={"ovs_bridges": deps.bridges, "ovs_ports": deps.ports,
                                  "iscsi_sessions": deps.sessions})
        ctx = Ctx(node.base, node.etc, node.run, guest_spec)
        ctx.deps = deps  # type: ignore[attr-defined]
        return live_matrix(node, ctx, points)
    finally:
        deps.close()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.faults", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="only the reduced matrix CI runs")
    ap.add_argument("--only", default="", help="comma-separated points to run (names as printed)")
    ap.add_argument("--keep", action="store_true", help="keep the agent homes (for debugging)")
    args = ap.parse_args(argv)
    kills, full, daemons, deps = matrix(), full_points(), libvirtd_points(), deps_points()
    every: list[Any] = [*kills, *full, *daemons, *deps]
    if args.quick:
        every = [p for p in every if p.quick]
    if args.only:
        names = set(args.only.split(","))
        every = [p for p in every if getattr(p, "failpoint", getattr(p, "name", "")) in names]
    base = Path(tempfile.mkdtemp(prefix="cf", dir="/tmp"))
    base.chmod(0o711)  # the system libvirtd's QEMU runs unprivileged and must traverse it
    started = time.monotonic()
    results: list[dict[str, Any]] = []
    problems: list[str] = []
    kill_node = None
    try:
        chosen_kills, chosen_full = [p for p in kills if p in every], [p for p in full if p in every]
        if chosen_kills or chosen_full:
            r, e, kill_node = kill_matrix(base, chosen_kills, chosen_full)
            results, problems = results + r, problems + e
        chosen_daemons = [p for p in daemons if p in every]
        if chosen_daemons:
            r, e = libvirtd_matrix(base, chosen_daemons)
            results, problems = results + r, problems + e
        chosen_deps = [p for p in deps if p in every]
        if chosen_deps:
            r, e = deps_matrix(base, chosen_deps)
            results, problems = results + r, problems + e
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    after_kill = kill_node.ready_after_kill if kill_node else []
    after_stop = kill_node.ready_after_stop if kill_node else []
    kill = round(statistics.median(after_kill), 2) if after_kill else None
    clean = round(statistics.median(after_stop), 2) if after_stop else None
    summary = {
        "benchmark": "faults", "quick": args.quick,
        "points": sum(1 for r in results if r["reached"]),
        **{group.replace("-", "_"): sum(1 for r in results if r["group"] == group)
           for group in ("agent-kill", "libvirtd-kill", "datastore-full", "tgtd", "ovsdb")},
        "unreached": [r["point"] for r in results if not r["reached"]],
        "guests_lost": sum(1 for r in results if r.get("guest_lost")),
        "untruthful_operations": sum(1 for r in results if r.get("untruthful")),
        "leaked_resources": sum(len(r["leaks"]) for r in results),
        "event_gaps": len(problems),
        "event_problems": problems[:10],
        "ready_after_kill_s": kill, "ready_after_stop_s": clean,
        "ratio": round(kill / clean, 2) if kill and clean else None,
        "seconds": round(time.monotonic() - started, 1),
    }
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    s = main()
    bad = s["guests_lost"] or s["untruthful_operations"] or s["leaked_resources"] or s["event_gaps"] or s["unreached"]
    sys.exit(1 if bad else 0)
