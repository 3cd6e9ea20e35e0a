"""proto cna.v1 VM messages <-> compute's spec/info dataclasses (translation only).

Enum numbers map to the spec's short strings; a number this agent does not know becomes
"<unknown N>", which the spec validator refuses naming the field (validation stays in one
place, compute/spec.py).
"""

from __future__ import annotations

from typing import Any

from cna_agent.api import pb
from cna_agent.api.convert import timestamp
from cna_agent.compute import customization as cz
from cna_agent.compute import spec as sp
from cna_agent.compute.inventory import ConsoleInfo, VmInfo

v = pb.vm_pb2
c = pb.common_pb2

ARCH = {c.ARCH_UNSPECIFIED: "", c.ARCH_X86_64: "x86_64", c.ARCH_AARCH64: "aarch64"}
FIRMWARE = {v.FIRMWARE_UNSPECIFIED: "", v.FIRMWARE_BIOS: "bios", v.FIRMWARE_UEFI: "uefi"}
OS_FAMILY = {v.OS_FAMILY_UNSPECIFIED: "", v.OS_FAMILY_LINUX: "linux", v.OS_FAMILY_WINDOWS: "windows", v.OS_FAMILY_EULER: "euler"}
CPU_MODE = {v.CPU_MODE_UNSPECIFIED: "", v.CPU_MODE_HOST_PASSTHROUGH: "host-passthrough", v.CPU_MODE_HOST_MODEL: "host-model",
            v.CPU_MODE_CUSTOM: "custom"}
DISK_BUS = {v.DISK_BUS_UNSPECIFIED: "", v.DISK_BUS_VIRTIO: "virtio", v.DISK_BUS_SCSI: "scsi", v.DISK_BUS_SATA: "sata", v.DISK_BUS_IDE: "ide"}
DISK_DEVICE = {v.DISK_DEVICE_UNSPECIFIED: "", v.DISK_DEVICE_DISK: "disk", v.DISK_DEVICE_CDROM: "cdrom", v.DISK_DEVICE_LUN: "lun"}
DISK_CACHE = {v.DISK_CACHE_UNSPECIFIED: "", v.DISK_CACHE_NONE: "none", v.DISK_CACHE_WRITETHROUGH: "writethrough",
              v.DISK_CACHE_WRITEBACK: "writeback", v.DISK_CACHE_DIRECTSYNC: "directsync", v.DISK_CACHE_UNSAFE: "unsafe"}
DISK_IO = {v.DISK_IO_MODE_UNSPECIFIED: "", v.DISK_IO_MODE_NATIVE: "native", v.DISK_IO_MODE_THREADS: "threads", v.DISK_IO_MODE_IO_URING: "io_uring"}
DISK_ERROR = {v.DISK_ERROR_POLICY_UNSPECIFIED: "", v.DISK_ERROR_POLICY_STOP: "stop", v.DISK_ERROR_POLICY_REPORT: "report",
              v.DISK_ERROR_POLICY_IGNORE: "ignore", v.DISK_ERROR_POLICY_ENOSPACE: "enospace", v.DISK_ERROR_POLICY_RETRY: "retry"}
NIC_MODEL = {v.NIC_MODEL_UNSPECIFIED: "", v.NIC_MODEL_VIRTIO: "virtio", v.NIC_MODEL_E1000E: "e1000e", v.NIC_MODEL_E1000: "e1000",
             v.NIC_MODEL_RTL8139: "rtl8139"}
CONSOLE = {v.CONSOLE_TYPE_UNSPECIFIED: "", v.CONSOLE_TYPE_VNC: "vnc", v.CONSOLE_TYPE_SPICE: "spice", v.CONSOLE_TYPE_NONE: "none"}
STATE = {
    "stopped": v.VM_STATE_STOPPED, "running": v.VM_STATE_RUNNING, "paused": v.VM_STATE_PAUSED,
    "shutting_down": v.VM_STATE_SHUTTING_DOWN, "crashed": v.VM_STATE_CRASHED, "migrating": v.VM_STATE_MIGRATING,
    "suspended": v.VM_STATE_SUSPENDED, "starting": v.VM_STATE_STARTING, "unknown": v.VM_STATE_UNKNOWN,
    "hibernated": v.VM_STATE_HIBERNATED,
}
STATE_NAMES = {num: name for name, num in STATE.items()}
CUSTOMIZATION_STATE = {"pending": v.CUSTOMIZATION_STATE_PENDING, "done": v.CUSTOMIZATION_STATE_DONE,
                       "failed": v.CUSTOMIZATION_STATE_FAILED}


