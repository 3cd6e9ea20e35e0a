"""Bounded soak: several clients cycle small guests through the agent while its RSS, fds and threads are watched.

Why (issue 17 item 7): a leak of memory, descriptors or threads per VM operation does not show
in a single-shot benchmark or test, but it does after hundreds of create/start/attach/snapshot/
delete cycles. Each client thread loops on its own VMs (the busybox test guest, 96 MiB, 1 vCPU,
TCG): create a 16 MiB qcow2 volume on a dir datastore, create+start the VM, hot-plug the volume,
snapshot it (even rounds: running, an external overlay; odd rounds: after the power-off, an
internal one), power off, delete the VM with its disks (the volume must be gone after it).

The agent is judged from outside (/proc/PID/status VmRSS and Threads, /proc/PID/fd count every
5 s), not from its own metrics. Per-minute medians are printed; the criterion is growth between
the median of minute 2 and the median of the last minute, <= 5% for all three. At the end the
leftovers are counted: QEMU processes of this agent's root, files in the datastore, per-VM run
directories and VMs the agent still lists (all should be 0). Every error is counted by kind
(first messages kept); a failed cycle is cleaned up (VM, then volumes, overlays first) and
counted apart, so failures do not pile up guests or files. Also reported: idle samples before
and after the clients, RSS growth per VM created, the fd targets and thread names that changed
between minute 2 and the end. Exit status 0 only if leveled off with no error and no leftovers.

    python -m benchmarks.soak [--minutes 10] [--clients 5]

The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Callable, Iterator

import cna_agent  # noqa: F401  (first: turns gRPC fork support off before grpc loads)
import grpc

from benchmarks._agent import running_agent
from cna_agent.api import pb
from cna_agent.storage.monitor import PROBE_FILE  # the datastore health probe's own file, not a leftover

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))  # the test support: the busybox guest's VmSpec
from support.guests import guest_spec  # noqa: E402

vm, st, ops_pb = pb.vm_pb2, pb.storage_pb2, pb.operations_pb2
SAMPLE_S = 5.0
OP_TIMEOUT = 300.0
MiB = 1 << 20


class Tally:
    """Operations done and errors, by kind, shared by the client threads."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.ops: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.messages: dict[str, list[str]] = {}
        self.done_at: list[float] = []  # monotonic time of each cycle finished without an error
        self.created_at: list[float] = []  # ... and of each VM created

    def ok(self, kind: str) -> None:
        with self.lock:
            self.ops[kind] += 1
            if kind == "create_start_vm":
                self.created_at.append(time.monotonic())

    def fail(self, kind: str, message: str) -> None:
        with self.lock:
            self.errors[kind] += 1
            seen = self.messages.setdefault(kind, [])
            if len(seen) < 3 and message not in seen:
                seen.append(message[:300])


class OpFailed(Exception):
    pass


def finish(ops: pb.operations_pb2_grpc.OperationsServiceStub, op: ops_pb.Operation) -> ops_pb.Operation:
    """The operation once done (WatchOperation streams its states until it is)."""
    if not op.done:
        for op in ops.WatchOperation(ops_pb.WatchOperationRequest(id=op.id), timeout=OP_TIMEOUT):
            pass
    return op


def exists(tally: Tally, get: Callable[[], object]) -> bool:
    """Whether the Get call finds its resource (NOT_FOUND: no; other errors are counted, then no)."""
    try:
        get()
        return True
    except grpc.RpcError as exc:
        if exc.code() != grpc.StatusCode.NOT_FOUND:
            tally.fail("get", f"{exc.code().name}: {exc.details()}")
        return False


