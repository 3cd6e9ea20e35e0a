"""The real ``cna-agent serve`` process, as e2e and integration tests start it.

Why a process and not the service objects: these tests check what the VRM sees (config file,
start-up, gRPC on the unix socket and TCP, signals, restart adoption), so they run the console
script systemd would run. Each agent gets its own state and run directories and its own
embedded libvirt root, so tests never see each other's guests. The fixtures built on this
(``agent_factory``, ``agent``, ``vm_agent_factory``) live in the conftest.py files.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the kernel picked it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def agent_command() -> list[str]:
    """The installed console script next to this interpreter (what systemd would run)."""
    script = Path(sys.executable).with_name("cna-agent")
    return [str(script)] if script.exists() else [sys.executable, "-m", "cna_agent.daemon"]


@dataclass
class AgentProcess:
    dir: Path
    config: Path
    socket: Path
    tcp_port: int | None
    proc: subprocess.Popen
    log: Path
    extra: dict = field(default_factory=dict)

    def channel(self):
        import grpc

        return grpc.insecure_channel(f"unix:{self.socket}")

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        return self.proc.returncode


#: Every agent started in this test process, so leftover guests can be cleaned up.
STARTED: list["AgentProcess"] = []


def kill_guests_of(agent: "AgentProcess") -> int:
    """SIGKILL QEMU processes running from ``agent``'s state directory.

    Guests outlive the agent by design (KillMode=process; adoption after restart), so a test
    that starts VMs leaves them running unless someone destroys them; on a 2-core machine a
    few idle TCG guests slow everything after them.
    """
    marker = str(agent.dir / "state").encode()
    killed = 0
    for proc_dir in Path("/proc").iterdir():
        if not proc_dir.name.isdigit():
            continue
        try:
            cmdline = (proc_dir / "cmdline").read_bytes()
        except OSError:
            continue
        if cmdline.startswith(b"/usr/bin/qemu-system") or b"qemu-system-" in cmdline.split(b"\0", 1)[0]:
            if marker in cmdline:
                try:
                    os.kill(int(proc_dir.name), signal.SIGKILL)
                    killed += 1
                except ProcessLookupError:
                    pass
    return killed


def delete_vms_and_stop(agent: "AgentProcess | None") -> None:
    """A fixture's teardown: DeleteVm (force) of every VM the agent holds, then stop it.

    Through the agent, so its own clean-up (disks, seeds, NVRAM, TPM state) runs as in
    production; an agent that is gone or stuck is only stopped, and its guests are killed by
    the autouse fixture that calls :func:`kill_guests_of`."""
    if agent is None:
        return
    import grpc

    from cna_agent.api import pb
    from support.operations import wait

    vm = pb.vm_pb2
    try:
        with agent.channel() as ch:
            vms = pb.vm_pb2_grpc.VmServiceStub(ch)
            for v in vms.ListVms(vm.ListVmsRequest(status_only=True), timeout=30).vms:
                wait(ch, vms.DeleteVm(vm.DeleteVmRequest(vm=v.uuid, force=True), timeout=60), timeout=60)
    except (grpc.RpcError, AssertionError):
        pass
    agent.stop()


#: The two ways the agent drives QEMU in these tests: libvirt's embedded driver inside the agent
#: (QEMU runs as root), and the host's libvirtd (``qemu:///system``: QEMU runs as its own
#: unprivileged user, libvirt relabels what it opens), the way production hosts run.
MODES = ("embedded", "system")


def remove_system_domains(agent: "AgentProcess") -> int:
    """Destroy and undefine the host libvirtd's domains that belong to ``agent`` (their XML
    names its directory: serial log, side-channel socket, NVRAM), so the next test's agent on the
    same libvirtd adopts nothing of this one's."""
    if agent.extra.get("mode") != "system":
        return 0
    import libvirt

    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    removed = 0
    try:
        conn = libvirt.open("qemu:///system")
    except libvirt.libvirtError:
        return 0  # libvirtd is down: the system_libvirtd fixture removed them while it answered
    try:
        for dom in conn.listAllDomains():
            try:
                if str(agent.dir) not in dom.XMLDesc(0):
                    continue
                if dom.isActive():
                    dom.destroy()
                if dom.isPersistent():
                    dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_NVRAM | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
                                      | libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA)
                removed += 1
            except libvirt.libvirtError:
                continue
    finally:
        conn.close()
    return removed


def write_config(base: Path, *, tcp_port: int | None, extra: str = "", mode: str = "embedded") -> tuple[Path, Path]:
    state = base / "state"
    run = base / "run"
    sock = run / "cna-agent.sock"
    cfg = base / "agent.toml"
    listen = f"127.0.0.1:{tcp_port}" if tcp_port else ""
    # Each test agent gets its own embedded libvirt (isolated guests and state), even when a
    # libvirtd runs on the machine and "auto" would pick qemu:///system.
    uri = "qemu:///system" if mode == "system" else f"qemu:///embed?root={state / 'libvirt'}"
    libvirt = "" if "[libvirt]" in extra else f'[libvirt]\nuri = "{uri}"\n'
    cfg.write_text(
        f'[grpc]\nlisten = "{listen}"\nunix_socket = "{sock}"\n'
        f'[state]\ndir = "{state}"\nrun_dir = "{run}"\n' + libvirt + extra
    )
    return cfg, sock


def start_agent(base: Path, caps_cache: Path | None, *, tcp: bool = True, extra_config: str = "",
                config: Path | None = None, wait: bool = True, env: dict | None = None,
                mode: str = "embedded") -> AgentProcess:
    """``mode`` "system" points the agent at the host's libvirtd (the caller starts it: the
    ``system_libvirtd`` fixture); QEMU then runs unprivileged, so ``base`` and the directory it
    sits in are opened to traversal (mkdtemp makes them 0700), as an admin's /var/lib is."""
    assert mode in MODES, mode
    base.mkdir(parents=True, exist_ok=True)
    if mode == "system":
        for d in (base.parent, base):
            if d != Path("/tmp"):
                d.chmod(d.stat().st_mode & 0o7777 | 0o711)
    port = free_port() if tcp else None
    if config is None:
        config, sock = write_config(base, tcp_port=port, extra=extra_config, mode=mode)
    else:
        sock = base / "run" / "cna-agent.sock"
    if caps_cache is not None and mode == "embedded":
        dest = base / "state" / "libvirt" / "cache" / "qemu" / "capabilities"
        if not dest.exists():
            shutil.copytree(caps_cache, dest)
    log = base / "agent.log"
    logfh = log.open("wb")
    proc = subprocess.Popen([*agent_command(), "serve", "--config", str(config)], stdout=logfh, stderr=subprocess.STDOUT,
                            cwd=base, env={**os.environ, **(env or {})})
    agent = AgentProcess(base, config, sock, port, proc, log, extra={"mode": mode})
    STARTED.append(agent)
    if wait:
        wait_ready(agent)
    return agent


def wait_ready(agent: AgentProcess, timeout: float = 90) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if agent.proc.poll() is not None:
            raise AssertionError(f"agent exited with {agent.proc.returncode}:\n{agent.log_text()}")
        if agent.socket.exists():
            try:
                with agent.channel() as ch:
                    resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
                    if resp.status == health_pb2.HealthCheckResponse.SERVING:
                        return
            except grpc.RpcError:
                pass
        time.sleep(0.2)
    agent.stop(signal.SIGKILL)
    raise AssertionError(f"agent not ready within {timeout}s:\n{agent.log_text()}")
