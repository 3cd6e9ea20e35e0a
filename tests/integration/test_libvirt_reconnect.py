"""The agent survives a libvirtd restart: degraded while it is gone, reconnected after.

Runs against the host's real libvirtd (qemu:///system), started here if the testbed has not
started it, and left as it was found.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from cna_agent.api import pb
from support import wait_operation

SOCK = Path("/run/libvirt/libvirt-sock")
PIDFILE = Path("/run/libvirtd.pid")


def _libvirtd_answers() -> bool:
    if not SOCK.exists():
        return False
    out = subprocess.run(["virsh", "-c", "qemu:///system", "version"], capture_output=True, timeout=30)
    return out.returncode == 0


def _start_libvirtd() -> None:
    subprocess.run(["virtlogd", "-d"], capture_output=True, timeout=30)
    out = subprocess.run(["libvirtd", "-d"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    deadline = time.monotonic() + 30
    while not _libvirtd_answers():
        assert time.monotonic() < deadline, "libvirtd did not come up"
        time.sleep(0.3)


def _stop_libvirtd() -> None:
    pid = int(PIDFILE.read_text().strip())
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 30
    while Path(f"/proc/{pid}").exists():
        assert time.monotonic() < deadline, "libvirtd did not stop"
        time.sleep(0.2)


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.3)


@pytest.fixture
def system_libvirtd():
    if not Path("/usr/sbin/libvirtd").exists():
        pytest.fail("libvirtd is not installed: run tools/setup.sh")
    was_running = _libvirtd_answers()
    if not was_running:
        _start_libvirtd()
    yield
    if was_running and not _libvirtd_answers():
        _start_libvirtd()
    elif not was_running and _libvirtd_answers():
        _stop_libvirtd()


@pytest.mark.slow
def test_agent_reports_degraded_then_reconnects_after_libvirtd_restart(system_libvirtd, agent_factory):
    agent = agent_factory("node", tcp=False, extra_config='[libvirt]\nuri = "qemu:///system"\nkeepalive_interval_s = 1.0\nreconnect_max_backoff_s = 2.0\n')
    with agent.channel() as ch:
        host = pb.host_pb2_grpc.HostServiceStub(ch)

        def hv():
            return host.GetCapabilities(pb.host_pb2.GetCapabilitiesRequest(), timeout=10).hypervisor

        def health():
            return host.GetStats(pb.host_pb2.GetStatsRequest(), timeout=10).hypervisor_health

        assert hv().connected and hv().mode == "system"
        assert health() == pb.common_pb2.HEALTH_OK
        _stop_libvirtd()
        _wait_for(lambda: health() == pb.common_pb2.HEALTH_UNREACHABLE, 30, "the agent to notice libvirtd is gone")
        assert not hv().connected
        # Host facts still answer while the hypervisor is away: degraded, not dead.
        assert host.GetCapabilities(pb.host_pb2.GetCapabilitiesRequest(), timeout=10).topology.logical_cpus > 0
        _start_libvirtd()
        _wait_for(lambda: hv().connected, 60, "the agent to reconnect")
        assert health() == pb.common_pb2.HEALTH_OK

        # libvirt's domain events were registered again on the new connection: a VM started
        # and paused now is reported on the event log (a BIOS guest with nothing to boot is
        # enough to run).
        vms = pb.vm_pb2_grpc.VmServiceStub(ch)
        events = pb.events_pb2_grpc.EventServiceStub(ch)
        name = f"reconn-{os.getpid()}"

        def done(op):
            return wait_operation(ch, op, 60)

        def lifecycle_states(uuid: str) -> list[str]:
            got = events.ListEvents(pb.events_pb2.ListEventsRequest(types=["vm.lifecycle"], resource_id=uuid, limit=1000), timeout=10)
            return [e.attributes["state"] for e in got.events]

        spec = pb.vm_pb2.VmSpec(name=name, vcpus=1, memory_mib=64, arch=pb.common_pb2.ARCH_X86_64)
        op = done(vms.CreateVm(pb.vm_pb2.CreateVmRequest(spec=spec, start=True), timeout=60))
        created = pb.vm_pb2.Vm()
        op.response.Unpack(created)
        try:
            _wait_for(lambda: "running" in lifecycle_states(created.uuid), 30, "a started event after the reconnect")
            done(vms.PauseVm(pb.vm_pb2.VmActionRequest(vm=created.uuid), timeout=30))
            _wait_for(lambda: "paused" in lifecycle_states(created.uuid), 30, "a paused event after the reconnect")
        finally:
            done(vms.DeleteVm(pb.vm_pb2.DeleteVmRequest(vm=created.uuid, force=True), timeout=60))
    log = agent.log_text()
    assert "event=libvirt.connection_lost" in log
    assert log.count("event=libvirt.connected") >= 2
