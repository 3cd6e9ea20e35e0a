"""Spec validation: each bad field is refused with INVALID_ARGUMENT naming it."""

from __future__ import annotations

import pytest

from cna_agent.compute.spec import BootSpec, ConsoleSpec, CpuTopology, DiskSpec, NicSpec, VmSpec
from cna_agent.compute.spec_validation import ValidationContext, validate
from cna_agent.errors import InvalidArgument

CTX = ValidationContext(host_arch="x86_64", virt_type="qemu", host_cpus=2)


def good(**kw) -> VmSpec:
    spec = VmSpec(name="vm-1", vcpus=2, memory_mib=256)
    for k, v in kw.items():
        setattr(spec, k, v)
    return spec


def test_good_spec_passes() -> None:
    validate(good(), CTX)
    validate(good(arch="aarch64", numa_cells=2, boot=BootSpec(kernel="/k")), CTX)


@pytest.mark.parametrize("changes, field", [
    ({"name": ""}, "spec.name"),
    ({"name": "a/b"}, "spec.name"),
    ({"name": "a<b"}, "spec.name"),
    ({"name": ".hidden"}, "spec.name"),
    ({"name": "-x"}, "spec.name"),
    ({"name": "x" * 65}, "spec.name"),
    ({"uuid": "not-a-uuid"}, "spec.uuid"),
    ({"vcpus": 0}, "spec.vcpus"),
    ({"vcpus": 10_000}, "spec.vcpus"),
    ({"memory_mib": 0}, "spec.memory_mib"),
    ({"memory_mib": 8}, "spec.memory_mib"),
    ({"memory_mib": 1 << 40}, "spec.memory_mib"),
    ({"os_family": "<unknown 99>"}, "spec.os_family"),
    ({"firmware": "coreboot"}, "spec.firmware"),
    ({"max_vcpus": 1}, "spec.max_vcpus"),
    ({"cpu_topology": CpuTopology(sockets=1, cores=3, threads=1)}, "spec.cpu_topology"),
    ({"cpu_mode": "host-passthrough"}, "spec.cpu_mode"),
    ({"console": ConsoleSpec(password="123456789")}, "spec.console.password"),
    ({"console": ConsoleSpec(listen="example.com")}, "spec.console.listen"),
    ({"arch": "aarch64", "firmware": "bios"}, "spec.firmware"),
    ({"arch": "aarch64", "machine_type": "q35"}, "spec.machine_type"),
    ({"arch": "aarch64", "watchdog": True}, "spec.watchdog"),
    ({"arch": "aarch64", "os_family": "windows"}, "spec.os_family"),
    ({"machine_type": "virt"}, "spec.machine_type"),
    ({"disks": [DiskSpec(volume="a/b", target="vda"), DiskSpec(volume="a/c", target="vda")]}, "spec.disks[1].target"),
    ({"disks": [DiskSpec(volume="a/b", boot_order=1), DiskSpec(volume="a/c", boot_order=1)]}, "spec.disks[1].boot_order"),
    ({"disks": [DiskSpec(volume="a/../../etc/shadow")]}, "spec.disks[0].volume"),
    ({"disks": [DiskSpec()]}, "spec.disks[0].volume"),
    ({"disks": [DiskSpec(volume="a/b", bus="ide")]}, "spec.disks[0].bus"),
    ({"disks": [DiskSpec(volume="a/b", target="sda")]}, "spec.disks[0].target"),
    ({"nics": [NicSpec(port_group="pg", mac="01:00:00:00:00:01")]}, "spec.nics[0].mac"),
    ({"nics": [NicSpec(port_group="")]}, "spec.nics[0].port_group"),
    ({"boot": BootSpec(initrd="/i")}, "spec.boot.kernel"),
    ({"numa_cells": 3}, "spec.numa_cells"),
    ({"labels": {"bad key!": "x"}}, "spec.labels['bad key!']"),
])
def test_bad_field_is_named(changes: dict, field: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        validate(good(**changes), CTX)
    assert err.value.field == field, err.value.message


def test_spec_json_round_trip() -> None:
    spec = good(disks=[DiskSpec(volume="a/b")], nics=[NicSpec(port_group="pg")], labels={"k": "v"})
    assert VmSpec.from_json(spec.to_json()) == spec
    # unknown keys written by a newer agent are ignored
    assert VmSpec.from_dict({**spec.to_dict(), "future": 1}) == spec


# -- hostile values found by the API sweep (issue 21): one validator per kind of value ------------

from cna_agent.compute.spec import IoQos, LunSource
from cna_agent.compute.spec_validation import check_io_qos  # noqa: E402
from cna_agent.contracts import Bandwidth  # noqa: E402


@pytest.mark.parametrize("disks, field", [
    ([DiskSpec(volume="ds/a.qcow2"), DiskSpec(volume="ds/a.qcow2")], "spec.disks[1].volume"),
    ([DiskSpec(volume="ds/a.qcow2"), DiskSpec(volume="ds/b.qcow2"), DiskSpec(volume="ds/a.qcow2", shareable=True)],
     "spec.disks[2].volume"),
    ([DiskSpec(lun=LunSource("san", "iqn.x:t/1")), DiskSpec(lun=LunSource("san", "iqn.x:t/1"))], "spec.disks[1].lun"),
])
def test_a_volume_or_lun_is_attached_once(disks, field) -> None:
    with pytest.raises(InvalidArgument) as err:
        validate(good(disks=disks), CTX)
    assert err.value.field == field and "also used by spec.disks[0]" in err.value.message


@pytest.mark.parametrize("serial", ["-rf", "--help", ".", "..", "-", "a b", "x" * 21, "ser;ial"])
def test_disk_serials_are_names(serial) -> None:
    with pytest.raises(InvalidArgument) as err:
        validate(good(disks=[DiskSpec(volume="ds/a.qcow2", serial=serial)]), CTX)
    assert err.value.field == "spec.disks[0].serial"


def test_good_serials_pass() -> None:
    validate(good(disks=[DiskSpec(volume="ds/a.qcow2", serial="cna-state"), DiskSpec(volume="ds/b.raw", serial="_2.x")]), CTX)


@pytest.mark.parametrize("qos, field", [
    (IoQos(total_bytes_sec=1), "qos.total_bytes_sec"),
    (IoQos(read_bytes_sec=(1 << 20) - 1), "qos.read_bytes_sec"),
    (IoQos(write_iops_sec=1), "qos.write_iops_sec"),
    (IoQos(total_iops_sec=1 << 60), "qos.total_iops_sec"),
    (IoQos(total_bytes_sec=-5), "qos.total_bytes_sec"),
    (IoQos(total_iops_sec=100, read_iops_sec=50), "qos.total_iops_sec"),
])
def test_io_limits_that_would_freeze_or_overflow_a_disk_are_refused(qos, field) -> None:
    with pytest.raises(InvalidArgument) as err:
        check_io_qos(qos, "qos")
    assert err.value.field == field
    with pytest.raises(InvalidArgument) as err:  # the same validator behind the spec
        validate(good(disks=[DiskSpec(volume="ds/a.qcow2", qos=qos)]), CTX)
    assert err.value.field == "spec.disks[0]." + field


def test_sensible_io_limits_pass() -> None:
    check_io_qos(IoQos(total_bytes_sec=10 << 20, total_iops_sec=500), "qos")
    check_io_qos(IoQos(read_bytes_sec=1 << 20, write_iops_sec=10), "qos")


@pytest.mark.parametrize("bw, field", [
    (Bandwidth(1 << 60), "spec.nics[0].inbound.average_kbps"),
    (Bandwidth((1 << 63) - 1), "spec.nics[0].inbound.average_kbps"),
    (Bandwidth(4), "spec.nics[0].inbound.average_kbps"),
    (Bandwidth(1000, peak_kbps=10), "spec.nics[0].inbound.peak_kbps"),
    (Bandwidth(0, burst_kib=64), "spec.nics[0].inbound.average_kbps"),
])
def test_nic_bandwidth_out_of_range_is_refused(bw, field) -> None:
    with pytest.raises(InvalidArgument) as err:
        validate(good(nics=[NicSpec(port_group="pg", inbound=bw)]), CTX)
    assert err.value.field == field


from cna_agent.compute.spec import StorageErrorPolicy  # noqa: E402


@pytest.mark.parametrize("policy, field", [
    (StorageErrorPolicy("kill"), "spec.storage_errors.action"),
    (StorageErrorPolicy("resume", 30), "spec.storage_errors.poweroff_after_s"),
    (StorageErrorPolicy("poweroff", 86401), "spec.storage_errors.poweroff_after_s"),
])
def test_a_bad_storage_error_policy_names_its_field(policy, field):
    spec = VmSpec(name="v", vcpus=1, memory_mib=64, storage_errors=policy)
    with pytest.raises(InvalidArgument) as exc:
        validate(spec, CTX)
    assert exc.value.field == field


def test_the_storage_error_policy_round_trips_through_the_stored_spec():
    spec = VmSpec(name="v", vcpus=1, memory_mib=64, storage_errors=StorageErrorPolicy("poweroff", 120))
    validate(spec, CTX)
    back = VmSpec.from_json(spec.to_json())
    assert back.storage_errors == StorageErrorPolicy("poweroff", 120) and back.storage_errors.effective_poweroff_after_s() == 120
    assert VmSpec.from_json('{"name": "old"}').storage_errors == StorageErrorPolicy()  # a spec from an older agent
