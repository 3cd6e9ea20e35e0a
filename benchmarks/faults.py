"""The fault suite: the agent killed (SIGKILL) at every point of fault_points.py, then judged
from outside after it restarts.

    python -m benchmarks.faults            # the full matrix (>= 25 points)
    python -m benchmarks.faults --quick    # the reduced one CI runs (tests/e2e/test_fault_matrix.py)
    python -m benchmarks.faults --only vm.create:done,volume.placed

Why a matrix run as one program and not one test per point: the promise it checks is about
the whole node (guests keep running, every operation ends with the truth, nothing is left
behind, the event log has no holes), so one agent home lives through every kill, with a
neighbour guest started first that must keep its QEMU process through all of them.

For each point: the agent starts with that crash point armed (CNA_FAILPOINTS), prepares what
the operation needs, sends the request and dies at the point; it starts again unarmed, and:
- the operation (found by kind and request id) must be done, and SUCCEEDED exactly when its
  effect is there as seen from outside (``untruthful_operations`` otherwise);
- everything the point made is deleted through the API, and then no file, domain definition,
  run directory, QEMU process or libvirt secret may remain that was not there before
  (``leaked_resources``);
- the neighbour guest's QEMU pid is unchanged and it runs (``guests_lost``).
At the end the event log is read whole: sequences without holes or repeats, and one
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

from benchmarks.fault_points import Ctx, Point, matrix  # noqa: E402
from cna_agent.api import pb  # noqa: E402
from support.agent import AgentProcess, start_agent  # noqa: E402
from support.guests import build_guest, guest_spec  # noqa: E402

vm, S, O, E = pb.vm_pb2, pb.storage_pb2, pb.operations_pb2, pb.events_pb2
NEIGHBOUR = "fneighbour"


class Node:
    """One agent home that lives through every point; starts and stops its agent process."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.home = base / "agent"
        for d in (base / "ds", base / "imp"):
            d.mkdir(parents=True, exist_ok=True)
        guest_dir = Path(build_guest("x86_64")["kernel"]).parent
        self.extra = (f'[compute]\nimage_dirs = "{guest_dir}"\n'
                      f'[storage.datastores.ds]\ntype = "dir"\npath = "{base / "ds"}"\n'
                      f'[storage.datastores.imp]\ntype = "dir"\npath = "{base / "imp"}"\n')
        self.agent: AgentProcess | None = None
        self.ready_after_kill: list[float] = []
        self.ready_after_stop: list[float] = []

    def start(self, failpoint: str = "", *, after_kill: bool = False) -> AgentProcess:
        t0 = time.monotonic()
        env = {"CNA_FAILPOINTS": failpoint} if failpoint else {}
        config = self.home / "agent.toml" if (self.home / "agent.toml").exists() else None
        self.agent = start_agent(self.home, None, tcp=False, extra_config=self.extra, config=config, env=env)
        (self.ready_after_kill if after_kill else self.ready_after_stop).append(time.monotonic() - t0)
        return self.agent

    def stop(self) -> None:
        if self.agent is not None and self.agent.proc.poll() is None:
            self.agent.stop(signal.SIGTERM)
        self.agent = None


# -- what an outside observer counts ----------------------------------------------------------------


def _files(d: Path) -> set[str]:
    return {str(p.relative_to(d)) for p in d.rglob("*") if p.is_file()} if d.exists() else set()


def _qemu_of(root: Path) -> dict[str, int]:
    """uuid -> pid of every QEMU this agent's embedded libvirt runs (its root is in the argv)."""
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and b"qemu-system" in argv[0] and any(str(root).encode() in a for a in argv):
            for i, a in enumerate(argv):
                if a == b"-uuid" and i + 1 < len(argv):
                    found[argv[i + 1].decode()] = int(proc.name)
    return found


