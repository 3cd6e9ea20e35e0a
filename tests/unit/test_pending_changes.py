"""The pending-changes mark (compute/pending_changes.py) and which UpdateVm fields a running VM
cannot take now (compute/update.py), without a hypervisor; the e2e path is
tests/e2e/test_guest_hotplug.py."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from cna_agent.api import pb
from cna_agent.cli.vm_update import _summary
from cna_agent.compute.pending_changes import PendingMark, pending_fields, qemu_identity, refuse_while_pending
from cna_agent.compute.spec import VmSpec
from cna_agent.compute.update import VmUpdates
from cna_agent.errors import FailedPrecondition


def test_the_mark_round_trips_and_holds_only_for_the_process_it_was_written_for() -> None:
    me = qemu_identity(str(os.getpid()))
    assert me.startswith(f"{os.getpid()}:") and me.split(":")[1].isdigit()
    mark = PendingMark.from_xml(PendingMark(("max_vcpus", "cpu_topology"), me, 1.5).to_xml())
    assert mark == PendingMark(("max_vcpus", "cpu_topology"), me, 1.5)
    assert pending_fields(mark, me) == ("max_vcpus", "cpu_topology")
    # a later process (another start), even one that got the same pid, is another identity
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                           timeout=30).stdout.strip()
    assert qemu_identity(child) == ""  # gone
    assert pending_fields(mark, f"{os.getpid()}:1") == () and pending_fields(mark, "") == () and pending_fields(None, me) == ()
    assert qemu_identity("") == qemu_identity("x1") == ""
    assert PendingMark.from_xml("<pending fields=''/>") is None and PendingMark.from_xml("<oops") is None
    with pytest.raises(FailedPrecondition, match="max_vcpus.*restart") as err:
        refuse_while_pending(("max_vcpus",), "web", "migrate")
    assert err.value.field == "vm"
    refuse_while_pending((), "web", "migrate")


def _spec(**kw) -> VmSpec:
    return VmSpec(name="v", vcpus=2, max_vcpus=4, memory_mib=1024, max_memory_mib=2048, **kw)


def test_what_a_running_vm_cannot_take_now_is_refused_naming_it_or_returned_as_pending() -> None:
    old = _spec()
    live_only = _spec()
    live_only.vcpus, live_only.memory_mib = 4, 1536
    assert VmUpdates._not_live(old, live_only, ["vcpus", "memory_mib"], False) == []
    beyond = _spec()
    beyond.vcpus, beyond.max_vcpus, beyond.memory_mib = 6, 8, 4096
    mask = ["vcpus", "max_vcpus", "memory_mib"]
    with pytest.raises(FailedPrecondition, match="allow_pending") as err:
        VmUpdates._not_live(old, beyond, mask, False)
    assert err.value.field == "update_mask" and "max_vcpus can only change while the VM is stopped" in str(err.value)
    assert VmUpdates._not_live(old, beyond, mask, True) == ["max_vcpus", "vcpus", "memory_mib"]
    no_room = VmSpec(name="v", vcpus=1, memory_mib=512)
    grown = VmSpec(name="v", vcpus=1, memory_mib=768)
    with pytest.raises(FailedPrecondition, match="DIMM") as err:
        VmUpdates._not_live(no_room, grown, ["memory_mib"], False)
    assert err.value.field == "spec.memory_mib"


def test_the_cli_summary_says_what_applied_now_and_what_waits() -> None:
    vm = pb.vm_pb2.Vm(name="web")
    vm.status.pending_changes.append("max_vcpus")
    op = pb.operations_pb2.Operation(done=True)
    op.response.Pack(vm)
    line = _summary("web", ["vcpus", "max_vcpus"], op)
    assert line.startswith("web updated in ") and line.endswith(": vcpus now; max_vcpus at its next start"), line
