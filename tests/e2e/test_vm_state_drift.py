"""What happens to VMs while the agent is down reaches the VRM as events when it comes back.

The agent is killed (SIGKILL); while it is away an admin acts with virsh on the same libvirt
(the embedded root, from another process): one VM is destroyed, a stopped one started, one
suspended, one destroyed and undefined. After the restart the event log holds exactly one
event per change, with libvirt's reason and the state before, and a VM nobody touched has
none; a second restart with nothing changed adds none. Judged from libvirt (virsh's own
answers) and the agent's event log over gRPC.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from cna_agent.api import pb
from support.agent import start_agent
from support.migration import restart
from support.operations import ok
from support.waiting import wait_for

vm, ev = pb.vm_pb2, pb.events_pb2
pytestmark = [pytest.mark.needs_root, pytest.mark.slow]

#: Run in a child process: the embedded driver is opened once per process, and the test
#: process must not keep the agent's root open.
VIRSH_LIKE = """
import sys, libvirt
libvirt.virEventRegisterDefaultImpl()
conn = libvirt.open(sys.argv[1])
for action in sys.argv[2:]:
    verb, uuid = action.split(":")
    dom = conn.lookupByUUIDString(uuid)
    {"destroy": dom.destroy, "start": dom.create, "suspend": dom.suspend,
     "undefine": lambda: (dom.destroy(), dom.undefine())}[verb]()
    print(verb, uuid, dom.state() if verb != "undefine" else "gone", flush=True)
conn.close()
"""


def _spec(name: str) -> vm.VmSpec:
    # no OS: firmware only, which is all a state change needs
    return vm.VmSpec(name=name, vcpus=1, memory_mib=64, arch=pb.common_pb2.ARCH_X86_64,
                     console=vm.ConsoleSpec(type=vm.CONSOLE_TYPE_NONE))


def _events(ch, after: int) -> list:
    return list(pb.events_pb2_grpc.EventServiceStub(ch).ListEvents(
        ev.ListEventsRequest(after_sequence=after, types=["vm."], limit=1000), timeout=30).events)


def test_changes_made_while_the_agent_was_down_become_events(libvirt_caps_cache) -> None:
    base = Path(tempfile.mkdtemp(prefix="cd", dir="/tmp"))
    agent = start_agent(base / "a", libvirt_caps_cache, tcp=False)
    try:
        with agent.channel() as ch:
            vms = pb.vm_pb2_grpc.VmServiceStub(ch)
            uuids = {}
            for name, start in (("drift-a", True), ("drift-b", False), ("drift-c", True), ("drift-d", True),
                                ("drift-e", True)):
                uuids[name] = ok(ch, vms.CreateVm(vm.CreateVmRequest(spec=_spec(name), start=start), timeout=60),
                                 into=vm.Vm()).uuid
            # the agent has seen every VM in the state it is in (its lifecycle events are out)
            wait_for(lambda: {e.resource_id for e in _events(ch, 0) if e.type == "vm.lifecycle"} >= set(uuids.values()),
                     60, "a lifecycle event for every VM")
            before = pb.events_pb2_grpc.EventServiceStub(ch).ListEvents(ev.ListEventsRequest(limit=1), timeout=30).last_sequence

        agent.stop(9)
        uri = f"qemu:///embed?root={base / 'a' / 'state' / 'libvirt'}"
        out = subprocess.run([sys.executable, "-c", VIRSH_LIKE, uri, f"destroy:{uuids['drift-a']}", f"start:{uuids['drift-b']}",
                              f"undefine:{uuids['drift-c']}", f"suspend:{uuids['drift-d']}"],
                             capture_output=True, text=True, timeout=180)
        assert out.returncode == 0, out.stderr

        agent = restart(agent)
        with agent.channel() as ch:
            after = _events(ch, before)
            drift = {e.resource_id: e for e in after if e.attributes.get("observed") == "at start" or e.type == "vm.vanished"}
            by_name = {e.resource_name: e for e in drift.values()}
            assert set(by_name) == {"drift-a", "drift-b", "drift-c", "drift-d"}, [(e.type, e.resource_name, e.message) for e in after]
            a, b, c, d = (by_name[n] for n in ("drift-a", "drift-b", "drift-c", "drift-d"))
            assert a.type == "vm.lifecycle" and {"state": "stopped", "reason": "destroyed",
                                                  "previous_state": "running"}.items() <= dict(a.attributes).items(), a
            assert b.type == "vm.lifecycle" and b.attributes["state"] == "running" and b.attributes["previous_state"] == "stopped", b
            assert c.type == "vm.vanished" and c.attributes["previous_state"] == "running", c
            assert d.type == "vm.lifecycle" and d.attributes["state"] == "paused" and d.attributes["reason"] == "user", d
            # what the agent reports now agrees with libvirt
            states = {v.name: v.status.state for v in pb.vm_pb2_grpc.VmServiceStub(ch).ListVms(vm.ListVmsRequest(), timeout=30).vms}
            assert states == {"drift-a": vm.VM_STATE_STOPPED, "drift-b": vm.VM_STATE_RUNNING, "drift-d": vm.VM_STATE_PAUSED,
                              "drift-e": vm.VM_STATE_RUNNING}
            last = pb.events_pb2_grpc.EventServiceStub(ch).ListEvents(ev.ListEventsRequest(limit=1), timeout=30).last_sequence

        agent = restart(agent, sig=15)  # nothing changed: nothing to report
        with agent.channel() as ch:
            again = [e for e in _events(ch, last) if e.attributes.get("observed") or e.type == "vm.vanished"]
            assert again == [], [(e.type, e.resource_name, e.message) for e in again]
            vms = pb.vm_pb2_grpc.VmServiceStub(ch)
            for name in ("drift-a", "drift-b", "drift-d", "drift-e"):
                ok(ch, vms.DeleteVm(vm.DeleteVmRequest(vm=name, force=True), timeout=60))
    finally:
        agent.stop()
        shutil.rmtree(base, ignore_errors=True)
