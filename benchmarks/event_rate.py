"""Lifecycle events at a fixed rate from libvirt, through the agent, to 10 watchers and the VRM.

``python -m benchmarks.event_rate [--vms 1000] [--rate 1000] [--seconds 10] [--clients 10]``

Why its own benchmark: in benchmarks.scale the events come from the agent's own PauseVm and
ResumeVm on real QEMU, 35-100 per second on this machine: the agent's operations pace them,
so its event path is never asked for 1,000 per second. Here the events come from outside the
agent, as on a host where libvirt, an admin's virsh or QEMU itself changes domains:

* a libvirtd of the testbed (tools/testbed.py's namespace host "a") serving libvirt's test
  driver (``test+tcp://.../default``: real libvirtd, real remote protocol and event delivery,
  domains without a QEMU behind them, so 1,000 of them fit and a state change costs
  libvirtd microseconds);
* the real agent on that URI with its VRM link to tools/vrm-sim; ``--vms`` VMs made with
  CreateVm and StartVm through it (managed, with its metadata);
* a source process suspending and resuming them directly on libvirt at ``--rate`` calls per
  second for ``--seconds`` (one lifecycle event per call), paced by wall clock;
* ``--clients`` watcher processes with a WatchEvents stream each.

Measured: ``event_p99_ms`` (the issue's figure: libvirt's callback in the agent to each
watcher's receipt), ``event_e2e_p99_ms`` (from the source's call to the receipt: also
libvirtd's delivery to the agent), ``vrm_event_p99_ms`` (callback to vrm-sim storing it),
``events_lost`` (calls whose event some watcher never got), ``vrm_events_lost``,
``event_rate_per_s`` (achieved by the source) and the CPU of each process during the burst
(``cpu_pct_agent``, ``cpu_pct_libvirtd`` ..., of one core), and the agent's CPU over the
10 s before it (``cpu_pct_agent_idle``). The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))  # the test support: the testbed's namespace hosts

import cna_agent  # noqa: E402,F401  (first: turns gRPC fork support off before grpc loads)
import grpc  # noqa: E402

from benchmarks._agent import cpu_seconds, percentile, running_agent  # noqa: E402
from benchmarks.scale import _ok, _spec  # noqa: E402
from cna_agent.api import pb  # noqa: E402
from support.agent import free_port  # noqa: E402
from support.hosts import testbed_module  # noqa: E402

v = pb.vm_pb2
VRM_SIM = REPO / "tools" / "vrm-sim"
#: The agent's CPU with no events, over one stats interval (its sampler and VRM heartbeat of
#: the same VMs): the part of the burst's figure that is not the events'.
IDLE_S = 10


def _peer_pid(sock: Path) -> int:
    """The agent's pid: the process serving its socket (SO_PEERCRED)."""
    s = socket.socket(socket.AF_UNIX)
    try:
        s.connect(str(sock))
        creds = s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        return struct.unpack("3i", creds)[0]
    finally:
        s.close()


def _make_vms(sock: Path, names: list[str], clients: int = 8) -> None:
    chans = [grpc.insecure_channel(f"unix:{sock}") for _ in range(clients)]

    def one(i_name: tuple[int, str]) -> None:
        i, name = i_name
        ch = chans[i % clients]
        stub = pb.vm_pb2_grpc.VmServiceStub(ch)
        _ok(ch, stub.CreateVm(v.CreateVmRequest(spec=_spec(name)), timeout=120), timeout=120)
        _ok(ch, stub.StartVm(v.VmActionRequest(vm=name), timeout=120), timeout=120)

    try:
        with ThreadPoolExecutor(clients) as pool:
            list(pool.map(one, enumerate(names)))
    finally:
        for c in chans:
            c.close()


