"""One VM's hung storage does not delay operations on the others.

``python -m benchmarks.isolation [--vms 4] [--rounds 6] [--clients 5]``

The hung VM: its QEMU process is stopped (SIGSTOP). To libvirt and the agent that is what a
QEMU blocked in uninterruptible I/O on a dead NFS or iSCSI path looks like (VDSM's classic
failure): its monitor never answers, so every call that needs it waits, holding whatever it
holds. While it hangs, the benchmark keeps asking for that VM's state change, diagnostics
and stats (PauseVm, GetVmDiagnostics, and the sampler's own reads every second), and
measures the other VMs' operations from ``--clients`` parallel clients, interleaved with the
same measurement while nothing hangs (the baseline, same run):

* ``get_p99_ms``: GetVm of a healthy VM; ``list_p99_ms``: ListVms;
* ``create_start_ms``: CreateVm(start) of a new VM until its operation is done, then DeleteVm;
* ``pause_resume_ms``: PauseVm + ResumeVm of a healthy running VM.

Each phase lasts at least ``--phase-s`` (longer than the agent's deadlines, so the hung VM's
calls time out inside the measurement and the threads they leave stuck in libvirt count).

``*_ratio`` is hung over baseline (1.0: no effect). ``hung_vm_calls`` says what the hung VM's
own calls returned and after how long (a clear DEADLINE_EXCEEDED or UNAVAILABLE, not a hang
of the caller). The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cna_agent  # noqa: F401  (first: turns gRPC fork support off before grpc loads)
import grpc  # noqa: E402

from benchmarks._agent import percentile
from benchmarks.scale import Agent, _ok, _spec
from cna_agent.api import pb

v = pb.vm_pb2


def _measure(sock: Path, healthy: list[str], clients: int, rounds: int, tag: str, min_s: float) -> dict[str, list[float]]:
    """Each client in turn: GetVm, ListVms, create+start+delete, pause+resume; ms each; at
    least ``rounds`` rounds and at least ``min_s`` seconds."""
    t_end = time.monotonic() + min_s
    out: dict[str, list] = {"get": [], "list": [], "create_start": [], "pause_resume": [], "errors": []}
    lock = threading.Lock()

    def client(c: int) -> None:
        with grpc.insecure_channel(f"unix:{sock}") as ch:
            stub = v_stub(ch)
            r = 0
            while r < rounds or time.monotonic() < t_end:
                r += 1
                try:
                    one_round(stub, ch, c, r)
                except (grpc.RpcError, RuntimeError) as exc:  # a healthy VM's call failed: the point of the test
                    detail = f"{exc.code().name}: {exc.details()}" if isinstance(exc, grpc.RpcError) else str(exc)
                    with lock:
                        out["errors"].append(detail[:200])

    def one_round(stub, ch, c: int, r: int) -> None:
        mine = healthy[c % len(healthy)]
        t = time.perf_counter()
        stub.GetVm(v.GetVmRequest(vm=mine), timeout=60)
        got = (time.perf_counter() - t) * 1000
        t = time.perf_counter()
        stub.ListVms(v.ListVmsRequest(status_only=True), timeout=60)
        listed = (time.perf_counter() - t) * 1000
        name = f"iso-{tag}-{c}-{r}"
        t = time.perf_counter()
        _ok(ch, stub.CreateVm(v.CreateVmRequest(spec=_spec(name), start=True), timeout=120))
        created = (time.perf_counter() - t) * 1000
        _ok(ch, stub.DeleteVm(v.DeleteVmRequest(vm=name, force=True), timeout=120))
        t = time.perf_counter()
        _ok(ch, stub.PauseVm(v.VmActionRequest(vm=mine), timeout=60))
        _ok(ch, stub.ResumeVm(v.VmActionRequest(vm=mine), timeout=60))
        paused = (time.perf_counter() - t) * 1000
        with lock:
            out["get"].append(got)
            out["list"].append(listed)
            out["create_start"].append(created)
            out["pause_resume"].append(paused)

    # One healthy VM per client for pause/resume: two clients never pause the same VM at once.
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    return out


def v_stub(ch):
    return pb.vm_pb2_grpc.VmServiceStub(ch)


def _hammer(sock: Path, victim: str, stop: threading.Event, log: list[tuple[str, str, float]]) -> None:
    """Keep asking for the hung VM, each kind of call again as soon as its last one returned:
    its state change, its diagnostics (side channel) and its state, each with a deadline."""
    with grpc.insecure_channel(f"unix:{sock}") as ch:
        stub = v_stub(ch)
        calls = {"GetVmDiagnostics": lambda: stub.GetVmDiagnostics(v.GetVmDiagnosticsRequest(vm=victim), timeout=30),
                 "PauseVm": lambda: _ok(ch, stub.PauseVm(v.VmActionRequest(vm=victim), timeout=30), timeout=90),
                 "GetVm": lambda: stub.GetVm(v.GetVmRequest(vm=victim), timeout=30)}

        def repeat(what: str) -> None:
            while not stop.is_set():
                t = time.perf_counter()
                try:
                    calls[what]()
                    result = "OK"
                except grpc.RpcError as exc:
                    result = exc.code().name
                except RuntimeError as exc:
                    result = f"failed: {str(exc)[:60]}"
                if not stop.is_set():  # a call that came back because the VM was let go says nothing
                    log.append((what, result, round((time.perf_counter() - t) * 1000)))
                time.sleep(0.5)

        threads = [threading.Thread(target=repeat, args=(what,), daemon=True) for what in calls]
        for t in threads:
            t.start()
        for t in threads:
            t.join()


def _summary(m: dict[str, list[float]]) -> dict[str, float]:
    return {"get_p99_ms": percentile(m["get"], 99), "list_p50_ms": statistics.median(m["list"]),
            "list_p99_ms": percentile(m["list"], 99),
            "create_start_ms": statistics.median(m["create_start"]), "pause_resume_ms": statistics.median(m["pause_resume"])}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.isolation")
    ap.add_argument("--vms", type=int, default=4, help="healthy running VMs")
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3, help="least measurements per client per phase")
    ap.add_argument("--phase-s", type=float, default=40.0,
                    help="least seconds per phase (longer than the agent's deadlines, so the hung VM's calls time out inside it)")
    args = ap.parse_args(argv)
    base = Path(tempfile.mkdtemp(prefix="cbi", dir="/tmp"))
    agent = Agent(base)
    import socket

    with socket.socket() as probe:  # a free port for the metrics endpoint (it starts the sampler)
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    agent.cfg.write_text(agent.cfg.read_text() + f'[stats]\ninterval_s = 1.0\n[metrics]\nlisten = "127.0.0.1:{port}"\n')
    victim_pid = 0
    try:
        agent.start()
        names = [f"iso-vm{i}" for i in range(args.vms)] + ["iso-hung"]
        with grpc.insecure_channel(f"unix:{agent.sock}") as ch:
            stub = v_stub(ch)
            for n in names:
                _ok(ch, stub.CreateVm(v.CreateVmRequest(spec=_spec(n), start=True), timeout=120))
            victim_pid = int(stub.GetVm(v.GetVmRequest(vm="iso-hung"), timeout=30).status.qemu_pid)
        healthy = names[:-1]
        phases: dict[str, list[dict[str, list[float]]]] = {"base": [], "hung": []}
        hung_log: list[tuple[str, str, float]] = []
        for half in range(2):  # base, hung, base, hung: drift on a noisy host hits both alike
            phases["base"].append(_measure(agent.sock, healthy, args.clients, args.rounds, f"b{half}", args.phase_s))
            os.kill(victim_pid, signal.SIGSTOP)
            stop = threading.Event()
            hammer = threading.Thread(target=_hammer, args=(agent.sock, "iso-hung", stop, hung_log), daemon=True)
            hammer.start()
            time.sleep(2)  # the hung VM's calls are in flight before the measurement starts
            try:
                phases["hung"].append(_measure(agent.sock, healthy, args.clients, args.rounds, f"h{half}", args.phase_s))
            finally:
                stop.set()
                os.kill(victim_pid, signal.SIGCONT)
                hammer.join(timeout=90)
        merged = {k: {m: [x for run in runs for x in run[m]] for m in runs[0]} for k, runs in phases.items()}
        errors = {k: m.pop("errors") for k, m in merged.items()}
        base_s, hung_s = _summary(merged["base"]), _summary(merged["hung"])
        outcome: dict[str, dict[str, object]] = {}
        for what, result, ms in hung_log:
            row = outcome.setdefault(what, {"calls": 0, "results": {}, "max_ms": 0})
            row["calls"] = int(row["calls"]) + 1  # type: ignore[call-overload]
            row["results"][result] = row["results"].get(result, 0) + 1  # type: ignore[index,union-attr]
            row["max_ms"] = max(int(row["max_ms"]), int(ms))  # type: ignore[call-overload]
        print(f"{args.vms} healthy running VMs, {args.clients} clients x {args.rounds} rounds x 2 per phase; "
              f"the hung VM's QEMU SIGSTOPped during 'hung'")
        for key in base_s:
            print(f"  {key:18s} base {base_s[key]:8.1f}  hung {hung_s[key]:8.1f}  ratio {hung_s[key] / max(base_s[key], 1e-6):.2f}")
        for what, row in outcome.items():
            print(f"  hung VM {what}: {row}")
        for k, e in errors.items():
            print(f"  healthy VMs' failed calls, {k}: {len(e)} {sorted(set(e))[:3]}")
        result = {"vms": args.vms, "clients": args.clients,
                  **{f"base_{k}": round(val, 1) for k, val in base_s.items()},
                  **{f"hung_{k}": round(val, 1) for k, val in hung_s.items()},
                  **{f"{k.rsplit('_', 1)[0]}_ratio": round(hung_s[k] / max(base_s[k], 1e-6), 2) for k in base_s},
                  "hung_vm_calls": outcome,
                  "healthy_errors": {k: len(e) for k, e in errors.items()},
                  "healthy_error_samples": {k: sorted(set(e))[:3] for k, e in errors.items()}}
        print(json.dumps(result))
        return 0
    finally:
        if victim_pid:
            try:
                os.kill(victim_pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        agent.stop()
        from benchmarks.stats import kill_guests

        kill_guests(str(base))
        if not os.environ.get("CNA_BENCH_KEEP"):
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