def snapshot(node: Node, ctx: Ctx) -> dict[str, set[str]]:
    root = ctx.root
    return {"files": {f"ds/{f}" for f in _files(node.base / "ds")} | {f"imp/{f}" for f in _files(node.base / "imp")},
            "domains": {p.name for p in (root / "etc" / "qemu").glob("*.xml")},
            "run_dirs": {p.name for p in (node.home / "run" / "vms").glob("*")},
            "qemu": set(_qemu_of(root)),
            "secrets": _files(root / "etc" / "secrets")}


def clean_up(ctx: Ctx, baseline_volumes: set[str]) -> list[str]:
    """Delete through the API every VM but the neighbour and every volume made since the start;
    what fails to delete is named (it counts as a leak)."""
    problems = []
    for v in ctx.vms.ListVms(vm.ListVmsRequest(), timeout=30).vms:
        if v.spec.name == NEIGHBOUR:
            continue
        op = ctx.vms.DeleteVm(vm.DeleteVmRequest(vm=v.uuid, force=True), timeout=60)
        done = _wait(ctx, op)
        if done.state != O.OPERATION_STATE_SUCCEEDED:
            problems.append(f"vm {v.spec.name}: delete {done.error.message}")
    for vol in all_volumes(ctx):
        if vol.id in baseline_volumes:
            continue
        done = _wait(ctx, ctx.storage.DeleteVolume(S.DeleteVolumeRequest(id=vol.id), timeout=60))
        if done.state != O.OPERATION_STATE_SUCCEEDED:
            problems.append(f"volume {vol.id}: delete {done.error.message}")
    return problems


def all_volumes(ctx: Ctx) -> list[Any]:
    return [v for ds in ("ds", "imp") for v in ctx.storage.ListVolumes(S.ListVolumesRequest(datastore=ds), timeout=30).volumes]


def _wait(ctx: Ctx, op: Any, timeout: float = 120) -> Any:
    from support.operations import wait

    return wait(ctx.channel, op, timeout)


def _operation(ctx: Ctx, point: Point, request_id: str) -> Any:
    ops = pb.operations_pb2_grpc.OperationsServiceStub(ctx.channel)
    listed = ops.ListOperations(O.ListOperationsRequest(kinds=[point.kind], page_size=50), timeout=30).operations
    return next((o for o in listed if o.request_id == request_id), None)


def run_point(node: Node, ctx: Ctx, point: Point, baseline: dict[str, set[str]], volumes: set[str],
              neighbour: tuple[str, int]) -> dict[str, Any]:
    from benchmarks.fault_points import _rid

    out: dict[str, Any] = {"point": point.failpoint, "kind": point.kind}
    agent = node.start(point.failpoint)
    with agent.channel() as ch:
        ctx.channel = ch
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
        op = _operation(ctx, point, _rid(point.failpoint))
        effect = point.effect(ctx, state)
        out["effect"] = effect
        if op is None:
            out["untruthful"] = "no operation recorded for the request"
        else:
            out["state"] = O.OperationState.Name(op.state)
            out["message"] = op.error.message
            if not op.done:
                out["untruthful"] = "left running after the restart"
            elif (op.state == O.OPERATION_STATE_SUCCEEDED) != effect:
                out["untruthful"] = f"{out['state']} while the effect is {'there' if effect else 'absent'}"
        out["cleanup"] = clean_up(ctx, volumes)
        ctx.channel = None
    now = snapshot(node, ctx)
    leaks = [f"{k}: {sorted(now[k] - baseline[k])}" for k in now if now[k] - baseline[k]]
    out["leaks"] = leaks + out["cleanup"]
    pids = _qemu_of(ctx.root)
    uuid, pid = neighbour
    if pids.get(uuid) != pid or ctx.status(NEIGHBOUR) != "running":
        out["guest_lost"] = f"neighbour pid {pid} -> {pids.get(uuid)}, state {ctx.status(NEIGHBOUR) or 'not running'}"
    node.stop()
    return out


