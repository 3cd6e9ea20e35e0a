"""Live re-pinning cost: native batch vs pure Python vs libvirt pinVcpu; planning 500 VMs.

Why: after CPUs go offline/isolated or a dedicated VM shrinks the shared pool, the agent
re-pins every thread of many QEMU processes; this measures the native hot path
(cna_agent.host.affinity, one cffi call per batch) against the same work in Python and
against libvirt's per-vCPU API, and how long the planner takes to place a full host.

* native_ms / python_ms: re-pin every thread of N multi-threaded child processes (default
  20 x 8 worker threads, plus each process's main thread) — list /proc/<pid>/task and
  sched_setaffinity each thread: ``affinity.pin_processes`` with use_native=True (one C call
  lists and pins every thread) vs use_native=False (os.listdir + os.sched_setaffinity per
  thread). The syscalls themselves (a thread migration each) are most of the cost on both.
  Every run moves all threads to the other CPU set, so each call really changes affinity.
* libvirt_ms: ``virDomain.pinVcpu`` for every vCPU of G real QEMU TCG guests (default 4 x 2
  vCPUs; diskless, no OS, started on this process's own embedded libvirt QEMU driver).
  native_guests_ms: the same re-pin of those guests' vCPU threads done with
  ``affinity.repin_threads`` (which also rewrites libvirt's per-vCPU cpuset cgroups), for a
  like-for-like ratio on the same threads.
* plan_500_ms: planning 500 VMs one after another (each sees the previous placements) on a
  synthetic Kunpeng-like host: 2 sockets x 2 NUMA nodes x 12 clusters x 4 cores = 192 cores,
  a mix of dedicated (2-8 vCPUs) and shared VMs, some with hugepages.

Runs are interleaved (native, python, libvirt, native-guests in each round) so machine noise
hits all; medians. Usage: python -m benchmarks.pinning [--procs N] [--threads T] [--guests G]
[--runs R]; the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid as uuidlib

import cna_agent  # noqa: F401  (first: gRPC fork support off; libvirt forks QEMU here)
from cna_agent.contracts import PlacementPlan  # noqa: F401  (import cost outside timings)
from cna_agent.host import affinity
from cna_agent.host.cpulist import format_cpulist
from cna_agent.host.placement import Placement, Planner, VmRequest
from cna_agent.host.topology import CpuInfo, HostTopology, HugePagePool, NumaNode

CHILD = textwrap.dedent(
    """
    import sys, threading
    ev = threading.Event()
    for _ in range(int(sys.argv[1])):
        threading.Thread(target=ev.wait, daemon=True).start()
    print("ready", flush=True)
    sys.stdin.read()
    """
)


def spawn_children(n: int, threads: int) -> list[subprocess.Popen]:
    procs = [subprocess.Popen([sys.executable, "-c", CHILD, str(threads)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True) for _ in range(n)]
    for p in procs:
        assert p.stdout.readline().strip() == "ready"
    return procs


def stop_children(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        p.stdin.close()
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()


# -- guests ----------------------------------------------------------------------------------------


def guest_xml(name: str, vcpus: int, emulator: str) -> str:
    return f"""<domain type='qemu'>
  <name>{name}</name><uuid>{uuidlib.uuid4()}</uuid>
  <memory unit='MiB'>64</memory><vcpu placement='static'>{vcpus}</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type><boot dev='network'/></os>
  <on_poweroff>destroy</on_poweroff><on_reboot>restart</on_reboot><on_crash>destroy</on_crash>
  <devices><emulator>{emulator}</emulator><controller type='usb' model='none'/><memballoon model='none'/></devices>