def client(sock: Path, idx: int, until: float, ds: str, tally: Tally) -> None:
    with grpc.insecure_channel(f"unix:{sock}") as ch:
        vms = pb.vm_pb2_grpc.VmServiceStub(ch)
        storage = pb.storage_pb2_grpc.StorageServiceStub(ch)
        ops = pb.operations_pb2_grpc.OperationsServiceStub(ch)

        def step(kind: str, call: Callable[[], ops_pb.Operation], into=None):
            try:
                op = finish(ops, call())
            except grpc.RpcError as exc:
                tally.fail(kind, f"{exc.code().name}: {exc.details()}")
                raise OpFailed(kind) from None
            if op.HasField("error") or op.state != ops_pb.OPERATION_STATE_SUCCEEDED:
                tally.fail(kind, f"code {op.error.code}: {op.error.message}")
                raise OpFailed(kind)
            tally.ok(kind)
            if into is not None:
                op.response.Unpack(into)
            return into

        k = 0
        while time.monotonic() < until:
            name, uuid, vol_id = f"soak{idx}-{k}", "", ""
            try:
                vol = step("create_volume", lambda: storage.CreateVolume(st.CreateVolumeRequest(
                    datastore=ds, path=f"{name}/data.qcow2", size_bytes=16 * MiB, format=st.VOLUME_FORMAT_QCOW2), timeout=60),
                    st.Volume())
                vol_id = vol.id
                spec = guest_spec("x86_64", name, memory_mib=96, console=vm.ConsoleSpec(type=vm.CONSOLE_TYPE_NONE))
                uuid = step("create_start_vm", lambda: vms.CreateVm(vm.CreateVmRequest(spec=spec, start=True), timeout=60),
                            vm.Vm()).uuid
                step("attach_disk", lambda: storage.AttachDisk(st.AttachDiskRequest(vm=uuid, disk=vm.DiskSpec(volume=vol_id)),
                                                               timeout=60))
                power_off = lambda: vms.ShutdownVm(vm.ShutdownVmRequest(vm=uuid, hard=True), timeout=60)  # noqa: E731
                snap = lambda: vms.CreateSnapshot(vm.CreateSnapshotRequest(vm=uuid, name="s1"), timeout=60)  # noqa: E731
                if k % 2 == 0:
                    step("snapshot_running", snap)
                    step("power_off", power_off)
                else:
                    step("power_off", power_off)
                    step("snapshot_stopped", snap)
                step("delete_vm", lambda: vms.DeleteVm(vm.DeleteVmRequest(vm=uuid, delete_disks=True), timeout=60))
                uuid = ""
                if exists(tally, lambda: storage.GetVolume(st.GetVolumeRequest(id=vol_id), timeout=30)):
                    tally.fail("delete_disks_left_volume", vol_id)  # the attached disk outlived delete_disks
                    raise OpFailed("delete_vm")
                vol_id = ""
                with tally.lock:
                    tally.done_at.append(time.monotonic())
            except (OpFailed, grpc.RpcError) as exc:
                if isinstance(exc, grpc.RpcError):
                    tally.fail("other_rpc", f"{exc.code().name}: {exc.details()}")
                cleanup(vms, storage, step, tally, ds, name, uuid)
            k += 1


def cleanup(vms: pb.vm_pb2_grpc.VmServiceStub, storage: pb.storage_pb2_grpc.StorageServiceStub, step: Callable[..., object],
            tally: Tally, ds: str, name: str, uuid: str) -> None:
    """Remove what a failed cycle left: the VM if it still exists, then its volumes, overlays first.

    The cycle's volumes are known by name; one the agent's ListVolumes did not show is counted
    as the error "list_volumes_missed" (and deleted all the same)."""
    try:
        if uuid and exists(tally, lambda: vms.GetVm(vm.GetVmRequest(vm=uuid), timeout=30)):
            step("cleanup_delete_vm", lambda: vms.DeleteVm(vm.DeleteVmRequest(vm=uuid, force=True), timeout=60))
        listed: set[str] | None = None
        try:
            listed = {x.id for x in storage.ListVolumes(st.ListVolumesRequest(datastore=ds), timeout=30).volumes
                      if x.path.startswith(f"{name}/")}
        except grpc.RpcError as exc:  # counted; the known volumes are still deleted
            tally.fail("list_volumes", f"{exc.code().name}: {exc.details()}")
        known = [f"{ds}/{name}/data.s1.qcow2", f"{ds}/{name}/data.qcow2"]  # the external snapshot's overlay first
        for vid in known + sorted((listed or set()) - set(known)):
            if exists(tally, lambda: storage.GetVolume(st.GetVolumeRequest(id=vid), timeout=30)):
                if listed is not None and vid not in listed:
                    tally.fail("list_volumes_missed", vid)
                step("cleanup_delete_volume", lambda: storage.DeleteVolume(st.DeleteVolumeRequest(id=vid), timeout=60))
    except OpFailed:
        pass
    except grpc.RpcError as exc:
        tally.fail("cleanup", f"{exc.code().name}: {exc.details()}")