def event_problems(ctx: Ctx) -> list[str]:
    events = pb.events_pb2_grpc.EventServiceStub(ctx.channel)
    seen: list[Any] = []
    after = 0
    while True:
        r = events.ListEvents(E.ListEventsRequest(after_sequence=after, limit=1000), timeout=30)
        seen += list(r.events)
        if not r.events or r.events[-1].sequence >= r.last_sequence:
            break
        after = r.events[-1].sequence
    problems = []
    seqs = [e.sequence for e in seen]
    for a, b in zip(seqs, seqs[1:]):
        if b != a + 1:
            problems.append(f"sequence {a} then {b}")
    done: dict[str, int] = {}
    for e in seen:
        if e.type == "operation.done":
            done[e.resource_id] = done.get(e.resource_id, 0) + 1
    problems += [f"operation {k} done {n} times" for k, n in done.items() if n > 1]
    return problems


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.faults", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="only the reduced matrix CI runs")
    ap.add_argument("--only", default="", help="comma-separated crash points to run")
    ap.add_argument("--keep", action="store_true", help="keep the agent home (for debugging)")
    args = ap.parse_args(argv)
    points = matrix()
    if args.quick:
        points = [p for p in points if p.quick]
    if args.only:
        wanted = set(args.only.split(","))
        points = [p for p in points if p.failpoint in wanted]
    base = Path(tempfile.mkdtemp(prefix="cf", dir="/tmp"))
    node, started = Node(base), time.monotonic()
    ctx = Ctx(base, guest_spec)
    results: list[dict[str, Any]] = []
    events: list[str] = []
    try:
        agent = node.start()
        with agent.channel() as ch:
            ctx.channel = ch
            neighbour_uuid = ctx.new_vm(NEIGHBOUR, start=True)
            volumes = {v.id for v in all_volumes(ctx)}
        node.stop()
        baseline = snapshot(node, ctx)
        neighbour = (neighbour_uuid, _qemu_of(ctx.root)[neighbour_uuid])
        for point in points:
            r = run_point(node, ctx, point, baseline, volumes, neighbour)
            results.append(r)
            verdict = "ok" if not (r.get("untruthful") or r["leaks"] or r.get("guest_lost") or not r["reached"]) else "FAIL"
            print(f"{verdict:4} {point.failpoint:28} {r.get('state', '-'):28} effect={r['effect']!s:5} "
                  f"{r.get('untruthful') or ''}{'; leaks ' + str(r['leaks']) if r['leaks'] else ''}"
                  f"{'; ' + r['guest_lost'] if r.get('guest_lost') else ''}{'' if r['reached'] else '; crash point not reached'}",
                  flush=True)
        agent = node.start()
        with agent.channel() as ch:
            ctx.channel = ch
            events = event_problems(ctx)
            ctx.vms.DeleteVm(vm.DeleteVmRequest(vm=neighbour_uuid, force=True), timeout=60)
        node.stop()
    finally:
        node.stop()
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    kill = statistics.median(node.ready_after_kill) if node.ready_after_kill else float("nan")
    clean = statistics.median(node.ready_after_stop) if node.ready_after_stop else float("nan")
    summary = {
        "benchmark": "faults", "quick": args.quick,
        "points": sum(1 for r in results if r["reached"]),
        "unreached": [r["point"] for r in results if not r["reached"]],
        "guests_lost": sum(1 for r in results if r.get("guest_lost")),
        "untruthful_operations": sum(1 for r in results if r.get("untruthful")),
        "leaked_resources": sum(len(r["leaks"]) for r in results),
        "event_gaps": len(events),
        "event_problems": events[:10],
        "ready_after_kill_s": round(kill, 2), "ready_after_stop_s": round(clean, 2),
        "ratio": round(kill / clean, 2) if clean else None,
        "seconds": round(time.monotonic() - started, 1),
    }
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    s = main()
    bad = s["guests_lost"] or s["untruthful_operations"] or s["leaked_resources"] or s["event_gaps"] or s["unreached"]
    sys.exit(1 if bad else 0)
