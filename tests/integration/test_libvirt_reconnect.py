"""The agent survives a libvirtd restart: degraded while it is gone, reconnected after.

Runs against the host's real libvirtd (qemu:///system), started here if the testbed has not
started it, and left as it was found.
"""

from __future__ import annotations

import os

import pytest

from cna_agent.api import pb
from support.libvirt import start_libvirtd, stop_libvirtd
from support.operations import ok
from support.waiting import wait_for


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
        stop_libvirtd()
        wait_for(lambda: health() == pb.common_pb2.HEALTH_UNREACHABLE, 30, "the agent to notice libvirtd is gone")
        assert not hv().connected
        # Host facts still answer while the hypervisor is away: degraded, not dead.
        assert host.GetCapabilities(pb.host_pb2.GetCapabilitiesRequest(), timeout=10).topology.logical_cpus > 0
        start_libvirtd()
        wait_for(lambda: hv().connected, 60, "the agent to reconnect")
        assert health() == pb.common_pb2.HEALTH_OK

        # libvirt's domain events were registered again on the new connection: a VM started
        # and paused now is reported on the event log (a BIOS guest with nothing to boot is
        # enough to run).
        vms = pb.vm_pb2_grpc.VmServiceStub(ch)
        events = pb.events_pb2_grpc.EventServiceStub(ch)
        name = f"reconn-{os.getpid()}"

        def done(op):
            return ok(ch, op, 60, poll=True)

        def lifecycle_states(uuid: str) -> list[str]:
            got = events.ListEvents(pb.events_pb2.ListEventsRequest(types=["vm.lifecycle"], resource_id=uuid, limit=1000), timeout=10)
            return [e.attributes["state"] for e in got.events]

        spec = pb.vm_pb2.VmSpec(name=name, vcpus=1, memory_mib=64, arch=pb.common_pb2.ARCH_X86_64)
        op = done(vms.CreateVm(pb.vm_pb2.CreateVmRequest(spec=spec, start=True), timeout=60))
        created = pb.vm_pb2.Vm()
        op.response.Unpack(created)
        try:
            wait_for(lambda: "running" in lifecycle_states(created.uuid), 30, "a started event after the reconnect")
            done(vms.PauseVm(pb.vm_pb2.VmActionRequest(vm=created.uuid), timeout=30))
            wait_for(lambda: "paused" in lifecycle_states(created.uuid), 30, "a paused event after the reconnect")
        finally:
            done(vms.DeleteVm(pb.vm_pb2.DeleteVmRequest(vm=created.uuid, force=True), timeout=60))
    log = agent.log_text()
    assert "event=libvirt.connection_lost" in log
    assert log.count("event=libvirt.connected") >= 2
