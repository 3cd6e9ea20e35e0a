"""compute/reservations.py's arithmetic: running and paused VMs and prepared incoming ones hold
their reservations, stopped ones and the VM itself do not, memory is checked like CPU, and a
capacity of 0 (unknown) checks nothing. The inventory is a stand-in returning VmInfo rows; the
power-on path is tested end to end in tests/e2e/test_vm_reservations.py."""

from __future__ import annotations

import asyncio

import pytest

from cna_agent.compute import state as st
from cna_agent.compute.inventory import VmInfo
from cna_agent.compute.reservations import HostCapacity, ReservationAdmission, host_memory_mib
from cna_agent.compute.spec import CpuQos, MemoryQos, VmSpec
from cna_agent.errors import ResourceExhausted


def _spec(name: str, mhz: int = 0, mib: int = 0) -> VmSpec:
    return VmSpec(name=name, uuid=f"u-{name}", vcpus=1, memory_mib=4096, cpu_qos=CpuQos(reservation_mhz=mhz),
                  memory_qos=MemoryQos(reservation_mib=mib))


class _Inventory:
    def __init__(self, *rows: tuple[VmSpec, str]) -> None:
        self.rows = rows

    async def list(self, *, states=()):
        return [VmInfo(s.uuid, s.name, True, s, state) for s, state in self.rows if not states or state in states]


def _check(admission: ReservationAdmission, spec: VmSpec, **kw) -> None:
    asyncio.run(admission.check(spec.uuid, spec, f"starting vm {spec.name!r}", **kw))


def test_memory_and_cpu_count_running_paused_and_arriving_vms_only() -> None:
    inv = _Inventory((_spec("run", 1000, 1024), st.RUNNING), (_spec("paused", 500, 512), st.PAUSED),
                     (_spec("off", 9000, 9000), st.STOPPED))
    adm = ReservationAdmission(inv, HostCapacity(cpu_mhz=2000, memory_mib=2048))
    _check(adm, _spec("new", 500, 512))  # exactly full
    with pytest.raises(ResourceExhausted) as cpu:
        _check(adm, _spec("new", 501))
    assert cpu.value.field == "spec.cpu_qos.reservation_mhz" and "only 500 of this host's 2000 MHz" in cpu.value.message
    assert "run 1000, paused 500" in cpu.value.message and "off" not in cpu.value.message
    with pytest.raises(ResourceExhausted) as mem:
        _check(adm, _spec("new", 0, 513))
    assert mem.value.field == "spec.memory_qos.reservation_mib" and mem.value.code == "RESOURCE_EXHAUSTED"
    with pytest.raises(ResourceExhausted):
        _check(adm, _spec("new", 100), arriving=[("incoming", _spec("incoming", 450))])


def test_the_vm_itself_and_an_unknown_capacity_are_not_counted() -> None:
    me = _spec("me", 1500)
    adm = ReservationAdmission(_Inventory((me, st.RUNNING)), HostCapacity(cpu_mhz=2000, memory_mib=0))
    _check(adm, me)  # a live update of a running VM does not count its old reservation twice
    _check(adm, _spec("big", 0, 10**6))  # MemTotal unreadable: memory not checked
    assert host_memory_mib() > 0
