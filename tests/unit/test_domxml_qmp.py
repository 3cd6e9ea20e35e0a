"""The QMP side channel in generated domains: path choice (sun_path limit), args round-trip,
GUEST_PANICKED data flattened into event attributes."""

from __future__ import annotations

import os

from cna_agent.compute import domxml as dx
from cna_agent.compute import qmp
from cna_agent.compute.render import RenderContext, build_domain
from cna_agent.compute.render import Bindings
from cna_agent.compute.sidechannel import flatten
from cna_agent.compute.spec import VmSpec

UUID = "6f1c3a52-8d0e-4b7a-9c1d-2e3f4a5b6c7d"


def test_socket_under_run_dir_when_short() -> None:
    path, short = qmp.monitor_socket_path("/run/cna-agent", UUID)
    assert not short and str(path) == f"/run/cna-agent/qmp/{UUID}.sock"


def test_deep_run_dir_falls_back_to_a_short_deterministic_hashed_path() -> None:
    deep = "/tmp/" + "d" * 80
    path, short = qmp.monitor_socket_path(deep, UUID)
    assert short and len(os.fsencode(str(path))) <= qmp.UNIX_PATH_MAX
    assert str(path).startswith(qmp.SHORT_SOCKET_ROOT + "/")
    assert qmp.monitor_socket_path(deep, UUID) == (path, True)  # found again after a restart
    other, _ = qmp.monitor_socket_path(deep + "x", UUID)
    assert other != path  # two agents never share a socket


def test_domain_carries_the_monitor_and_the_path_parses_back() -> None:
    ctx = RenderContext(host_arch="x86_64", virt_type="qemu", state_dir="/var/lib/cna-agent", run_dir="/run/cna-agent")
    spec = VmSpec(name="vm1", uuid=UUID, vcpus=1, memory_mib=128)
    xml = build_domain(spec, Bindings(), ctx).to_xml()
    assert f'xmlns:qemu="{dx.QEMU_NS}"' in xml
    args = dx.Domain.from_xml(xml).qemu_args
    assert args[0] == "-chardev" and args[2] == "-mon"
    assert qmp.path_from_args(args) == f"/run/cna-agent/qmp/{UUID}.sock"
    off = build_domain(spec, Bindings(), RenderContext(host_arch="x86_64", virt_type="qemu", state_dir="/s", run_dir="/r",
                                                       qmp_side_channel=False)).to_xml()
    assert "commandline" not in off and qmp.path_from_args(dx.Domain.from_xml(off).qemu_args) == ""


def test_guest_panicked_data_is_flattened_for_event_attributes() -> None:
    data = {"action": "pause", "info": {"type": "hyper-v", "arg1": 30, "arg2": 0}, "flags": [True]}
    assert flatten("", data, {"source": "qmp"}) == {
        "source": "qmp", "action": "pause", "info.type": "hyper-v", "info.arg1": "30", "info.arg2": "0", "flags.0": "true"}