def _match(calls: list[list], seen: list[list]) -> tuple[list[float], list[float], int]:
    """Pair each call with the event it caused (per domain and event kind, in order): the
    delays from the agent's callback and from the call, in ms, and the calls left unpaired."""
    want: dict[tuple[str, str], list[float]] = defaultdict(list)
    for name, event, start, _end in calls:
        want[(name, event)].append(start)
    got: dict[tuple[str, str], list[tuple[float, float]]] = defaultdict(list)
    for name, event, received, when in seen:
        got[(name, event)].append((received, when))
    from_cb, from_call, lost = [], [], 0
    for key, starts in want.items():
        events = got.get(key, [])
        lost += max(0, len(starts) - len(events))
        for start, (received, when) in zip(starts, events):
            from_cb.append((received - when) * 1000)
            from_call.append((received - start) * 1000)
    return from_cb, from_call, lost


def _vrm_seen(db: Path, names: set[str], since: float) -> list[list]:
    import sqlite3

    con = sqlite3.connect(db, timeout=30)
    try:
        rows = con.execute("SELECT resource_name, attributes, received_at, time FROM events "
                           "WHERE type = 'vm.lifecycle' AND time >= ? ORDER BY sequence", (since,)).fetchall()
    finally:
        con.close()
    return [[n, json.loads(a).get("event", ""), r, t] for n, a, r, t in rows if n in names]


def _vrm_count(db: Path, since: float) -> int:
    import sqlite3

    con = sqlite3.connect(db, timeout=30)
    try:
        return con.execute("SELECT COUNT(*) FROM events WHERE type = 'vm.lifecycle' AND time >= ?", (since,)).fetchone()[0]
    except sqlite3.OperationalError:
        return 0
    finally:
        con.close()