def _e(table: dict[int, str], value: int) -> str:
    return table.get(value, f"<unknown {value}>")


def _r(table: dict[int, str], value: str) -> int:
    for num, name in table.items():
        if name == value:
            return num
    return 0


def spec_from_pb(m: Any) -> sp.VmSpec:
    spec = sp.VmSpec(
        name=m.name, uuid=m.uuid, description=m.description, arch=_e(ARCH, m.arch), machine_type=m.machine_type,
        firmware=_e(FIRMWARE, m.firmware), secure_boot=m.secure_boot, os_family=_e(OS_FAMILY, m.os_family),
        virtio_drivers=m.virtio_drivers, vcpus=m.vcpus, max_vcpus=m.max_vcpus,
        cpu_topology=sp.CpuTopology(m.cpu_topology.sockets, m.cpu_topology.dies, m.cpu_topology.clusters, m.cpu_topology.cores,
                                    m.cpu_topology.threads),
        cpu_mode=_e(CPU_MODE, m.cpu_mode), cpu_model=m.cpu_model, memory_mib=m.memory_mib, max_memory_mib=m.max_memory_mib,
        balloon=m.balloon, cpu_qos=sp.CpuQos(m.cpu_qos.shares, m.cpu_qos.limit_mhz, m.cpu_qos.reservation_mhz),
        memory_qos=sp.MemoryQos(m.memory_qos.limit_mib, m.memory_qos.reservation_mib, m.memory_qos.shares),
        console=sp.ConsoleSpec(_e(CONSOLE, m.console.type), m.console.password, m.console.listen, m.console.keymap),
        serial_console=m.serial_console, guest_agent=m.guest_agent, watchdog=m.watchdog, panic_device=m.panic_device,
        boot=sp.BootSpec(m.boot.kernel, m.boot.initrd, m.boot.cmdline), numa_cells=m.numa_cells, labels=dict(m.labels),
        autostart=m.autostart, dedicated_cpus=m.dedicated_cpus, hugepages=m.hugepages,
        hotplug_slots=m.hotplug_slots if m.HasField("hotplug_slots") else -1,
        storage_errors=sp.StorageErrorPolicy(m.storage_errors.action, m.storage_errors.poweroff_after_s), tpm=m.tpm,
    )
    for d in m.disks:
        q = d.qos
        spec.disks.append(sp.DiskSpec(
            target=d.target, device=_e(DISK_DEVICE, d.device), bus=_e(DISK_BUS, d.bus),
            volume=d.volume if d.WhichOneof("source") == "volume" else "",
            lun=sp.LunSource(d.lun.datastore, d.lun.lun_id) if d.WhichOneof("source") == "lun" else None,
            format=d.format, readonly=d.readonly, shareable=d.shareable, cache=_e(DISK_CACHE, d.cache), io=_e(DISK_IO, d.io),
            error_policy=_e(DISK_ERROR, d.error_policy), boot_order=d.boot_order,
            qos=sp.IoQos(q.read_bytes_sec, q.write_bytes_sec, q.total_bytes_sec, q.read_iops_sec, q.write_iops_sec, q.total_iops_sec),
            serial=d.serial,
        ))
    for n in m.nics:
        spec.nics.append(sp.NicSpec(
            port_group=n.port_group, mac=n.mac, model=_e(NIC_MODEL, n.model), link_down=n.link_down, boot_order=n.boot_order,
            inbound=sp.Bandwidth(n.inbound.average_kbps, n.inbound.peak_kbps, n.inbound.burst_kib) if n.HasField("inbound") else None,
            outbound=sp.Bandwidth(n.outbound.average_kbps, n.outbound.peak_kbps, n.outbound.burst_kib) if n.HasField("outbound") else None,
            interface_id=n.interface_id, queues=n.queues, ip_addresses=list(n.ip_addresses),
        ))
    return spec


