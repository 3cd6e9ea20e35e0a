"""Faults of what the agent depends on, for benchmarks/faults.py: libvirtd killed (SIGKILL) and
restarted while an operation runs, and a datastore that fills up while a volume is written.

The agent is not killed here: it must notice, end the operation with the truth and keep
serving. libvirtd points run against the host's libvirtd (an agent in "system" mode: QEMU is
libvirtd's child and must outlive it); the kill lands a short delay after the request, so it
falls at a different step of libvirt's work from run to run, and the judge does not care
which: SUCCEEDED exactly when the effect is there. The datastore that fills is a small tmpfs
(fault_node.SMALL_MIB) written with more random data than it holds: the operation must fail,
saying so, and leave no partial file.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import grpc

from benchmarks import fault_node as fn
from benchmarks.fault_points import MIB, Ctx, _rid
from cna_agent.api import pb
from support import libvirt as test_libvirt

vm, S, O = pb.vm_pb2, pb.storage_pb2, pb.operations_pb2
#: More than the small datastore holds.
FILL_MIB = 40


@dataclass
class FaultPoint:
    name: str
    kind: str
    prepare: Callable[[Ctx], dict[str, Any]]
    request: Callable[[Ctx, dict[str, Any]], Any]
    effect: Callable[[Ctx, dict[str, Any]], bool]
    #: Seconds after the request before libvirtd is killed (libvirtd points).
    delay: float = 0.0
    #: Stop libvirtd (SIGSTOP) before the request, so the kill surely lands with the call in
    #: flight; without it the kill lands ``delay`` into libvirt's own work.
    frozen: bool = False
    #: The operation must fail (a datastore-full point): success would be a lie about space.
    must_fail: bool = False
    #: Whether part of the effect is there (a create-and-start that defined but did not
    #: start): then a failure must say what was left ("left stopped").
    partial: Callable[[Ctx, dict[str, Any]], bool] | None = None
    quick: bool = False
    #: Breaks something other than libvirtd ``delay`` seconds after the request (the array, the
    #: switch database: fault_deps.py), or just before it with ``break_first`` (then ``mend``
    #: puts it back ``delay`` seconds into the request: an outage the request runs into);
    #: otherwise ``mend`` runs once the operation has ended. ``settle`` seconds are left for
    #: the agent's own repair (or a late effect) before the effect is judged.
    breaker: Callable[[Ctx, dict[str, Any]], None] | None = None
    mend: Callable[[Ctx, dict[str, Any]], None] | None = None
    break_first: bool = False
    #: The statuses a refusal may carry (empty: any); an array that is down is UNAVAILABLE or
    #: DEADLINE_EXCEEDED, never NOT_FOUND (which tells the manager its request was wrong).
    refused_as: tuple[str, ...] = ()
    settle: float = 0.0
    group: str = ""


def _until(fn_: Callable[[], Any], timeout: float, what: str) -> Any:
    """``fn_()`` once the agent answers again (it reconnects to a restarted libvirtd)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return fn_()
        except grpc.RpcError as exc:
            if time.monotonic() > deadline or exc.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.FAILED_PRECONDITION):
                raise AssertionError(f"{what}: {exc.code().name} {exc.details()}") from None
            time.sleep(0.5)


def _libvirtd_pid() -> int:
    return int(test_libvirt.LIBVIRTD_PIDFILE.read_text().strip())


def _kill_libvirtd() -> int:
    pid = _libvirtd_pid()
    os.kill(pid, signal.SIGKILL)
    for _ in range(100):
        if not Path(f"/proc/{pid}").exists():
            break
        time.sleep(0.05)
    test_libvirt.LIBVIRTD_PIDFILE.unlink(missing_ok=True)
    test_libvirt.start_libvirtd()
    return pid


