"""The operation-result contract (api/results.py): every operation kind the agent submits has
a declared response type, a result of another type is refused (the operation would fail
INTERNAL rather than hand the caller something else), and None is google.protobuf.Empty."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from cna_agent.api.results import OPERATION_RESPONSES, encode_result
from cna_agent.compute.inventory import VmInfo
from cna_agent.contracts import VmNic

SRC = Path(__file__).resolve().parents[2] / "cna_agent"
#: An operation is started by a call naming its kind as a string literal right after the call's
#: opening parenthesis (runner.submit / VmOps.submit / the lifecycle's _simple and the
#: network/storage submit helpers).
KIND = re.compile(r"(?:submit|_simple)\(\s*(?:ref,\s*)?\"([a-z_]+\.[a-z_.]+)\"")


def _submitted_kinds() -> set[str]:
    return {m.group(1) for f in SRC.rglob("*.py") for m in KIND.finditer(f.read_text())}


def test_every_submitted_kind_has_a_declared_response_and_no_other_is_declared():
    kinds = _submitted_kinds()
    assert len(kinds) >= 25, sorted(kinds)  # the scan itself works
    assert kinds == set(OPERATION_RESPONSES), (kinds ^ set(OPERATION_RESPONSES))


def test_results_are_encoded_as_declared_and_a_wrong_type_is_refused():
    name, data = encode_result("vm.delete", None)
    assert (name, data) == ("google.protobuf.Empty", b"")
    vm = VmInfo(uuid="6f1c3a52-8d0e-4b7a-9c1d-2e3f4a5b6c7d", name="vm1", managed=True, spec=None)
    assert encode_result("vm.start", vm)[0] == "cna.v1.Vm"
    with pytest.raises(TypeError, match="vm.start must finish with cna.v1.Vm, not google.protobuf.Empty"):
        encode_result("vm.start", None)
    with pytest.raises(TypeError, match="network.nic.attach must finish with cna.v1.Vif, not cna.v1.Vm"):
        encode_result("network.nic.attach", vm)
    assert encode_result("network.nic.attach", VmNic(vm.uuid, "vm1", "52:54:00:00:00:01", True))[0] == "cna.v1.Vif"
    with pytest.raises(TypeError, match="no declared response type"):
        encode_result("vm.teleport", None)