def spec_to_pb(s: sp.VmSpec) -> Any:
    m = v.VmSpec(
        name=s.name, uuid=s.uuid, description=s.description, arch=_r(ARCH, s.arch), machine_type=s.machine_type,
        firmware=_r(FIRMWARE, s.firmware), secure_boot=s.secure_boot, os_family=_r(OS_FAMILY, s.os_family),
        virtio_drivers=s.virtio_drivers, vcpus=s.vcpus, max_vcpus=s.max_vcpus,
        cpu_topology=v.CpuTopologySpec(sockets=s.cpu_topology.sockets, dies=s.cpu_topology.dies, clusters=s.cpu_topology.clusters,
                                       cores=s.cpu_topology.cores, threads=s.cpu_topology.threads),
        cpu_mode=_r(CPU_MODE, s.cpu_mode), cpu_model=s.cpu_model, memory_mib=s.memory_mib, max_memory_mib=s.max_memory_mib,
        balloon=s.balloon,
        cpu_qos=v.CpuQos(shares=s.cpu_qos.shares, limit_mhz=s.cpu_qos.limit_mhz, reservation_mhz=s.cpu_qos.reservation_mhz),
        memory_qos=v.MemoryQos(limit_mib=s.memory_qos.limit_mib, reservation_mib=s.memory_qos.reservation_mib, shares=s.memory_qos.shares),
        console=v.ConsoleSpec(type=_r(CONSOLE, s.console.type), password=s.console.password, listen=s.console.listen, keymap=s.console.keymap),
        serial_console=s.serial_console, guest_agent=s.guest_agent, watchdog=s.watchdog, panic_device=s.panic_device,
        boot=v.BootSpec(kernel=s.boot.kernel, initrd=s.boot.initrd, cmdline=s.boot.cmdline), numa_cells=s.numa_cells,
        labels=s.labels, autostart=s.autostart, dedicated_cpus=s.dedicated_cpus, hugepages=s.hugepages,
        storage_errors=v.StorageErrorPolicy(action=s.storage_errors.action, poweroff_after_s=s.storage_errors.poweroff_after_s),
        tpm=s.tpm,
    )
    if s.hotplug_slots >= 0:
        m.hotplug_slots = s.hotplug_slots
    for d in s.disks:
        disk = m.disks.add(target=d.target, device=_r(DISK_DEVICE, d.device), bus=_r(DISK_BUS, d.bus), format=d.format,
                           readonly=d.readonly, shareable=d.shareable, cache=_r(DISK_CACHE, d.cache), io=_r(DISK_IO, d.io),
                           error_policy=_r(DISK_ERROR, d.error_policy), boot_order=d.boot_order, serial=d.serial,
                           qos=v.IoQos(**vars(d.qos)))
        if d.volume:
            disk.volume = d.volume
        elif d.lun is not None:
            disk.lun.CopyFrom(v.LunSource(datastore=d.lun.datastore, lun_id=d.lun.lun_id))
    for n in s.nics:
        nic = m.nics.add(port_group=n.port_group, mac=n.mac, model=_r(NIC_MODEL, n.model), link_down=n.link_down,
                         boot_order=n.boot_order, interface_id=n.interface_id, queues=n.queues,
                         ip_addresses=list(n.ip_addresses))
        if n.inbound is not None:
            nic.inbound.CopyFrom(v.BandwidthLimit(**vars(n.inbound)))
        if n.outbound is not None:
            nic.outbound.CopyFrom(v.BandwidthLimit(**vars(n.outbound)))
    return m


def console_to_pb(ci: ConsoleInfo | None) -> Any:
    if ci is None:
        return None
    out = v.ConsoleInfo(type=_r(CONSOLE, ci.type) or v.CONSOLE_TYPE_NONE, host=ci.host, port=ci.port, password=ci.password,
                        unix_socket=ci.unix_socket)
    if ci.password_expires is not None:
        out.password_expire_time.CopyFrom(timestamp(ci.password_expires))
    return out