def _burst(rpc: str, sock: Path, uri: str, names_file: Path, names: list[str], pids: dict[str, list[int]],
           vrm_db: Path, base: Path, args: argparse.Namespace) -> dict[str, object]:
    """One burst of ``args.rate`` events a second for ``args.seconds``, watched by
    ``args.clients`` processes on ``rpc``: the figures, named for WatchEvents (the rest say
    which RPC they were measured on)."""
    tag = base / rpc
    tag.mkdir()
    watchers = [subprocess.Popen([sys.executable, "-m", "benchmarks._event_load", "watch", "--sock", str(sock),
                                  "--clients", "1", "--rpc", rpc, "--out", str(tag / f"seen{i}.json")],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=str(REPO))
                for i in range(args.clients)]
    try:
        for w in watchers:
            assert w.stdout is not None
            if w.stdout.readline().strip() != "ready":
                raise RuntimeError("a watcher did not open its stream")
        since = time.time()
        pids = {**pids, "watchers": [w.pid for w in watchers]}
        cpu0 = {k: sum(map(cpu_seconds, ps)) for k, ps in pids.items()}
        w0 = time.perf_counter()
        src = subprocess.run([sys.executable, "-m", "benchmarks._event_load", "source", "--uri", uri,
                              "--names", str(names_file), "--rate", str(args.rate), "--seconds", str(args.seconds),
                              "--out", str(tag / "calls.json")], cwd=str(REPO), capture_output=True, text=True,
                             timeout=args.seconds * 10 + 120)
        wall = time.perf_counter() - w0
        cpu = {k: sum(map(cpu_seconds, ps)) - cpu0[k] for k, ps in pids.items()}
        if src.returncode != 0:
            raise RuntimeError(f"the event source exited {src.returncode}: {src.stderr[-2000:]}")
        made = json.loads((tag / "calls.json").read_text())
        calls = made["calls"]
        for w in watchers:
            assert w.stdin is not None
            w.stdin.write(f"{len(calls)}\n")
            w.stdin.flush()
        seen = []
        for i, w in enumerate(watchers):
            w.wait(timeout=120)
            seen += json.loads((tag / f"seen{i}.json").read_text())
    finally:
        for w in watchers:
            if w.poll() is None:
                w.kill()
                w.wait(timeout=10)
    deadline = time.monotonic() + 60
    while _vrm_count(vrm_db, since) < len(calls) and time.monotonic() < deadline:
        time.sleep(0.2)
    cb: list[float] = []
    e2e: list[float] = []
    lost = 0
    for stream in seen:
        a, b, n = _match(calls, stream)
        cb += a
        e2e += b
        lost += n
    vcb, ve2e, vlost = _match(calls, _vrm_seen(vrm_db, set(names), since))
    got: dict[str, object] = {
        "event_rate_per_s": round(made["rate"], 1), "events_made": len(calls), "source_errors": made["error_count"],
        "event_p50_ms": round(statistics.median(cb), 1) if cb else None,
        "event_p99_ms": round(percentile(cb, 99), 1), "event_e2e_p99_ms": round(percentile(e2e, 99), 1),
        "events_lost": lost, "events_expected": len(calls) * args.clients,
        "vrm_event_p99_ms": round(percentile(vcb, 99), 1), "vrm_event_e2e_p99_ms": round(percentile(ve2e, 99), 1),
        "vrm_events_lost": vlost,
        **{f"cpu_pct_{k}": round(c / wall * 100, 1) for k, c in cpu.items()},
    }
    return got if rpc == "WatchEvents" else {f"batches_{k}": val for k, val in got.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vms", type=int, default=1000)
    ap.add_argument("--rate", type=float, default=1000.0, help="lifecycle events per second")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--clients", type=int, default=10, help="watcher processes")
    ap.add_argument("--rpcs", default="WatchEvents,WatchEventBatches", help="the watch RPCs to burst on, one burst each")
    args = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="cna-bench-events-", dir="/tmp"))
    base.chmod(0o711)
    tb = testbed_module().Testbed(base / "hosts")
    out: dict[str, object] = {"vms": args.vms, "rate_asked": args.rate, "seconds": args.seconds, "clients": args.clients,
                              "driver": "test (libvirtd)"}
    vrm = None
    try:
        host = tb.hosts_up({"a": {}})["a"]
        uri = f"test+tcp://127.0.0.1:{host.tcp_port}/default"
        vport = free_port()
        vrm_db = base / "vrm.db"
        vrm = subprocess.Popen([sys.executable, str(VRM_SIM), "serve", "--listen", f"127.0.0.1:{vport}", "--db", str(vrm_db)],
                               stdout=(base / "vrm-sim.log").open("wb"), stderr=subprocess.STDOUT)
        extra = (f'[libvirt]\nvirt_type = "qemu"\nuri = "{uri}"\n'
                 f'[vrm]\naddress = "127.0.0.1:{vport}"\nheartbeat_interval_s = 10.0\n')
        with running_agent(extra) as sock:
            agent_pid = _peer_pid(sock)
            names = [f"e{i:04d}" for i in range(args.vms)]
            t0 = time.perf_counter()
            _make_vms(sock, names)
            out["create_start_s"] = round(time.perf_counter() - t0, 1)
            time.sleep(3)  # the start events and the first VRM batches settle
            cpu0 = cpu_seconds(agent_pid)
            time.sleep(IDLE_S)
            out["cpu_pct_agent_idle"] = round((cpu_seconds(agent_pid) - cpu0) / IDLE_S * 100, 1)
            names_file = base / "names"
            names_file.write_text("\n".join(names))
            pids = {"agent": [agent_pid], "libvirtd": [host.libvirtd_pid], "vrm_sim": [vrm.pid]}
            for rpc in [r for r in args.rpcs.split(",") if r]:
                out.update(_burst(rpc, sock, uri, names_file, names, pids, vrm_db, base, args))
    finally:
        if vrm is not None and vrm.poll() is None:
            vrm.kill()
            vrm.wait(timeout=10)
        tb.hosts_down()
        if not os.environ.get("CNA_BENCH_KEEP"):
            shutil.rmtree(base, ignore_errors=True)
    print(f"{args.vms} VMs on libvirt's test driver in a libvirtd, {args.rate:g} events/s for {args.seconds:g} s:")
    for k, val in out.items():
        print(f"  {k}: {val}")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
