"""proto VmSpec <-> compute spec: lossless both ways; unknown enum numbers are refused by the
validator naming the field."""

from __future__ import annotations

import pytest

from cna_agent.api import pb
from cna_agent.api.vm_convert import spec_from_pb, spec_to_pb
from cna_agent.compute.spec_validation import ValidationContext, validate
from cna_agent.errors import InvalidArgument

v = pb.vm_pb2


def full_pb():
    return v.VmSpec(
        name="vm1", uuid="6f1c3a52-8d0e-4b7a-9c1d-2e3f4a5b6c7d", arch=pb.common_pb2.ARCH_AARCH64, firmware=v.FIRMWARE_UEFI,
        os_family=v.OS_FAMILY_EULER, vcpus=4, max_vcpus=8, cpu_topology=v.CpuTopologySpec(sockets=1, clusters=2, cores=4, threads=1),
        cpu_mode=v.CPU_MODE_CUSTOM, cpu_model="cortex-a57", memory_mib=1024, max_memory_mib=2048, balloon=True,
        cpu_qos=v.CpuQos(shares=10, limit_mhz=2000, reservation_mhz=500), memory_qos=v.MemoryQos(limit_mib=4096, reservation_mib=1, shares=2),
        disks=[v.DiskSpec(volume="ds/a.qcow2", bus=v.DISK_BUS_SCSI, cache=v.DISK_CACHE_NONE, io=v.DISK_IO_MODE_NATIVE, boot_order=1,
                          qos=v.IoQos(total_iops_sec=5)),
               v.DiskSpec(lun=v.LunSource(datastore="san", lun_id="6006016"), device=v.DISK_DEVICE_LUN, bus=v.DISK_BUS_SCSI)],
        nics=[v.NicSpec(port_group="pg", mac="52:54:00:00:00:01", model=v.NIC_MODEL_VIRTIO, inbound=v.BandwidthLimit(average_kbps=1000))],
        console=v.ConsoleSpec(type=v.CONSOLE_TYPE_VNC, password="pw"), serial_console=True, guest_agent=True,
        boot=v.BootSpec(kernel="/k", initrd="/i", cmdline="c"), numa_cells=2, labels={"a": "b"}, autostart=True,
    )


def test_round_trip_is_lossless() -> None:
    m = full_pb()
    spec = spec_from_pb(m)
    assert spec.arch == "aarch64" and spec.disks[1].lun.lun_id == "6006016" and spec.nics[0].inbound.average_kbps == 1000
    # proto3 submessage presence (an empty IoQos set or not) is not data; compare values
    assert spec_from_pb(spec_to_pb(spec)) == spec
    back = spec_to_pb(spec)
    assert back.disks[1].lun == m.disks[1].lun and back.nics[0].inbound == m.nics[0].inbound
    assert (back.cpu_qos, back.memory_qos, back.console, back.boot, back.labels) == (m.cpu_qos, m.memory_qos, m.console, m.boot, m.labels)


@pytest.mark.parametrize("field, path", [("os_family", "spec.os_family"), ("firmware", "spec.firmware"), ("arch", "spec.arch"),
                                         ("cpu_mode", "spec.cpu_mode")])
def test_unknown_enum_number_is_refused_naming_the_field(field: str, path: str) -> None:
    m = v.VmSpec(name="vm1", vcpus=1, memory_mib=64)
    setattr(m, field, 42)
    with pytest.raises(InvalidArgument) as err:
        validate(spec_from_pb(m), ValidationContext())
    assert err.value.field == path


def test_migration_policy_auto_converge_is_on_unless_turned_off() -> None:
    """An unset auto_converge (proto3 optional) takes the agent's default, on; an explicit false
    is a plain pre-copy; the zero values of the other fields take their defaults."""
    from cna_agent.api.vm_convert import migration_policy_from_pb

    unset = migration_policy_from_pb(v.MigrationPolicy())
    assert unset.auto_converge is True and unset.permit_post_copy is False
    assert (unset.max_downtime_ms, unset.progress_timeout_s, unset.completion_action) == (300, 60, "abort")
    assert migration_policy_from_pb(v.MigrationPolicy(auto_converge=False)).auto_converge is False
    assert migration_policy_from_pb(v.MigrationPolicy(auto_converge=True)).auto_converge is True
    # an explicit false survives the wire (presence is encoded), so the VRM can turn it off
    wire = v.MigrationPolicy(auto_converge=False).SerializeToString()
    assert wire and v.MigrationPolicy.FromString(wire).HasField("auto_converge")


def test_the_storage_error_policy_crosses_the_api_both_ways():
    m = pb.vm_pb2.VmSpec(name="v", storage_errors=pb.vm_pb2.StorageErrorPolicy(action="poweroff", poweroff_after_s=45))
    s = spec_from_pb(m)
    assert (s.storage_errors.action, s.storage_errors.poweroff_after_s) == ("poweroff", 45)
    back = spec_to_pb(s)
    assert back.storage_errors.action == "poweroff" and back.storage_errors.poweroff_after_s == 45


def test_spec_messages_convert_each_spec_object_once():
    """ListVms keeps each VM's converted spec while the inventory hands out the same spec
    object; a changed definition (a new object) is converted again, a deleted VM dropped."""
    from cna_agent.api.vm_convert import SpecMessages, vm_to_pb
    from cna_agent.compute.inventory import VmInfo

    spec = spec_from_pb(full_pb())
    msgs = SpecMessages()
    first = msgs.of(spec.uuid, spec)
    assert msgs.of(spec.uuid, spec) is first
    info = VmInfo(uuid=spec.uuid, name=spec.name, managed=True, spec=spec, state="running", reason="")
    assert vm_to_pb(info, first) == vm_to_pb(info)  # the kept message says what a fresh conversion says

    changed = spec_from_pb(full_pb())
    changed.memory_mib = 2048
    again = msgs.of(spec.uuid, changed)
    assert again is not first and again.memory_mib == 2048

    msgs.keep_only(set())
    assert msgs.of(spec.uuid, changed) is not again  # dropped, converted anew
