"""One host at density: the agent's control plane with 1,000 managed VMs, and its restart.

``python -m benchmarks.scale [--vms 1000] [--running 100] [--calls 200]``

Setup: the real daemon on its embedded QEMU driver (libvirt's work runs inside the agent, so
the agent's RSS, threads and CPU count everything but QEMU), ``--vms`` tiny diskless VMs
defined through CreateVm by 8 parallel clients, ``--running`` of them started and then paused
through the agent (a paused TCG guest burns no CPU; 2 cores cannot run hundreds of guests
spinning in SeaBIOS, and a paused one answers libvirt and its monitor the same way).

Measured, each against its baseline where there is one:

* ``list_p50_ms``/``list_p99_ms``: ListVms of all VMs (``status_only`` false: specs too), and
  ``raw_list_ms``: the libvirt work it stands on (listAllDomains + each domain's XMLDesc, on a
  second embedded connection to a copy-free root of the same size) for scale;
* ``get_p99_ms``: GetVm of random VMs;
* ``define_ms_per_vm_first``/``_rest``: CreateVm (define only) per VM for the first 100 and
  for the rest (equal: a create does not cost more on a full host);
* ``rss_mb``, ``threads``, ``fds`` of the agent process (``raw_libvirt_rss_mb``: a process
  holding only the embedded libvirt on the same root, its running QEMUs included: the part
  of ``rss_mb`` that is libvirt's), with 1,000 VMs and, from the first
  VM count, how they grow (``threads_at_100``: bounded means equal; the embedded libvirt's
  per-running-domain threads are ``threads_libvirt_vm``);
* ``idle_cpu_pct``: the agent's CPU over 60 s with nothing asked of it (its reconcile and stats):
  one period of its slowest loops (the network drift check and VM reconcile run each minute; a
  10 s window read 0.4% or 7% by whether one of them fell in it);
* ``op_event_p99_ms``, ``op_events_lost``, ``op_event_rate_per_s``: resume/pause of every
  running VM through the agent (20 callers at once) while 10 WatchEvents clients listen, each
  client's receive time against the event's own timestamp (when libvirt's callback ran in the
  agent): events paced by the agent's own operations on QEMU (35-100 a second here); the
  issue's 1,000 a second from libvirt is the ``events`` part below;
* ``adopt_ms``: kill -9, then process start to READY with every VM listed with its state
  (the restarted agent's first ListVms compared with the one before the kill).

With ``--with`` (default ``events,create,stats,isolation``) the figures the issue measures in
their own benchmarks are run after these, each in its own process once this agent has stopped,
and their last lines are merged into this one: ``benchmarks.event_rate`` (1,000 lifecycle
events a second from a libvirtd to 10 watchers and the VRM link: ``event_p99_ms``,
``events_lost``, ``event_rate_per_s``, ``vrm_event_p99_ms``, and ``batches_*`` for the same on
WatchEventBatches), ``benchmarks.vm_create`` (one create against raw
libvirt, ``create_ratio``; 20 in parallel from 5 clients, ``parallel_ratio``),
``benchmarks.stats --driver embedded --vms STATS_VMS`` (CPU per sample counted in every
process: ``bulk_cpu_ms``, ``per_domain_cpu_ms``, ... as it names them) and
``benchmarks.isolation`` (one VM's hung QEMU and the others' calls: ``isolation_*_ratio``). A
part that fails is reported as ``<part>_error`` and the rest still count. ``--with ""`` runs
this benchmark alone.

The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import cna_agent  # noqa: F401  (first: turns gRPC fork support off before grpc loads)
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from benchmarks._agent import cpu_seconds, percentile
from cna_agent.api import pb

v = pb.vm_pb2
ev = pb.events_pb2

#: The idle window: the period of the agent's slowest background loops.
IDLE_S = 60


def _spec(name: str):
    return v.VmSpec(name=name, arch=pb.common_pb2.ARCH_X86_64, vcpus=1, memory_mib=32,
                    console=v.ConsoleSpec(type=v.CONSOLE_TYPE_NONE), hotplug_slots=0)


class Agent:
    """The daemon as a process this benchmark can kill and start again on the same state."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.sock = base / "run" / "agent.sock"
        self.cfg = base / "agent.toml"
        self.cfg.write_text(
            f'[grpc]\nlisten = ""\nunix_socket = "{self.sock}"\n[state]\ndir = "{base / "state"}"\n'
            f'run_dir = "{base / "run"}"\n[log]\nlevel = "info"\n'
            f'[libvirt]\nvirt_type = "qemu"\nuri = "qemu:///embed?root={base / "state" / "libvirt"}"\n')
        self.proc: subprocess.Popen | None = None
        #: Milliseconds from the last start to each start-up step seen in the log.
        self.phases: dict[str, int] = {}

    def start(self) -> float:
        """Start it; seconds until health says SERVING."""
        script = Path(sys.executable).with_name("cna-agent")
        cmd = [str(script)] if script.exists() else [sys.executable, "-m", "cna_agent.daemon"]
        log_path = self.base / "agent.log"
        log = log_path.open("ab")
        offset = log_path.stat().st_size
        self.phases = {}
        t0 = time.perf_counter()
        self.proc = subprocess.Popen([*cmd, "serve", "--config", str(self.cfg)], stdout=log, stderr=subprocess.STDOUT,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        deadline = time.monotonic() + 300
        while True:
            with log_path.open("rb") as f:  # when each start-up step showed in the log (20 ms grain)
                f.seek(offset)
                text = f.read().decode("utf-8", "replace")
            for mark in ("event=libvirt.connected", "event=storage.started", "event=vm.adopted", "event=agent.ready"):
                if mark in text and mark not in self.phases:
                    self.phases[mark.split("=", 1)[1]] = round((time.perf_counter() - t0) * 1000)
            if self.proc.poll() is not None:
                raise RuntimeError(f"agent exited: {(self.base / 'agent.log').read_text()[-3000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError("agent not ready in 300 s")
            if self.sock.exists():
                try:
                    with grpc.insecure_channel(f"unix:{self.sock}") as ch:
                        r = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=2)
                        if r.status == health_pb2.HealthCheckResponse.SERVING:
                            return time.perf_counter() - t0
                except grpc.RpcError:
                    pass
            time.sleep(0.02)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    def proc_facts(self) -> dict[str, float]:
        """RSS, threads and fds of the agent process. ``threads_libvirt_vm`` are the embedded
        libvirt's per-running-domain monitor threads ("vm-<name>", libvirt's own design since
        7.x: in production they live in libvirtd), counted apart from the agent's ``threads``."""
        assert self.proc is not None
        pid = self.proc.pid
        status = Path(f"/proc/{pid}/status").read_text()
        rss_kb = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:")))
        names = []
        for t in os.listdir(f"/proc/{pid}/task"):
            try:
                names.append(Path(f"/proc/{pid}/task/{t}/comm").read_text().strip())
            except OSError:
                pass
        per_vm = sum(1 for n in names if n.startswith("vm-"))
        return {"rss_mb": round(rss_kb / 1024, 1), "threads": len(names) - per_vm, "threads_libvirt_vm": per_vm,
                "fds": len(os.listdir(f"/proc/{pid}/fd"))}

    def cpu_s(self) -> float:
        assert self.proc is not None
        return cpu_seconds(self.proc.pid)


def _ok(ch, op, timeout: float = 300) -> None:
    if not op.done:
        for op in pb.operations_pb2_grpc.OperationsServiceStub(ch).WatchOperation(
                pb.operations_pb2.WatchOperationRequest(id=op.id), timeout=timeout):
            pass
    if op.HasField("error"):
        raise RuntimeError(f"{op.kind} failed: {op.error.message}")


def _define(sock: Path, names: list[str], clients: int) -> float:
    chans = [grpc.insecure_channel(f"unix:{sock}") for _ in range(clients)]
    try:
        def one(i_name: tuple[int, str]) -> None:
            i, name = i_name
            ch = chans[i % clients]
            _ok(ch, pb.vm_pb2_grpc.VmServiceStub(ch).CreateVm(v.CreateVmRequest(spec=_spec(name)), timeout=300))

        t0 = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            list(pool.map(one, enumerate(names)))
        return time.perf_counter() - t0
    finally:
        for c in chans:
            c.close()


def _timed(fn, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1000)
    return out


def _listing(stub) -> dict[str, int]:
    return {x.name: x.status.state for x in stub.ListVms(v.ListVmsRequest(), timeout=120).vms}


def _raw_list(root: str, calls: int) -> tuple[float, float]:
    """(ms, MiB): the libvirt work under a ListVms (listAllDomains + each domain's XMLDesc, the
    median of ``calls``), and the RSS of a process holding nothing but that libvirt: the
    agent's own embedded root, opened once the agent has stopped (two processes must not open
    one root), so its libvirt re-attaches to the same running QEMUs the agent had: the part
    of the agent's RSS that is the embedded libvirt's."""
    code = (
        "import sys, time, statistics, libvirt\n"
        "libvirt.registerErrorHandler(lambda c, e: None, None)\n"
        "from cna_agent.hypervisor import ensure_event_loop, prepare_embedded_root\n"
        "ensure_event_loop()\n"
        "prepare_embedded_root(sys.argv[1])\n"
        "conn = libvirt.open('qemu:///embed?root=' + sys.argv[1])\n"
        "out = []\n"
        "for _ in range(int(sys.argv[2])):\n"
        "    t = time.perf_counter()\n"
        "    for d in conn.listAllDomains(0):\n"
        "        d.XMLDesc(0)\n"
        "    out.append((time.perf_counter() - t) * 1000)\n"
        "rss = [l for l in open('/proc/self/status') if l.startswith('VmRSS:')][0].split()[1]\n"
        "print(statistics.median(out), int(rss) / 1024)\n")
    r = subprocess.run([sys.executable, "-c", code, root, str(calls)], capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        raise RuntimeError(f"raw listing exited {r.returncode}: {r.stderr[-2000:]}")
    ms, mib = r.stdout.strip().splitlines()[-1].split()
    return float(ms), float(mib)


def _events(sock: Path, running: list[str], clients: int) -> tuple[float, int, int, float]:
    """(p99 ms, lost, seen, events per second) for a resume+pause of every running VM with
    ``clients`` watchers."""
    chans = [grpc.insecure_channel(f"unix:{sock}") for _ in range(clients)]
    lat: list[list[float]] = [[] for _ in range(clients)]
    want = {(n, s) for n in running for s in ("paused", "running")}
    got: list[set] = [set() for _ in range(clients)]
    ready = threading.Barrier(clients + 1)
    done = threading.Event()
    calls = []

    def watch(i: int) -> None:
        call = pb.events_pb2_grpc.EventServiceStub(chans[i]).WatchEvents(
            ev.WatchEventsRequest(from_now=True, types=["vm.lifecycle"]), timeout=600)
        calls.append(call)
        call.initial_metadata()
        ready.wait()
        try:
            for e in call:
                now = time.time()
                key = (e.resource_name, e.attributes.get("state", ""))
                if key in want:
                    got[i].add(key)
                    lat[i].append((now - (e.time.seconds + e.time.nanos / 1e9)) * 1000)
                if len(got[i]) == len(want):
                    break
        except grpc.RpcError:
            pass

    threads = [threading.Thread(target=watch, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    ready.wait()
    # As fast as the agent takes them: 20 callers at once over 5 channels, so libvirt's events
    # come in a burst (the achieved rate is reported, not assumed).
    burst = [grpc.insecure_channel(f"unix:{sock}") for _ in range(5)]

    def flip(i_name: tuple[int, str], resume: bool) -> None:
        i, n = i_name
        ch = burst[i % len(burst)]
        stub = pb.vm_pb2_grpc.VmServiceStub(ch)
        _ok(ch, (stub.ResumeVm if resume else stub.PauseVm)(v.VmActionRequest(vm=n), timeout=120))

    t_burst = time.perf_counter()
    with ThreadPoolExecutor(20) as pool:
        list(pool.map(lambda x: flip(x, True), enumerate(running)))
        list(pool.map(lambda x: flip(x, False), enumerate(running)))
    burst_s = time.perf_counter() - t_burst
    for c in burst:
        c.close()
    deadline = time.monotonic() + 60
    for t in threads:
        t.join(max(0.1, deadline - time.monotonic()))
    done.set()
    for c in calls:
        c.cancel()
    for c in chans:
        c.close()
    flat = [x for xs in lat for x in xs]
    lost = sum(len(want - g) for g in got)
    return (percentile(flat, 99) if flat else float("nan")), lost, len(flat), len(want) / burst_s


#: name -> (module, arguments, its key's name in the merged line): the issue's own names
#: (parallel_ratio, bulk_cpu_ms, ...) are kept, the rest say which part measured them. Each runs
#: with its own defaults: the whole line took 14.2 min on 2 cores (14.0 with fewer rounds of
#: vm_create and stats: their set-up, not their rounds, is their time).
PARTS: dict[str, tuple[str, list[str], Callable[[str], str]]] = {
    "events": ("benchmarks.event_rate", [], lambda k: k if k.startswith(("event", "batches_", "vrm_")) else f"events_{k}"),
    "create": ("benchmarks.vm_create", [], lambda k: k if k.startswith("parallel") else f"create_{k}"),
    "stats": ("benchmarks.stats", ["--driver", "embedded"], lambda k: f"stats_{k}" if k in ("vms", "driver") else k),
    "isolation": ("benchmarks.isolation", [], lambda k: f"isolation_{k}"),
}


def _part(name: str, stats_vms: int) -> dict[str, object]:
    """Run one of PARTS; its JSON line with the keys named for the merged line."""
    module, argv, key = PARTS[name]
    if name == "stats":
        argv = [*argv, "--vms", str(stats_vms)]
    t0 = time.perf_counter()
    try:
        r = subprocess.run([sys.executable, "-m", module, *argv], capture_output=True, text=True, timeout=1200,
                           cwd=str(Path(__file__).resolve().parents[1]))
    except subprocess.TimeoutExpired:
        return {f"{name}_error": "did not finish in 1,200 s"}
    took = {f"{name}_wall_s": round(time.perf_counter() - t0, 1)}
    try:
        got = json.loads(r.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        return {**took, f"{name}_error": f"exit {r.returncode}: {r.stderr[-300:]}"}
    return {**{key(k): val for k, val in got.items()}, **took}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vms", type=int, default=1000)
    ap.add_argument("--running", type=int, default=100)
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--clients", type=int, default=10, help="WatchEvents clients")
    ap.add_argument("--with", dest="parts", default="events,create,stats,isolation",
                    help=f"other benchmarks to run after and merge into the JSON line (of {','.join(PARTS)}; '' for none)")
    ap.add_argument("--stats-vms", type=int, default=200, help="paused guests for benchmarks.stats")
    args = ap.parse_args()
    parts = [p for p in args.parts.split(",") if p]
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        ap.error(f"--with: unknown part(s) {unknown}; known: {list(PARTS)}")
    base = Path(tempfile.mkdtemp(prefix="cna-scale-"))
    base.chmod(0o711)
    agent = Agent(base)
    out: dict[str, object] = {"vms": args.vms, "running": args.running, "driver": "embedded"}
    try:
        agent.start()
        names = [f"s{i:04d}" for i in range(args.vms)]
        first = min(100, args.vms)
        took = _define(agent.sock, names[:first], 8)
        out["define_ms_per_vm_first"] = round(took * 1000 / first, 1)
        at100 = agent.proc_facts()
        if args.vms > first:
            took = _define(agent.sock, names[first:], 8)
            out["define_ms_per_vm_rest"] = round(took * 1000 / (args.vms - first), 1)
        running = names[: args.running]
        with grpc.insecure_channel(f"unix:{agent.sock}") as ch:
            stub = pb.vm_pb2_grpc.VmServiceStub(ch)
            t0 = time.perf_counter()
            for n in running:
                _ok(ch, stub.StartVm(v.VmActionRequest(vm=n), timeout=120))
                _ok(ch, stub.PauseVm(v.VmActionRequest(vm=n), timeout=60))
            out["start_pause_s"] = round(time.perf_counter() - t0, 1)
            time.sleep(5)  # the start-up of the running VMs' side channels settles
            listing = _listing(stub)
            assert len(listing) == args.vms, len(listing)
            lists = _timed(lambda: stub.ListVms(v.ListVmsRequest(), timeout=120), max(20, args.calls // 10))
            picks = [random.choice(names) for _ in range(args.calls)]
            gets = []
            for n in picks:
                t = time.perf_counter()
                stub.GetVm(v.GetVmRequest(vm=n), timeout=30)
                gets.append((time.perf_counter() - t) * 1000)
        out.update({"list_p50_ms": round(statistics.median(lists), 1), "list_p99_ms": round(percentile(lists, 99), 1),
                    "get_p50_ms": round(statistics.median(gets), 2), "get_p99_ms": round(percentile(gets, 99), 2)})
        facts = agent.proc_facts()
        out.update(facts)
        out.update({"rss_mb_at_100": at100["rss_mb"], "threads_at_100": at100["threads"], "fds_at_100": at100["fds"]})
        c0 = agent.cpu_s()
        time.sleep(IDLE_S)
        out["idle_cpu_pct"] = round((agent.cpu_s() - c0) / IDLE_S * 100, 1)
        p99, lost, seen, rate = _events(agent.sock, running, args.clients)
        out.update({"op_event_p99_ms": round(p99, 1), "op_events_lost": lost, "op_events_seen": seen,
                    "op_event_rate_per_s": round(rate, 1)})

        with grpc.insecure_channel(f"unix:{agent.sock}") as ch:
            before = _listing(pb.vm_pb2_grpc.VmServiceStub(ch))
        agent.kill()
        t0 = time.perf_counter()
        ready_s = agent.start()
        with grpc.insecure_channel(f"unix:{agent.sock}") as ch:
            after = _listing(pb.vm_pb2_grpc.VmServiceStub(ch))
        out["adopt_ms"] = round((time.perf_counter() - t0) * 1000)
        out["adopt_ready_ms"] = round(ready_s * 1000)
        out["adopt_listing_matches"] = after == before
        out["adopt_phases_ms"] = agent.phases
        agent.stop()
        try:
            ms, mib = _raw_list(str(base / "state" / "libvirt"), 10)
            out["raw_list_ms"], out["raw_libvirt_rss_mb"] = round(ms, 1), round(mib, 1)
        except (RuntimeError, subprocess.TimeoutExpired, ValueError) as exc:  # the figures above still count
            out["raw_list_error"] = str(exc)[:300]
    finally:
        agent.stop()
        subprocess.run(["pkill", "-9", "-f", str(base)], capture_output=True, timeout=30)  # the guests outlive the agent
        if not os.environ.get("CNA_BENCH_KEEP"):
            shutil.rmtree(base, ignore_errors=True)
    for name in parts:
        out.update(_part(name, args.stats_vms))
    print(f"{args.vms} VMs ({args.running} running, paused), embedded driver:")
    for k, val in out.items():
        print(f"  {k}: {val}")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