</domain>"""


def vcpu_threads(pid: int) -> dict[int, int]:
    """{vCPU index: tid} from the thread names QEMU gives with debug-threads=on."""
    from cna_agent.host.drift import classify

    out = {}
    for s in affinity.thread_stats(pid):
        role, index = classify(s.comm)
        if role == "vcpu":
            out[index] = s.tid
    return out


def start_guests(conn, root: str, count: int, vcpus: int) -> list[tuple[object, int, dict[int, int]]]:
    emulator = shutil.which("qemu-system-x86_64") or "/usr/bin/qemu-system-x86_64"
    guests = []
    for i in range(count):
        dom = conn.createXML(guest_xml(f"pinbench-{os.getpid()}-{i}", vcpus, emulator), 0)
        pid_file = os.path.join(root, "run", "qemu", f"{dom.name()}.pid")
        deadline = time.monotonic() + 60
        while True:
            try:
                pid = int(open(pid_file).read().strip())
                threads = vcpu_threads(pid)
                if len(threads) == vcpus:
                    break
            except (OSError, ValueError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"guest {dom.name()} has no {vcpus} vCPU threads after 60 s")
            time.sleep(0.1)
        guests.append((dom, pid, threads))
    return guests


# -- planning --------------------------------------------------------------------------------------


def kunpeng_like(sockets: int = 2, nodes_per_socket: int = 2, clusters: int = 12, cores: int = 4,
                 mem_gib_per_node: int = 1024) -> HostTopology:
    cpus: list[CpuInfo] = []
    node_cpus: dict[int, list[int]] = {}
    cid = 0
    for s in range(sockets):
        for n in range(nodes_per_socket):
            node = s * nodes_per_socket + n
            for cl in range(clusters):
                for co in range(cores):
                    cpus.append(CpuInfo(cid, True, s, 0, n * clusters + cl, (n * clusters + cl) * cores + co, node, (cid,)))
                    node_cpus.setdefault(node, []).append(cid)
                    cid += 1
    n_nodes = sockets * nodes_per_socket
    mem_kib = mem_gib_per_node * 1024 * 1024
    nodes = tuple(
        NumaNode(i, tuple(node_cpus[i]), mem_kib, mem_kib,
                 tuple(10 if i == j else (12 if i // nodes_per_socket == j // nodes_per_socket else 20) for j in range(n_nodes)),
                 (HugePagePool(2048, 65536, 65536), HugePagePool(524288, 128, 128), HugePagePool(1048576, 64, 64)))
        for i in range(n_nodes)
    )
    return HostTopology("aarch64", "HiSilicon", "synthetic Kunpeng 920", None, "arm-el2", sockets, nodes_per_socket,
                        clusters, cores, 1, tuple(cpus), tuple(c.id for c in cpus), nodes, (), (), mem_kib * n_nodes)


def vm_mix(count: int = 500) -> list[VmRequest]:
    """A deterministic mix: every 8th VM dedicated (2-8 vCPUs), every 5th with hugepages."""
    reqs = []
    for i in range(count):
        dedicated = i % 8 == 0
        vcpus = (2, 4, 8, 2)[i % 4] if dedicated else (1, 2, 4, 8)[i % 4]
        memory = (2048, 4096, 8192, 1024)[i % 4]
        reqs.append(VmRequest(f"vm-{i}", vcpus, memory, dedicated=dedicated, hugepages=i % 5 == 0))
    return reqs


def plan_all(planner: Planner, reqs: list[VmRequest]) -> tuple[float, int]:
    placed: list[Placement] = []
    refused = 0
    t0 = time.perf_counter()
    for req in reqs:
        try:
            placed.append(planner.plan(req, placed))
        except Exception:  # noqa: BLE001 - a full host refuses; counted
            refused += 1
    return (time.perf_counter() - t0) * 1000, refused


# -- main ------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--procs", type=int, default=20)
    ap.add_argument("--threads", type=int, default=8)
    ap.add_argument("--guests", type=int, default=4)
    ap.add_argument("--guest-vcpus", type=int, default=2)
    ap.add_argument("--runs", type=int, default=15)
    args = ap.parse_args()
    if not affinity.native_available():
        raise SystemExit("cna_agent._native lacks affinity.c: rebuild with python native/build_native.py")
    cpus = sorted(os.sched_getaffinity(0))
    sets = [tuple(cpus[: max(1, len(cpus) // 2)]), tuple(cpus[len(cpus) // 2 :]) or tuple(cpus)]

    procs = spawn_children(args.procs, args.threads)
    conn = None
    root = tempfile.mkdtemp(prefix="cna-bench-pin-")
    os.chmod(root, 0o755)
    guests: list = []
    native_ms: list[float] = []
    python_ms: list[float] = []
    libvirt_ms: list[float] = []
    native_guests_ms: list[float] = []
    threads_total = 0
    try:
        if args.guests:
            from benchmarks.vm_create import open_raw_libvirt

            conn = open_raw_libvirt(root)
            guests = start_guests(conn, root, args.guests, args.guest_vcpus)
        pids = [p.pid for p in procs]
        for r in range(args.runs):
            a, b = sets[r % 2], sets[(r + 1) % 2]
            t0 = time.perf_counter()
            done, failed = affinity.pin_processes({pid: a for pid in pids}, use_native=True)
            native_ms.append((time.perf_counter() - t0) * 1000)
            assert not failed, failed
            threads_total = done
            t0 = time.perf_counter()
            done_py, failed = affinity.pin_processes({pid: b for pid in pids}, use_native=False)
            python_ms.append((time.perf_counter() - t0) * 1000)
            assert not failed and done_py == done, (failed, done_py, done)
            if guests:
                ncpu = len(cpus)
                t0 = time.perf_counter()
                for dom, _pid, vt in guests:
                    for v in vt:
                        target = cpus[(v + r) % ncpu]
                        dom.pinVcpu(v, tuple(c == target for c in range(max(cpus) + 1)))
                libvirt_ms.append((time.perf_counter() - t0) * 1000)
                t0 = time.perf_counter()
                for _dom, pid, vt in guests:
                    failed = affinity.repin_threads(pid, {tid: (cpus[(v + r + 1) % ncpu],) for v, tid in vt.items()})
                    assert not failed, failed
                native_guests_ms.append((time.perf_counter() - t0) * 1000)
        # Check the last pins really landed, from /proc (not from the calls' own answers).
        for pid in pids[:3]:
            for tid in os.listdir(f"/proc/{pid}/task"):
                line = next(l for l in open(f"/proc/{pid}/task/{tid}/status") if l.startswith("Cpus_allowed_list"))
                assert line.split()[1] == format_cpulist(sets[args.runs % 2]), line
    finally:
        stop_children(procs)
        for dom, _pid, _vt in guests:
            try:
                dom.destroy()
            except Exception:  # noqa: BLE001
                pass
        if conn is not None:
            conn.close()
        shutil.rmtree(root, ignore_errors=True)

    topo = kunpeng_like()
    planner = Planner(topo, reserved_cpus=range(4))
    reqs = vm_mix(500)
    plans = [plan_all(planner, reqs) for _ in range(5)]
    plan_ms = statistics.median(p[0] for p in plans)
    refused = plans[0][1]

    med = statistics.median
    vcpus_total = sum(len(vt) for _d, _p, vt in guests)
    result = {
        "native_ms": round(med(native_ms), 3),
        "python_ms": round(med(python_ms), 3),
        "libvirt_ms": round(med(libvirt_ms), 3) if libvirt_ms else None,
        "plan_500_ms": round(plan_ms, 1),
        "native_guests_ms": round(med(native_guests_ms), 3) if native_guests_ms else None,
        "python_over_native": round(med(python_ms) / med(native_ms), 2),
        "libvirt_over_native_same_guests": round(med(libvirt_ms) / med(native_guests_ms), 2) if libvirt_ms else None,
        "processes": args.procs,
        "threads_repinned": threads_total,
        "guests": len(guests),
        "guest_vcpus_repinned": vcpus_total,
        "libvirt_ms_per_vcpu": round(med(libvirt_ms) / vcpus_total, 3) if vcpus_total else None,
        "native_us_per_thread": round(med(native_ms) * 1000 / max(1, threads_total), 2),
        "plan_topology": f"{topo.sockets}s x {len(topo.numa_nodes)} nodes x {len(topo.cpus)} cores",
        "plan_refused": refused,
        "runs": args.runs,
    }
    print(f"re-pin {threads_total} threads of {args.procs} processes: native {result['native_ms']} ms, "
          f"python {result['python_ms']} ms (x{result['python_over_native']})")
    if guests:
        print(f"re-pin {vcpus_total} vCPUs of {len(guests)} TCG guests: libvirt pinVcpu {result['libvirt_ms']} ms, "
              f"native {result['native_guests_ms']} ms (x{result['libvirt_over_native_same_guests']})")
    print(f"plan 500 VMs on {result['plan_topology']}: {result['plan_500_ms']} ms ({refused} refused)")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