#: compute.guest_agent's tools statuses -> cna.v1.ToolsStatus.
TOOLS_STATUS = {"no_channel": v.TOOLS_STATUS_NO_CHANNEL, "not_installed": v.TOOLS_STATUS_NOT_INSTALLED,
                "not_running": v.TOOLS_STATUS_NOT_RUNNING, "running": v.TOOLS_STATUS_RUNNING,
                "vm_not_running": v.TOOLS_STATUS_VM_NOT_RUNNING}


def guest_info_to_pb(info: Any) -> Any:
    """compute.guest_agent.GuestInfo -> cna.v1.GuestInfo."""
    out = v.GuestInfo(
        tools_status=TOOLS_STATUS.get(info.tools_status, v.TOOLS_STATUS_UNSPECIFIED), tools_version=info.tools_version,
        os_id=info.os_id, os_name=info.os_name, os_version=info.os_version, os_pretty_name=info.os_pretty_name,
        kernel_release=info.kernel_release, kernel_version=info.kernel_version, machine=info.machine,
        hostname=info.hostname, timezone=info.timezone, users=list(info.users), stale=info.stale, error=info.error,
        interfaces=[v.GuestInterface(name=i.name, mac=i.mac, nic_index=i.nic_index,
                                     addresses=[v.GuestAddress(type=a.type, address=a.address, prefix=a.prefix)
                                                for a in i.addresses]) for i in info.interfaces],
        filesystems=[v.GuestFilesystem(mountpoint=f.mountpoint, name=f.name, fstype=f.fstype, total_bytes=f.total_bytes,
                                       used_bytes=f.used_bytes, disks=list(f.disks)) for f in info.filesystems])
    if info.read_at is not None:
        out.read_time.CopyFrom(timestamp(info.read_at))
    return out


class SpecMessages:
    """Each VM's spec as a message, converted once per spec object.

    The inventory hands out the same VmSpec object until the VM's definition changes (then a
    new one), so an identity match means an unchanged spec. Converting 1,000 specs was a
    third of a ListVms (15 of 42 ms); a copy of the kept message costs a tenth of that.
    """

    def __init__(self) -> None:
        self._by_uuid: dict[str, tuple[sp.VmSpec, Any]] = {}

    def of(self, uuid: str, spec: sp.VmSpec) -> Any:
        kept = self._by_uuid.get(uuid)
        if kept is not None and kept[0] is spec:
            return kept[1]
        msg = spec_to_pb(spec)
        self._by_uuid[uuid] = (spec, msg)
        return msg

    def keep_only(self, uuids: set[str]) -> None:
        """Drop the VMs a full listing no longer shows (deleted ones)."""
        for uuid in [u for u in self._by_uuid if u not in uuids]:
            del self._by_uuid[uuid]


def vm_to_pb(info: VmInfo, spec_msg: Any = None) -> Any:
    """``spec_msg``: info.spec already converted (SpecMessages)."""
    vm = v.Vm(uuid=info.uuid, name=info.name, managed=info.managed)
    if info.spec is not None:
        vm.spec.CopyFrom(spec_msg if spec_msg is not None else spec_to_pb(info.spec))
    vm.status.CopyFrom(v.VmStatus(
        state=STATE.get(info.state, v.VM_STATE_UNKNOWN), state_reason=info.reason, active_operation_id=info.active_operation_id,
        cpu_time_ns=info.cpu_time_ns, memory_rss_kib=info.memory_rss_kib, qemu_pid=info.qemu_pid,
        host_limitations=list(info.host_limitations),
    ))
    if info.state_time is not None:
        vm.status.state_time.CopyFrom(timestamp(info.state_time))
    if info.recycle_expires is not None:
        vm.status.recycle_expire_time.CopyFrom(timestamp(info.recycle_expires))
    if info.console is not None:
        vm.status.console.CopyFrom(console_to_pb(info.console))
    if info.tools_status:
        vm.status.tools_status = TOOLS_STATUS.get(info.tools_status, v.TOOLS_STATUS_UNSPECIFIED)
        vm.status.tools_version = info.tools_version
    if info.hibernated is not None:
        vm.status.hibernation.datastore = info.hibernated.datastore
        vm.status.hibernation.saved_time.CopyFrom(timestamp(info.hibernated.saved_at))
    vm.status.pending_changes.extend(info.pending_changes)
    vm.status.template = info.template
    if info.customization is not None:
        cs = vm.status.customization
        cs.state, cs.message = CUSTOMIZATION_STATE.get(info.customization.state, 0), info.customization.message
        cs.start_time.CopyFrom(timestamp(info.customization.since))
        if info.customization.finished:
            cs.finish_time.CopyFrom(timestamp(info.customization.finished))
    return vm


