"""Start a real cna-agent process for a benchmark, in a private temporary directory."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def running_agent(extra_config: str = "", *, tcp: bool = False) -> Iterator[Path]:
    """Yield the unix socket path of a freshly started agent; stop it afterwards."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    base = Path(tempfile.mkdtemp(prefix="cna-bench-"))
    base.chmod(0o711)  # an unprivileged QEMU (qemu:///system) must be able to traverse it
    sock = base / "run" / "agent.sock"
    cfg = base / "agent.toml"
    cfg.write_text(
        f'[grpc]\nlisten = ""\nunix_socket = "{sock}"\n[state]\ndir = "{base / "state"}"\nrun_dir = "{base / "run"}"\n'
        f'[log]\nlevel = "warning"\n{extra_config}'
    )
    if "uri" not in extra_config:
        # Measure the agent's own embedded driver, not whatever libvirtd happens to run.
        uri = f'uri = "qemu:///embed?root={base / "state" / "libvirt"}"\n'
        text = cfg.read_text()
        text = text.replace("[libvirt]\n", "[libvirt]\n" + uri, 1) if "[libvirt]\n" in text else text + "[libvirt]\n" + uri
        cfg.write_text(text)
    script = Path(sys.executable).with_name("cna-agent")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "cna_agent.daemon"]
    if os.environ.get("CNA_BENCH_PROFILE"):
        # Where the agent's own time goes: cProfile of its event-loop thread (libvirt's work runs
        # in pool threads and is not in it), written when the agent stops.
        cmd = [sys.executable, "-m", "cProfile", "-o", os.environ["CNA_BENCH_PROFILE"], "-m", "cna_agent.daemon"]
    log = (base / "agent.log").open("wb")
    proc = subprocess.Popen([*cmd, "serve", "--config", str(cfg)], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"agent exited: {(base / 'agent.log').read_text()}")
            if time.monotonic() > deadline:
                raise RuntimeError("agent did not become ready in 120 s")
            if sock.exists():
                try:
                    with grpc.insecure_channel(f"unix:{sock}") as ch:
                        r = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=2)
                        if r.status == health_pb2.HealthCheckResponse.SERVING:
                            break
                except grpc.RpcError:
                    pass
            time.sleep(0.2)
        yield sock
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        log.close()
        if not os.environ.get("CNA_BENCH_KEEP"):
            shutil.rmtree(base, ignore_errors=True)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (/proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = (len(ordered) - 1) * pct / 100
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)
