"""OVF's model (cna_agent.ovf.descriptor) to a VM spec and back, with a note for every item of
the descriptor that does not become what it asked for.

The import side is VMware's and VirtualBox's exports first: their controllers (LSI Logic,
PVSCSI, AHCI, NVMe, IDE), NICs (VMXNET3, E1000, E1000e, PCnet) and extras (sound, USB, floppy,
VMCI) meet a KVM host whose guests use virtio, virtio-scsi and SATA. Each is mapped to the
nearest device the guest OS family can drive (a Windows guest without virtio drivers keeps
SATA disks and e1000e NICs, which it has drivers for), and every change or drop is a Note the
caller gets back, never silent. What cannot be honoured at all (no processor item, a NIC on
a network the caller did not map, compressed or chunked disk files) refuses the import before
anything is made.

The export side writes the spec as VMware-readable items plus our own section for what OVF
has no item for, so plan_import(envelope_of(spec)) gives back an equivalent spec.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cna_agent.compute.spec import NIC_MODELS, CpuTopology, DiskSpec, NicSpec, VmSpec
from cna_agent.compute.spec_validation import check_mac, validate_name
from cna_agent.errors import FailedPrecondition, InvalidArgument
from cna_agent.ovf.descriptor import (RT_GRAPHICS, RT_PARALLEL, RT_SERIAL, RT_SOUND, RT_USB, Envelope, OvfController,
                                      OvfDisk, OvfDrive, OvfFile, OvfItem, OvfNic, OvfSystem)
from cna_agent.ovf.writer import STREAM_OPTIMIZED


@dataclass(frozen=True)
class Note:
    """One descriptor item the import did not take as it was: ``action`` is "changed" (a
    different device or setting stands in), "dropped" (the VM does not get it) or "ignored"
    (a setting with no effect here)."""

    item: str
    action: str
    detail: str


@dataclass(frozen=True)
class DiskPlan:
    """Where spec.disks[i] comes from: a file of the package (``href``), or nothing (a blank
    disk of ``capacity`` bytes)."""

    volume_id: str
    href: str
    capacity: int
    device: str = "disk"


@dataclass
class ImportPlan:
    spec: VmSpec
    disks: list[DiskPlan]
    notes: list[Note] = field(default_factory=list)


_NIC_MODELS = {"vmxnet3": "virtio", "vmxnet2": "virtio", "vmxnet": "virtio", "virtio": "virtio", "virtio-net": "virtio",
               "e1000": "e1000", "e1000e": "e1000e", "pcnet32": "e1000", "pcnet": "e1000", "rtl8139": "rtl8139"}
_NIC_SUBTYPES = {"virtio": "VirtIO", "e1000e": "E1000e", "e1000": "E1000", "rtl8139": "RTL8139"}
#: CIM_OperatingSystem.OsType values: 36 LINUX, 1 Other; Microsoft's are 58-125 in the CIM list.
CIM_LINUX, CIM_OTHER = 36, 1


def os_family_of(system: OvfSystem) -> str:
    """linux, windows or euler from vmw:osType, the OS description and the CIM id."""
    words = f"{system.os_type} {system.os_description}".lower()
    if "euler" in words:
        return "euler"
    if system.os_type.lower().startswith("win") or "windows" in words or "microsoft" in words:
        return "windows"
    return "linux"


def _drive_order(system: OvfSystem) -> list[OvfDrive]:
    ctrl_order = {iid: n for n, iid in enumerate(system.controllers)}
    return sorted(system.drives, key=lambda d: (d.boot_order == 0, d.boot_order, ctrl_order.get(d.controller, 999),
                                                d.address if d.address >= 0 else 999))


def _bus(ctrl: OvfController | None, family: str, virtio_drivers: bool, what: str, notes: list[Note]) -> str:
    legacy = family == "windows" and not virtio_drivers
    kind = ctrl.kind if ctrl else ""
    source = f"{ctrl.name or ctrl.kind} ({ctrl.subtype or ctrl.kind})" if ctrl else "no controller"
    if kind == "virtio":
        bus = "sata" if legacy else "virtio"
    elif kind == "sata":
        bus = "sata"
    elif kind == "scsi":
        bus = "sata" if legacy else "scsi"
    elif kind == "ide":
        bus = "sata"
    elif kind == "nvme":
        bus = "sata" if legacy else "virtio"
    else:
        bus = ""
    if kind in ("ide", "nvme") or (legacy and kind in ("scsi", "virtio")) or not kind:
        nice = bus or ("SATA" if legacy else "virtio")
        why = ("a Windows guest without virtio drivers has drivers for SATA" if legacy else
               "q35 machines have no IDE bus" if kind == "ide" else "the guest's default bus")
        notes.append(Note(what, "changed", f"was on {source}; attached as {nice.upper() if nice == 'sata' else nice} ({why})"))
    elif kind == "scsi" and ctrl and ctrl.subtype.lower() not in ("virtio-scsi", ""):
        notes.append(Note(what, "changed", f"was on {source}; attached to a virtio-scsi controller (the guest needs its "
                                           "virtio_scsi driver, in every Linux kernel since 2.6.36)"))
    return bus


def plan_import(env: Envelope, *, name: str, datastore: str, folder: str, network_map: dict[str, str], fmt: str,
                keep_macs: bool) -> ImportPlan:
    """The spec and disk sources for the package's VM; InvalidArgument for what cannot be imported."""
    s = env.system
    settings = s.agent_settings
    notes: list[Note] = []
    vm_name = name or s.name
    try:
        validate_name(vm_name, "name")
    except InvalidArgument as exc:
        if name:
            raise
        raise InvalidArgument("name", f"the package's VM name {s.name!r} is not a valid VM name here ({exc.message}); "
                                      "give one with name") from None
    if s.vcpus < 1:
        raise InvalidArgument("source", "the descriptor has no processor item (ResourceType 3) with a CPU count")
    if s.memory_mib < 1:
        raise InvalidArgument("source", "the descriptor has no memory item (ResourceType 4) with a size")
    family = settings.get("os_family") or os_family_of(s)
    virtio_drivers = settings.get("virtio_drivers") == "true"
    spec = VmSpec(name=vm_name, description=(s.annotation or "")[:1024], os_family=family, virtio_drivers=virtio_drivers,
                  vcpus=s.vcpus, memory_mib=s.memory_mib, serial_console=settings.get("serial_console") == "true",
                  guest_agent=settings.get("guest_agent") == "true", machine_type=settings.get("machine_type", ""),
                  arch=settings.get("arch") or ("x86_64" if any(t.startswith(("vmx-", "virtualbox")) for t in s.system_types)
                                                else ""))
    fw = settings.get("firmware") or {"efi": "uefi", "bios": "bios"}.get(s.firmware, "")
    spec.firmware = fw
    spec.secure_boot = s.secure_boot or settings.get("secure_boot") == "true"
    if spec.secure_boot and fw != "uefi":
        spec.secure_boot = False
        notes.append(Note("Secure Boot", "dropped", "asked without EFI firmware"))
    if s.cores_per_socket > 1:
        if s.vcpus % s.cores_per_socket == 0:
            spec.cpu_topology = CpuTopology(sockets=s.vcpus // s.cores_per_socket, cores=s.cores_per_socket, threads=1)
        else:
            notes.append(Note("processor", "changed", f"{s.cores_per_socket} cores per socket do not divide {s.vcpus} "
                                                      "vCPUs; one core per socket"))

    disks: list[DiskPlan] = []
    counts = {"disk": 0, "cdrom": 0}
    for drive in _drive_order(s):
        label = drive.name or f"{drive.kind} {drive.instance_id}"
        if drive.kind == "floppy":
            notes.append(Note(label, "dropped", "floppy drives are not given to VMs on this host"))
            continue
        if drive.kind == "cdrom" and not drive.file_ref and not drive.disk_id:
            notes.append(Note(label, "dropped", "a CD/DVD drive without media in the package; attach an ISO later with "
                                                "AttachDisk"))
            continue
        ctrl = s.controllers.get(drive.controller)
        bus = _bus(ctrl, family, virtio_drivers, label, notes)
        href, capacity = _drive_source(env, drive, label)
        counts[drive.kind] += 1
        if drive.kind == "cdrom":
            rel = f"{folder}/{vm_name}-cdrom{counts['cdrom']}.iso"
            disks.append(DiskPlan(volume_id=f"{datastore}/{rel}", href=href, capacity=capacity, device="cdrom"))
            spec.disks.append(DiskSpec(device="cdrom", bus="sata" if bus in ("", "virtio") else bus, readonly=True,
                                       volume=f"{datastore}/{rel}", format="raw"))
            continue
        rel = f"{folder}/{vm_name}-disk{counts['disk']}.{'qcow2' if fmt == 'qcow2' else 'raw'}"
        disks.append(DiskPlan(volume_id=f"{datastore}/{rel}", href=href, capacity=capacity))
        spec.disks.append(DiskSpec(bus=bus, volume=f"{datastore}/{rel}", format=fmt))
    first_disk = next((d for d in spec.disks if d.device != "cdrom"), None)
    if first_disk is not None:
        first_disk.boot_order = 1

    for nic in s.nics:
        spec.nics.append(_nic(nic, family, virtio_drivers, network_map, keep_macs, notes))
    unmapped = sorted(set(network_map) - {n.network for n in s.nics})
    if unmapped:
        raise InvalidArgument("network_map", f"{', '.join(map(repr, unmapped))}: no NIC of the package is on "
                                             f"{'this network' if len(unmapped) == 1 else 'these networks'} (its NICs "
                                             f"are on: {', '.join(sorted({n.network for n in s.nics})) or 'none'})")
    for item in s.others:
        notes.append(_other(item, spec))
    if s.properties:
        notes.append(Note("vApp properties", "ignored", f"{len(s.properties)} ProductSection properties "
                                                        f"({', '.join(s.properties[:8])}) are not passed to the guest"))
    for section in s.unknown_required:
        notes.append(Note(section, "dropped", "a required section this agent does not read"))
    ignored = sorted(k for k in s.vmw_config if k not in ("firmware", "uefi.secureBoot.enabled",
                                                          "bootOptions.efiSecureBootEnabled"))
    if ignored:
        notes.append(Note("VMware settings", "ignored", f"{len(ignored)} vmw:Config keys ({', '.join(ignored[:8])}"
                                                        f"{', ...' if len(ignored) > 8 else ''}) mean nothing on KVM"))
    return ImportPlan(spec=spec, disks=disks, notes=notes)


def _drive_source(env: Envelope, drive: OvfDrive, label: str) -> tuple[str, int]:
    file: OvfFile | None = None
    capacity = 0
    if drive.disk_id:
        disk = env.disks[drive.disk_id]
        capacity = disk.capacity_bytes
        file = env.files.get(disk.file_ref) if disk.file_ref else None
        if file is None and capacity <= 0:
            raise InvalidArgument("source", f"{label}: Disk {disk.disk_id} has neither a file nor a capacity")
    elif drive.file_ref:
        file = env.files[drive.file_ref]
    if file is not None:
        if file.compression:
            raise InvalidArgument("source", f"{label}: {file.href} is {file.compression}-compressed; this agent reads "
                                            "uncompressed package files (ovftool --compress=0, or gunzip it)")
        if file.chunk_size:
            raise InvalidArgument("source", f"{label}: {file.href} is split into chunks; join them first")
    return (file.href if file else ""), capacity


def _nic(nic: OvfNic, family: str, virtio_drivers: bool, network_map: dict[str, str], keep_macs: bool,
         notes: list[Note]) -> NicSpec:
    label = nic.name or f"NIC {nic.instance_id}"
    if not nic.network:
        raise InvalidArgument("source", f"{label} has no network (rasd:Connection)")
    pg = network_map.get(nic.network)
    if not pg:
        raise InvalidArgument("network_map", f"the package's network {nic.network!r} ({label}) is not mapped to a port "
                                             "group; map every network its NICs use")
    sub = nic.subtype.lower()
    model = _NIC_MODELS.get(sub, "")
    legacy = family == "windows" and not virtio_drivers
    if legacy and model == "virtio":
        model = "e1000e"
    if not model:
        model = "e1000e" if legacy else "virtio"
    if sub not in (model, "virtio-net" if model == "virtio" else model):
        notes.append(Note(label, "changed", f"a {nic.subtype or 'NIC of no stated model'} becomes a {model} NIC"
                                            + (" (the guest's virtio-net driver)" if model == "virtio" else "")))
    mac = ""
    if keep_macs and nic.mac:
        mac = check_mac(nic.mac.lower().replace("-", ":"), f"{label} MAC")
    return NicSpec(port_group=pg, model=model if model in NIC_MODELS else "", mac=mac, link_down=not nic.connected)


def _other(item: OvfItem, spec: VmSpec) -> Note:
    what = item.what
    sub = item.subtype.lower()
    if item.resource_type == RT_USB:
        return Note(what, "dropped", "USB controllers come with the machine type; no USB devices are passed through")
    if item.resource_type == RT_GRAPHICS:
        return Note(what, "changed", "the VM gets this host's console (VNC) instead")
    if item.resource_type == RT_SERIAL:
        spec.serial_console = True
        return Note(what, "changed", "the VM gets a serial console (GetConsole / SerialConsole) instead")
    if item.resource_type == RT_SOUND or "sound" in sub or "audio" in sub:
        return Note(what, "dropped", "VMs on this host have no sound devices")
    if item.resource_type == RT_PARALLEL:
        return Note(what, "dropped", "parallel ports are not given to VMs on this host")
    if "vmci" in sub:
        return Note(what, "dropped", "VMware's VMCI has no KVM counterpart")
    return Note(what, "dropped", "a device this host does not give VMs" + ("" if item.required else
                                                                          " (the descriptor marks it optional)"))


# -- export --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExportedDisk:
    """A disk file written for the package: spec.disks[index] as ``href``."""

    index: int
    href: str
    size: int
    capacity: int
    populated: int = 0


def export_refusal(spec: VmSpec) -> None:
    for i, d in enumerate(spec.disks):
        if d.lun is not None:
            raise FailedPrecondition(f"disk {d.target or i} is a SAN LUN; an OVF package carries volume files only "
                                     "(move it to a volume first)", field="vm")


def export_notes(spec: VmSpec) -> list[Note]:
    notes = []
    if spec.boot.kernel:
        notes.append(Note("direct kernel boot", "dropped", "the kernel, initrd and command line are host files, not part "
                                                           "of the package; the exported VM boots from its disks"))
    if spec.dedicated_cpus or spec.hugepages or spec.numa_cells > 1:
        notes.append(Note("placement", "dropped", "dedicated CPUs, huge pages and guest NUMA are host placement, "
                                                  "decided again where the package is imported"))
    if spec.cpu_qos.limit_mhz or spec.memory_qos.limit_mib or any(n.inbound or n.outbound for n in spec.nics):
        notes.append(Note("QoS", "dropped", "CPU, memory and bandwidth limits are host policy; set them again after "
                                            "the import"))
    return notes


def envelope_of(spec: VmSpec, disks: list[ExportedDisk]) -> Envelope:
    """The descriptor model for ``spec`` with its disks written as ``disks``."""
    family = spec.os_family or "linux"
    system = OvfSystem(id=spec.name, name=spec.name, annotation=spec.description,
                       os_id=CIM_OTHER if family == "windows" else CIM_LINUX,
                       os_type={"windows": "windows9Server64Guest"}.get(family, "other3xLinux64Guest"),
                       os_description={"euler": "openEuler / EulerOS", "windows": "Microsoft Windows"}.get(family, "Linux"),
                       system_types=["vmx-14"], vcpus=spec.vcpus, memory_mib=spec.memory_mib)
    topo = spec.cpu_topology
    if topo.cores and topo.sockets:
        system.cores_per_socket = topo.cores * max(topo.threads, 1) * max(topo.dies, 1) * max(topo.clusters, 1)
    if spec.firmware:
        system.vmw_config["firmware"] = "efi" if spec.firmware == "uefi" else "bios"
    if spec.secure_boot:
        system.vmw_config["uefi.secureBoot.enabled"] = "true"
    settings = {"os_family": family, "virtio_drivers": str(spec.virtio_drivers).lower(),
                "guest_agent": str(spec.guest_agent).lower(), "serial_console": str(spec.serial_console).lower()}
    for key, value in (("machine_type", spec.machine_type), ("arch", spec.arch), ("firmware", spec.firmware)):
        if value:
            settings[key] = value
    system.agent_settings = settings
    files: dict[str, OvfFile] = {}
    ovf_disks: dict[str, OvfDisk] = {}
    by_index = {d.index: d for d in disks}
    next_id = 3
    ctrl_ids: dict[str, str] = {}
    for i, d in enumerate(spec.disks):
        out = by_index.get(i)
        if out is None:
            continue
        bus = d.bus or ("sata" if (family == "windows" and not spec.virtio_drivers) or d.device == "cdrom" else "virtio")
        if bus not in ctrl_ids:
            ctrl_ids[bus] = str(next_id)
            system.controllers[str(next_id)] = OvfController(instance_id=str(next_id), kind=bus, name=f"{bus} controller")
            next_id += 1
        fid = f"file{len(files) + 1}"
        files[fid] = OvfFile(id=fid, href=out.href, size=out.size)
        unit = sum(1 for x in system.drives if x.controller == ctrl_ids[bus])
        if d.device == "cdrom":
            system.drives.append(OvfDrive(instance_id=str(next_id), kind="cdrom", name=f"cdrom{unit}", file_ref=fid,
                                          controller=ctrl_ids[bus], address=unit))
        else:
            did = f"vmdisk{len(ovf_disks) + 1}"
            ovf_disks[did] = OvfDisk(disk_id=did, file_ref=fid, capacity_bytes=out.capacity, format_uri=STREAM_OPTIMIZED,
                                     populated_size=out.populated)
            system.drives.append(OvfDrive(instance_id=str(next_id), kind="disk", name=d.target or f"disk{unit}",
                                          disk_id=did, controller=ctrl_ids[bus], address=unit,
                                          boot_order=d.boot_order))
        next_id += 1
    networks: list[str] = []
    for n, nic in enumerate(spec.nics):
        if nic.port_group not in networks:
            networks.append(nic.port_group)
        system.nics.append(OvfNic(instance_id=str(next_id), network=nic.port_group,
                                  subtype=_NIC_SUBTYPES.get(nic.model or "virtio", "VirtIO"), mac=nic.mac,
                                  connected=not nic.link_down, name=f"ethernet{n}"))
        next_id += 1
    return Envelope(version="1", files=files, disks=ovf_disks, networks=networks, system=system)


def disk_href(spec: VmSpec, index: int) -> str:
    d = spec.disks[index]
    kind = "cdrom" if d.device == "cdrom" else "disk"
    n = sum(1 for x in spec.disks[:index + 1] if (x.device == "cdrom") == (kind == "cdrom"))
    return f"{spec.name}-{kind}{n}.{'iso' if kind == 'cdrom' else 'vmdk'}"