def deploy_to_pb(result: Any) -> Any:
    """compute.templates.DeployResult -> cna.v1.DeployVmResponse."""
    return v.DeployVmResponse(vms=[vm_to_pb(i) for i in result.vms],
                              failures=[v.DeployVmFailure(name=f.name, code=f.code, message=f.message) for f in result.failures])


def customization_from_pb(m: Any) -> cz.GuestCustomization:
    return cz.GuestCustomization(
        hostname=m.hostname, dns_servers=list(m.dns_servers), dns_search=list(m.dns_search), user_data=m.user_data,
        windows_unattend_xml=m.windows_unattend_xml,
        users=[cz.GuestUser(name=u.name, password_hash=u.password_hash, ssh_authorized_keys=list(u.ssh_authorized_keys),
                            sudo=u.sudo) for u in m.users],
        nics=[cz.GuestNicConfig(nic_index=n.nic_index, dhcp=n.dhcp, addresses=list(n.addresses), gateway4=n.gateway4,
                                gateway6=n.gateway6, routes=[cz.GuestRoute(to=r.to, via=r.via) for r in n.routes])
              for n in m.nics])


def snapshot_to_pb(info: Any) -> Any:
    """compute.snapshots.SnapshotInfo -> cna.v1.Snapshot."""
    from google.protobuf import timestamp_pb2

    state = {v: k for k, v in STATE_NAMES.items()}.get(info.vm_state, 0)
    return pb.vm_pb2.Snapshot(name=info.name, parent=info.parent, create_time=timestamp_pb2.Timestamp(seconds=info.create_time),
                              description=info.description, kind=info.kind, vm_state=state, current=info.current,
                              children=list(info.children), memory=info.memory)


def vm_from_pb(m: Any) -> VmInfo:
    """cna.v1.Vm -> VmInfo (what a peer agent reported, e.g. a migration's destination)."""
    s = m.status
    return VmInfo(uuid=m.uuid, name=m.name, managed=m.managed, spec=spec_from_pb(m.spec) if m.HasField("spec") else None,
                  state=STATE_NAMES.get(s.state, "unknown"), reason=s.state_reason,
                  state_time=s.state_time.seconds + s.state_time.nanos / 1e9 if s.HasField("state_time") else None,
                  cpu_time_ns=s.cpu_time_ns, memory_rss_kib=s.memory_rss_kib, qemu_pid=s.qemu_pid,
                  host_limitations=tuple(s.host_limitations))


def migration_policy_from_pb(m: Any) -> Any:
    """cna.v1.MigrationPolicy -> compute's MigrationPolicy (zero values take its defaults; an unset
    ``auto_converge`` too, an explicit false turns it off)."""
    from cna_agent.compute.migration import MigrationPolicy

    d = MigrationPolicy()
    auto_converge = m.auto_converge if m.HasField("auto_converge") else d.auto_converge
    return MigrationPolicy(max_downtime_ms=m.max_downtime_ms or d.max_downtime_ms, bandwidth_mib_s=m.bandwidth_mib_s,
                           auto_converge=auto_converge, permit_post_copy=m.permit_post_copy,
                           progress_timeout_s=m.progress_timeout_s or d.progress_timeout_s,
                           completion_timeout_s_per_gib=m.completion_timeout_s_per_gib or d.completion_timeout_s_per_gib,
                           completion_action=m.completion_action or d.completion_action)
