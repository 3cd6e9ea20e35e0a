"""What happens to VMs while the agent is down, or while libvirtd restarts, reaches the VRM as
events once the agent sees libvirt again (compute/ledger.py).

Against the host's real libvirtd. The agent is killed (SIGKILL); while it is away an admin
acts with virsh: one VM is destroyed, a stopped one started, one suspended, one destroyed and
undefined. After the restart the event log holds exactly one event per change, with libvirt's
reason and the state before, a VM nobody touched has none, and a second restart with nothing
changed adds none. Then libvirtd itself is stopped, a guest's QEMU is killed meanwhile, and
libvirtd started again: after the agent reconnects, that VM's stop is an event too. Judged from
virsh's own answers and the agent's event log over gRPC.
"""

from __future__ import annotations

import os
import signal
import subprocess

import pytest

from cna_agent.api import pb
from support.libvirt import start_libvirtd, stop_libvirtd
from support.migration import qemu_pids, restart
from support.operations import ok
from support.waiting import wait_for

vm, ev = pb.vm_pb2, pb.events_pb2
pytestmark = [pytest.mark.needs_root, pytest.mark.slow]
SYSTEM = '[libvirt]\nuri = "qemu:///system"\nkeepalive_interval_s = 1.0\nreconnect_max_backoff_s = 2.0\n'


def _virsh(*args: str) -> str:
    out = subprocess.run(["virsh", "-c", "qemu:///system", *args], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, (args, out.stderr)
    return out.stdout.strip()


def _spec(name: str) -> vm.VmSpec:
    # no OS: firmware only, which is all a state change needs
    return vm.VmSpec(name=name, vcpus=1, memory_mib=64, arch=pb.common_pb2.ARCH_X86_64,
                     console=vm.ConsoleSpec(type=vm.CONSOLE_TYPE_NONE))


def _events(ch, after: int) -> list:
    return list(pb.events_pb2_grpc.EventServiceStub(ch).ListEvents(
        ev.ListEventsRequest(after_sequence=after, types=["vm."], limit=1000), timeout=30).events)


def _last(ch) -> int:
    return pb.events_pb2_grpc.EventServiceStub(ch).ListEvents(ev.ListEventsRequest(limit=1), timeout=30).last_sequence


def _drift(events: list) -> dict:
    return {e.resource_name: e for e in events if e.attributes.get("observed") or e.type == "vm.vanished"}


def test_changes_made_while_the_agent_or_libvirtd_was_away_become_events(system_libvirtd, agent_factory) -> None:
    tag = f"drift{os.getpid() % 10000}"
    names = {k: f"{tag}-{k}" for k in "abcde"}
    agent = agent_factory(tag, tcp=False, mode="system", extra_config=SYSTEM)
    try:
        with agent.channel() as ch:
            vms = pb.vm_pb2_grpc.VmServiceStub(ch)
            uuids = {k: ok(ch, vms.CreateVm(vm.CreateVmRequest(spec=_spec(n), start=k != "b"), timeout=60),
                           into=vm.Vm()).uuid for k, n in names.items()}
            # the agent has seen every VM in the state it is in (its lifecycle events are out)
            wait_for(lambda: {e.resource_id for e in _events(ch, 0) if e.type == "vm.lifecycle"} >= set(uuids.values()),
                     60, "a lifecycle event for every VM")
            before = _last(ch)

        agent.stop(signal.SIGKILL)
        _virsh("destroy", uuids["a"])
        _virsh("start", names["b"])
        _virsh("destroy", uuids["c"])
        _virsh("undefine", uuids["c"])
        _virsh("suspend", uuids["d"])

        agent = restart(agent)
        with agent.channel() as ch:
            got = _drift(_events(ch, before))
            assert set(got) == {names[k] for k in "abcd"}, [(e.type, e.resource_name, e.message) for e in got.values()]
            a, b, c, d = (got[names[k]] for k in "abcd")
            assert a.type == "vm.lifecycle" and a.attributes["observed"] == "at start", a
            assert (a.attributes["state"], a.attributes["reason"], a.attributes["previous_state"]) == \
                ("stopped", "destroyed", "running"), a
            assert b.type == "vm.lifecycle" and (b.attributes["state"], b.attributes["previous_state"]) == ("running", "stopped"), b
            assert c.type == "vm.vanished" and c.attributes["previous_state"] == "running", c
            assert d.type == "vm.lifecycle" and (d.attributes["state"], d.attributes["reason"]) == ("paused", "user"), d
            # what the agent reports now agrees with what virsh says
            listed = {v.name: v.status.state for v in pb.vm_pb2_grpc.VmServiceStub(ch).ListVms(vm.ListVmsRequest(), timeout=30).vms
                      if v.name.startswith(tag)}
            assert listed == {names["a"]: vm.VM_STATE_STOPPED, names["b"]: vm.VM_STATE_RUNNING,
                              names["d"]: vm.VM_STATE_PAUSED, names["e"]: vm.VM_STATE_RUNNING}
            assert _virsh("domstate", names["d"]) == "paused" and _virsh("domstate", names["b"]) == "running"
            last = _last(ch)

        agent = restart(agent, sig=signal.SIGTERM)  # nothing changed: nothing to report
        with agent.channel() as ch:
            assert _drift(_events(ch, last)) == {}
            last = _last(ch)

        # libvirtd away, and a guest's QEMU dies meanwhile: libvirtd finds it dead when it starts,
        # before any client listens; the agent's compare after its reconnect reports it.
        stop_libvirtd()
        for pid in qemu_pids(uuids["e"]):
            os.kill(pid, signal.SIGKILL)
        start_libvirtd()
        with agent.channel() as ch:
            e = wait_for(lambda: _drift(_events(ch, last)).get(names["e"]), 90, "the stop of e reported after the reconnect")
            assert e.type == "vm.lifecycle" and e.attributes["observed"] == "after reconnect", e
            assert (e.attributes["state"], e.attributes["previous_state"]) in (("stopped", "running"), ("crashed", "running")), e
            assert set(_drift(_events(ch, last))) == {names["e"]}
            vms = pb.vm_pb2_grpc.VmServiceStub(ch)
            for k in "abde":
                ok(ch, vms.DeleteVm(vm.DeleteVmRequest(vm=names[k], force=True), timeout=60))
    finally:
        agent.stop()