def _random_raw(path: Path, mib: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        for _ in range(mib):
            f.write(os.urandom(MIB))


def _on_running(name: str, disk: bool = False) -> Callable[[Ctx], dict[str, Any]]:
    def prepare(c: Ctx) -> dict[str, Any]:
        s: dict[str, Any] = {"name": name}
        if disk:
            s["volume"] = c.new_volume(f"{name}/d.qcow2")
        s["uuid"] = c.new_vm(name, start=True, disks=(s["volume"],) if disk else ())
        return s

    return prepare


def libvirtd_points() -> list[FaultPoint]:
    def create(c: Ctx, s: dict[str, Any]) -> Any:
        spec = c.guest("x86_64", s["name"], memory_mib=128)
        return c.vms.CreateVm(vm.CreateVmRequest(request_id=s["rid"], spec=spec, start=True), timeout=60)

    def attach(c: Ctx, s: dict[str, Any]) -> Any:
        return c.storage.AttachDisk(S.AttachDiskRequest(request_id=s["rid"], vm=s["uuid"], disk=vm.DiskSpec(volume=s["extra"])),
                                    timeout=60)

    def snapshot(c: Ctx, s: dict[str, Any]) -> Any:
        return c.vms.CreateSnapshot(vm.CreateSnapshotRequest(request_id=s["rid"], vm=s["uuid"], name="s1"), timeout=60)

    def with_extra(c: Ctx) -> dict[str, Any]:
        s = _on_running("fldattach")(c)
        s["extra"] = c.new_volume("fldattach/x.qcow2")
        return s

    def running(c: Ctx, s: dict[str, Any]) -> bool:  # a create-and-start's whole effect
        return c.status(s["name"]) == "running"

    def defined_only(c: Ctx, s: dict[str, Any]) -> bool:
        return c.defined(s["name"]) and c.status(s["name"]) != "running"

    def listed_snapshot(c: Ctx, s: dict[str, Any]) -> bool:
        return "<name>s1</name>" in _snapshot_files(c, s["name"])

    return [
        FaultPoint("libvirtd-kill:vm.create", "vm.create", lambda c: {"name": "fldcreate"}, create,
                   running, delay=0.3, partial=defined_only, quick=True),
        FaultPoint("libvirtd-kill:vm.create/frozen", "vm.create", lambda c: {"name": "fldcreatef"}, create,
                   running, delay=1.0, frozen=True, partial=defined_only),
        FaultPoint("libvirtd-kill:vm.disk.attach", "vm.disk.attach", with_extra, attach,
                   lambda c, s: "fldattach/x.qcow2" in c.persistent_xml(s["name"]), delay=0.1),
        FaultPoint("libvirtd-kill:vm.disk.attach/frozen", "vm.disk.attach", with_extra, attach,
                   lambda c, s: "fldattach/x.qcow2" in c.persistent_xml(s["name"]), delay=1.0, frozen=True),
        FaultPoint("libvirtd-kill:vm.snapshot.create", "vm.snapshot.create", _on_running("fldsnap", disk=True), snapshot,
                   listed_snapshot, delay=0.1),
    ]


def _snapshot_files(c: Ctx, name: str) -> str:
    """libvirt's snapshot metadata of the domain (/var/lib/libvirt/qemu/snapshot/<name>/)."""
    d = Path("/var/lib/libvirt/qemu/snapshot") / name
    return "".join(p.read_text(errors="replace") for p in d.glob("*.xml")) if d.exists() else ""


def full_points() -> list[FaultPoint]:
    def imported(c: Ctx) -> dict[str, Any]:
        _random_raw(c.imp / "fullimp" / "in.raw", FILL_MIB)
        return {}

    def cloned(c: Ctx) -> dict[str, Any]:
        _random_raw(c.imp / "fullclone" / "in.raw", FILL_MIB)
        return {}

    return [
        FaultPoint("datastore-full:volume.import", "volume.import", imported,
                   lambda c, s: c.storage.ImportVolume(S.ImportVolumeRequest(
                       request_id=s["rid"], source="imp/fullimp/in.raw", datastore="small", path="imp.qcow2"), timeout=60),
                   lambda c, s: (c.small / "imp.qcow2").exists(), must_fail=True, quick=True),
        FaultPoint("datastore-full:volume.clone", "volume.clone", cloned,
                   lambda c, s: c.storage.CloneVolume(S.CloneVolumeRequest(
                       request_id=s["rid"], source="imp/fullclone/in.raw", datastore="small", path="clone.raw",
                       format=pb.storage_pb2.VOLUME_FORMAT_RAW), timeout=60),
                   lambda c, s: (c.small / "clone.raw").exists(), must_fail=True),
    ]


def run_fault(node: fn.Node, ctx: Ctx, point: FaultPoint, baseline: dict[str, set[str]], volumes: set[str],
              neighbour: tuple[str, int]) -> dict[str, Any]:
    """One point on the running agent: prepare, request, break (libvirtd) or not (the datastore
    fills by itself), wait for the operation to end, judge, clean up, count what is left."""
    out: dict[str, Any] = {"point": point.name, "kind": point.kind, "reached": True,
                           "group": point.group or ("libvirtd-kill" if point.delay else "datastore-full")}
    state = point.prepare(ctx)
    state["rid"] = _rid(point.name)
    errors: list[str] = []

    def send() -> None:
        try:
            point.request(ctx, state)
        except grpc.RpcError as exc:
            errors.append(exc.code().name)
            out["message"] = exc.details() or ""

    if point.frozen:
        os.kill(_libvirtd_pid(), signal.SIGSTOP)
    if point.breaker is not None and point.break_first:
        point.breaker(ctx, state)
    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    mend = point.mend
    if point.breaker is not None:
        time.sleep(point.delay)
        out["request_done_before_kill"] = not sender.is_alive()
        if not point.break_first:
            point.breaker(ctx, state)
        elif mend is not None:
            mend(ctx, state)
            mend = None
    elif point.delay:
        time.sleep(point.delay)
        out["libvirtd_killed"] = _kill_libvirtd()
        out["request_done_before_kill"] = not sender.is_alive()
    sender.join(timeout=180)
    out["rpc"] = errors[0] if errors else "OK"
    deadline = time.monotonic() + 180
    op = None
    while time.monotonic() < deadline:
        op = _until(lambda: fn.operation(ctx.channel, point.kind, state["rid"]), 60, "listing operations")
        if op is None and errors:
            break  # refused before it was journalled (libvirtd was down when it was checked)
        if op is not None and op.done:
            break
        time.sleep(0.5)
    if mend is not None:
        mend(ctx, state)
    effect = point.effect(ctx, state)
    settle = time.monotonic() + point.settle
    if op is not None and op.state == O.OPERATION_STATE_SUCCEEDED:
        while not effect and time.monotonic() < settle:
            time.sleep(0.5)  # a success the agent's own repair completes (the reconcile re-tags a port)
            effect = point.effect(ctx, state)
    elif point.settle:
        time.sleep(point.settle)  # a failure whose effect lands late (QEMU finishing once the array answers)
        effect = point.effect(ctx, state)
    out["effect"] = effect
    partly = point.partial is not None and point.partial(ctx, state)
    if op is None and errors and not effect and not partly:
        out["state"] = f"refused ({errors[0]})"  # nothing was started, and nothing happened: the truth
        if point.refused_as and errors[0] not in point.refused_as:
            out["untruthful"] = f"refused as {errors[0]}, not {' or '.join(point.refused_as)}: {out.get('message', '')[-120:]}"
    else:
        out["state"] = O.OperationState.Name(op.state) if op is not None else "-"
        out["message"] = op.error.message if op is not None else ""
        why = fn.truth(op, effect)
        if not why and point.must_fail and op.state == O.OPERATION_STATE_SUCCEEDED:
            why = "succeeded on a datastore too small for it"
        elif not why and point.must_fail and "space" not in op.error.message.lower():
            why = f"the failure does not say the datastore is full: {op.error.message[-120:]}"
        elif not why and partly and "left" not in op.error.message:
            why = f"failed without saying what it left: {op.error.message[-120:]}"
        if why:
            out["untruthful"] = why
    out["cleanup"] = _until(lambda: fn.clean_up(ctx.channel, volumes), 120, "cleaning up")
    out["leaks"] = fn.leaks(node, baseline) + out["cleanup"]
    lost = fn.neighbour_lost(node, neighbour, ctx.status(fn.NEIGHBOUR))
    if lost:
        out["guest_lost"] = lost
    return out