def find_agent_pid(base: Path) -> int:
    """Our child running ``serve --config <base>/agent.toml`` (running_agent does not expose it)."""
    cfg = str(base / "agent.toml")
    return next(pid for pid, argv in processes(os.getpid()) if "serve" in argv and cfg in argv)


def processes(parent: int | None = None) -> Iterator[tuple[int, list[str]]]:
    """(pid, argv) of every process readable in /proc (only ``parent``'s children if given)."""
    for d in Path("/proc").iterdir():
        try:
            if not d.name.isdigit() or (parent is not None and
                                        f"PPid:\t{parent}\n" not in (d / "status").read_text()):
                continue
            yield int(d.name), (d / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue


def sample(pid: int) -> tuple[float, int, int]:
    """(VmRSS MiB, open fds, threads) of ``pid``, from /proc."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) / 1024, len(os.listdir(f"/proc/{pid}/fd")), int(fields["Threads"])


def fd_kinds(pid: int, base: Path) -> Counter[str]:
    """What the agent's fds point at: socket/pipe/anon_inode kinds, files by their directory."""
    out: Counter[str] = Counter()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith(("socket:", "pipe:")):
            target = target.split(":")[0]
        elif target.startswith(str(base)):
            target = "<base>/" + str(Path(target).relative_to(base).parent)
        out[target] += 1
    return out


def thread_names(pid: int) -> Counter[str]:
    out: Counter[str] = Counter()
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            out[Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip()] += 1
        except OSError:
            pass
    return out


def db_size(base: Path) -> float:
    """KiB of the agent's state database (its journal), with SQLite's -wal/-shm files."""
    return sum(f.stat().st_size for f in (base / "state").glob("agent.db*")) / 1024


def qemu_processes(base: Path) -> list[int]:
    """Pids of QEMU processes started under ``base`` (the agent's embedded libvirt root)."""
    return [pid for pid, argv in processes() if "qemu-system" in argv[0] and str(base) in " ".join(argv)]


def diff(a: Counter[str], b: Counter[str]) -> dict[str, int]:
    return {k: b[k] - a[k] for k in sorted(set(a) | set(b)) if b[k] != a[k]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=int, default=10)
    ap.add_argument("--clients", type=int, default=5)
    a = ap.parse_args(argv)
    ds = Path(tempfile.mkdtemp(prefix="cna-soak-ds-"))
    ds.chmod(0o755)
    guests = REPO / ".cache" / "guests"
    extra = (f'[compute]\nimage_dirs = "{guests}"\n[storage.datastores.ds]\ntype = "dir"\npath = "{ds}"\n'
             '[libvirt]\nvirt_type = "qemu"\n')
    tally = Tally()
    samples: list[tuple[float, float, int, int]] = []
    snaps: dict[str, tuple[Counter[str], Counter[str]]] = {}
    db_kib_m2 = 0.0
    base: Path | None = None
    try:
        with running_agent(extra) as sock:
            base = sock.parent.parent
            pid = find_agent_pid(base)
            before = sample(pid)  # idle, before any client: the baseline the idle "after" sample compares with
            t0 = time.monotonic()
            until = t0 + a.minutes * 60
            threads = [threading.Thread(target=client, args=(sock, i, until, "ds", tally), daemon=True) for i in range(a.clients)]
            for t in threads:
                t.start()
            while (now := time.monotonic()) < until:
                samples.append((now - t0, *sample(pid)))
                el = now - t0
                if "minute2" not in snaps and el >= min(2, a.minutes) * 60 - SAMPLE_S:
                    snaps["minute2"] = (fd_kinds(pid, base), thread_names(pid))
                    db_kib_m2 = db_size(base)
                time.sleep(max(0.0, min(SAMPLE_S - (time.monotonic() - now), until - time.monotonic())))
            snaps["last"] = (fd_kinds(pid, base), thread_names(pid))
            for t in threads:
                t.join(timeout=OP_TIMEOUT * 3)
            stuck = sum(t.is_alive() for t in threads)
            time.sleep(SAMPLE_S)
            after = sample(pid)
            with grpc.insecure_channel(f"unix:{sock}") as ch:
                listed = len(pb.vm_pb2_grpc.VmServiceStub(ch).ListVms(vm.ListVmsRequest(), timeout=30).vms)
            run_vms = base / "run" / "vms"
            files = sorted(str(Path(d, f).relative_to(ds)) for d, _, fs in os.walk(ds) for f in fs if f != PROBE_FILE)
            leftovers = {"qemu_processes": len(qemu_processes(base)),
                         "datastore_files": len(files),
                         "run_vm_dirs": len(list(run_vms.iterdir())) if run_vms.exists() else 0,
                         "vms_listed": listed, "clients_still_running": stuck}
            qemu_logs = len(list((base / "state" / "libvirt" / "log" / "qemu").glob("*.log")))
            db_kib = db_size(base)
    finally:
        shutil.rmtree(ds, ignore_errors=True)
        for qpid in qemu_processes(base) if base else []:  # guests outlive the agent by design; an interrupted soak ends them
            with contextlib.suppress(ProcessLookupError):
                os.kill(qpid, signal.SIGKILL)

    per_min: dict[int, list[tuple[float, int, int]]] = {}
    for el, rss, fds, thr in samples:
        per_min.setdefault(int(el // 60) + 1, []).append((rss, fds, thr))
    medians = {m: tuple(statistics.median(s[i] for s in rows) for i in range(3)) for m, rows in sorted(per_min.items())}
    for m, (rss, fds, thr) in medians.items():
        created = sum(1 for t in tally.created_at if (m - 1) * 60 <= t - t0 < m * 60)
        print(f"minute {m:2d}: RSS {rss:7.1f} MiB  fds {fds:5.0f}  threads {thr:4.0f}  "
              f"({len(per_min[m])} samples, {created} VMs created)")
    print(f"idle before the clients: RSS {before[0]:.1f} MiB, fds {before[1]}, threads {before[2]}; "
          f"idle after: RSS {after[0]:.1f} MiB, fds {after[1]}, threads {after[2]}; leftovers {leftovers}")
    m2, last = medians.get(2, medians[min(medians)]), medians[max(medians)]
    lo, hi = ((2 if 2 in medians else min(medians)) - 0.5) * 60, (max(medians) - 0.5) * 60  # the two medians' mid-minutes
    vms_between = sum(1 for t in tally.created_at if lo <= t - t0 < hi)
    result: dict = {"benchmark": "soak", "minutes": a.minutes, "clients": a.clients, "clean_cycles": len(tally.done_at),
                    "vms_created": len(tally.created_at),
                    "ops": dict(sorted(tally.ops.items())), "errors": dict(sorted(tally.errors.items())),
                    "error_messages": tally.messages}
    leveled = True
    for i, key in enumerate(("rss_mib", "fds", "threads")):
        growth = (last[i] - m2[i]) / m2[i] * 100
        leveled &= growth <= 5.0
        result[key] = {"minute2": round(m2[i], 1), "last": round(last[i], 1), "growth_pct": round(growth, 2),
                       "idle_before": round(before[i], 1), "idle_after": round(after[i], 1)}
    if vms_between:
        result["rss_kib_per_vm"] = round((last[0] - m2[0]) * 1024 / vms_between, 1)
    if "minute2" in snaps:
        result["fd_kinds_change"] = diff(snaps["minute2"][0], snaps["last"][0])
        result["thread_names_change"] = diff(snaps["minute2"][1], snaps["last"][1])
    result["leftovers"] = leftovers
    result["datastore_files_left"] = files[:10]
    # not counted as leftovers: libvirt keeps one log per domain name; the agent's journal
    result["libvirt_qemu_logs"], result["state_db_kib"] = qemu_logs, {"minute2": round(db_kib_m2), "end": round(db_kib)}
    result["leveled_off"] = leveled
    g = {k: result[k]["growth_pct"] for k in ("rss_mib", "fds", "threads")}
    print(f"growth minute 2 -> minute {max(medians)}: RSS {g['rss_mib']}%, fds {g['fds']}%, threads {g['threads']}% -> "
          f"{'leveled off' if leveled else 'NOT leveled off'}")
    print(json.dumps(result))
    return 0 if leveled and not tally.errors and not any(leftovers.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
