"""An OVF descriptor (DMTF DSP0243, 1.x and 2.0; what VMware, VirtualBox and FusionCompute write)
read into plain data, every hardware item kept so the importer can say what it does with each.

Decisions, and why:

* **Local names, not fixed prefixes.** Exporters bind the envelope, rasd and vssd namespaces to
  whatever prefixes they like, and OVF 2.0 moves the envelope to ``.../envelope/2`` and adds
  StorageItem/EthernetPortItem. Elements and attributes are matched by local name, so one reader
  serves them all.
* **Nothing is dropped here.** An item the parser does not turn into a CPU, memory, controller,
  drive or NIC is kept as an OvfItem with its resource type and subtype; the importer reports it.
* **Hostile input is refused early**: a descriptor larger than MAX_BYTES, any DTD or entity
  declaration (billion laughs, external entities), more than MAX_ITEMS hardware items, a
  collection of several virtual systems (imported one at a time, by name), references that are
  URLs or leave the package (``../``, absolute paths).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from xml.etree import ElementTree as ET

MAX_BYTES = 4 << 20
MAX_ITEMS = 512
#: Our own extension section (ovf:required="false": other readers may skip it).
CNA_NS = "urn:cna-agent:ovf:1"
VMW_NS = "http://www.vmware.com/schema/ovf"

# CIM ResourceType values (CIM_ResourceAllocationSettingData).
RT_OTHER, RT_CPU, RT_MEMORY, RT_IDE, RT_SCSI = 1, 3, 4, 5, 6
RT_NIC, RT_FLOPPY, RT_CDROM, RT_DVD, RT_DISK = 10, 14, 15, 16, 17
RT_OTHER_STORAGE, RT_SERIAL, RT_PARALLEL, RT_USB, RT_GRAPHICS, RT_SOUND = 20, 21, 22, 23, 24, 35
RESOURCE_NAMES = {RT_OTHER: "other device", RT_CPU: "processor", RT_MEMORY: "memory", RT_IDE: "IDE controller",
                  RT_SCSI: "SCSI controller", 7: "Fibre Channel HBA", 8: "iSCSI HBA", 9: "InfiniBand HCA",
                  RT_NIC: "ethernet adapter", 11: "other network adapter", 12: "I/O slot", 13: "I/O device",
                  RT_FLOPPY: "floppy drive", RT_CDROM: "CD drive", RT_DVD: "DVD drive", RT_DISK: "disk drive",
                  18: "tape drive", 19: "storage extent", RT_OTHER_STORAGE: "storage controller",
                  RT_SERIAL: "serial port", RT_PARALLEL: "parallel port", RT_USB: "USB controller",
                  RT_GRAPHICS: "graphics controller", 25: "IEEE 1394 controller", 26: "partitionable unit",
                  27: "base partitionable unit", 28: "power", 29: "cooling capacity", 30: "ethernet switch port",
                  31: "logical disk", 32: "storage volume", 33: "ethernet connection", RT_SOUND: "sound card"}

_UNIT = re.compile(r"^\s*(?:byte|bytes)\s*(?:\*\s*(\d+)\s*\^\s*(\d+))?\s*$", re.I)
_NAMED_UNITS = {"byte": 1, "bytes": 1, "kilobytes": 1 << 10, "kb": 1 << 10, "megabytes": 1 << 20, "mb": 1 << 20,
                "gigabytes": 1 << 30, "gb": 1 << 30, "terabytes": 1 << 40}


class DescriptorError(ValueError):
    """The descriptor cannot be read as an OVF envelope; the message says where."""


@dataclass(frozen=True)
class OvfFile:
    id: str
    href: str
    size: int = 0
    compression: str = ""
    chunk_size: int = 0


@dataclass(frozen=True)
class OvfDisk:
    disk_id: str
    file_ref: str  # "" = a blank disk the importer creates
    capacity_bytes: int
    format_uri: str = ""
    populated_size: int = 0


@dataclass(frozen=True)
class OvfController:
    instance_id: str
    kind: str  # ide, scsi, sata, nvme, virtio, other
    subtype: str = ""
    name: str = ""


@dataclass(frozen=True)
class OvfDrive:
    instance_id: str
    kind: str  # disk, cdrom, floppy
    name: str = ""
    disk_id: str = ""  # HostResource ovf:/disk/<id>
    file_ref: str = ""  # HostResource ovf:/file/<id> (an ISO in the package)
    controller: str = ""  # the parent controller's InstanceID
    address: int = -1  # AddressOnParent
    boot_order: int = 0


@dataclass(frozen=True)
class OvfNic:
    instance_id: str
    network: str
    subtype: str = ""
    mac: str = ""
    connected: bool = True
    name: str = ""


@dataclass(frozen=True)
class OvfItem:
    """A hardware item the reader gave no meaning (reported by the importer)."""

    instance_id: str
    resource_type: int
    subtype: str = ""
    name: str = ""
    required: bool = True

    @property
    def what(self) -> str:
        base = RESOURCE_NAMES.get(self.resource_type, f"resource type {self.resource_type}")
        label = self.name or base
        return f"{label} ({base}{', ' + self.subtype if self.subtype else ''})" if label != base else \
            f"{base}{' (' + self.subtype + ')' if self.subtype else ''}"


@dataclass
class OvfSystem:
    id: str
    name: str = ""
    annotation: str = ""
    os_id: int = 0
    os_type: str = ""  # vmw:osType
    os_description: str = ""
    system_types: list[str] = field(default_factory=list)
    vcpus: int = 0
    cores_per_socket: int = 0
    memory_mib: int = 0
    firmware: str = ""  # "bios", "efi" or "" (not said)
    secure_boot: bool = False
    controllers: dict[str, OvfController] = field(default_factory=dict)
    drives: list[OvfDrive] = field(default_factory=list)
    nics: list[OvfNic] = field(default_factory=list)
    others: list[OvfItem] = field(default_factory=list)
    #: vmw:Config / vmw:ExtraConfig key -> value.
    vmw_config: dict[str, str] = field(default_factory=dict)
    #: Our own section's settings (written by writer.py).
    agent_settings: dict[str, str] = field(default_factory=dict)
    #: ProductSection property keys (vApp options): not carried over, reported.
    properties: list[str] = field(default_factory=list)
    #: Sections marked ovf:required that this reader does not know (reported).
    unknown_required: list[str] = field(default_factory=list)


@dataclass
class Envelope:
    version: str
    files: dict[str, OvfFile]
    disks: dict[str, OvfDisk]
    networks: list[str]
    system: OvfSystem


# -- helpers -------------------------------------------------------------------------------------


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1] if isinstance(tag, str) else ""


def _ns(tag: str) -> str:
    return tag[1:].split("}", 1)[0] if isinstance(tag, str) and tag.startswith("{") else ""


def _attr(el: ET.Element, name: str, default: str = "") -> str:
    for k, v in el.attrib.items():
        if _local(k) == name:
            return v
    return default


def _child(el: ET.Element, name: str) -> ET.Element | None:
    return next((c for c in el if _local(c.tag) == name), None)


def _children(el: ET.Element, name: str) -> list[ET.Element]:
    return [c for c in el if _local(c.tag) == name]


def _text(el: ET.Element, name: str) -> str:
    c = _child(el, name)
    return (c.text or "").strip() if c is not None else ""


def _int(value: str, what: str, default: int = 0) -> int:
    if not value:
        return default
    try:
        n = int(value.strip())
    except ValueError:
        raise DescriptorError(f"{what}: {value[:40]!r} is not a whole number") from None
    if n < 0:
        raise DescriptorError(f"{what}: {n} is negative")
    return n


def unit_bytes(units: str, default: int = 1) -> int:
    """Bytes per unit of an allocation-units string ("byte * 2^20", "MegaBytes"); ``default``
    when it is empty."""
    if not units or not units.strip():
        return default
    m = _UNIT.match(units)
    if m:
        return int(m.group(1)) ** int(m.group(2)) if m.group(1) else 1
    named = _NAMED_UNITS.get(units.strip().lower())
    if named is None:
        raise DescriptorError(f"allocation units {units[:40]!r} are not a byte unit")
    return named


def check_href(href: str, what: str) -> str:
    """A file reference inside the package: a plain relative name, never a URL or a way out."""
    if not href or len(href) > 255:
        raise DescriptorError(f"{what}: empty or overlong file reference")
    if "://" in href or href.startswith("/") or "\\" in href or any(ord(c) < 32 for c in href):
        raise DescriptorError(f"{what}: {href!r} is not a file inside the package (URLs and absolute paths are refused)")
    if any(part in ("", ".", "..") for part in href.split("/")):
        raise DescriptorError(f"{what}: {href!r} leaves the package or has empty components")
    return href


# -- the reader ------------------------------------------------------------------------------------


def parse(data: bytes) -> Envelope:
    """The envelope in ``data`` (an .ovf file's bytes); DescriptorError when it is not one."""
    if len(data) > MAX_BYTES:
        raise DescriptorError(f"the descriptor is {len(data)} bytes; at most {MAX_BYTES} are read")
    head = data[:1 << 16].lower()
    if b"<!doctype" in head or b"<!entity" in data.lower():
        raise DescriptorError("the descriptor declares a DTD or entities; OVF needs neither and they are refused")
    try:
        root = ET.fromstring(data)
    except ET.ParseError as exc:
        raise DescriptorError(f"not well-formed XML: {exc}") from None
    if _local(root.tag) != "Envelope":
        raise DescriptorError(f"the root element is {_local(root.tag)!r}, not an OVF Envelope")
    version = "2" if _ns(root.tag).endswith("/envelope/2") else "1"

    files: dict[str, OvfFile] = {}
    refs = _child(root, "References")
    for f in _children(refs, "File") if refs is not None else []:
        fid = _attr(f, "id")
        if not fid or fid in files:
            raise DescriptorError(f"References: a File has a missing or repeated id ({fid!r})")
        files[fid] = OvfFile(id=fid, href=check_href(_attr(f, "href"), f"File {fid}"),
                             size=_int(_attr(f, "size"), f"File {fid} size"), compression=_attr(f, "compression"),
                             chunk_size=_int(_attr(f, "chunkSize"), f"File {fid} chunkSize"))

    disks: dict[str, OvfDisk] = {}
    networks: list[str] = []
    systems: list[ET.Element] = []
    for section in root:
        name = _local(section.tag)
        if name == "DiskSection":
            for d in _children(section, "Disk"):
                did = _attr(d, "diskId")
                if not did or did in disks:
                    raise DescriptorError(f"DiskSection: a Disk has a missing or repeated diskId ({did!r})")
                ref = _attr(d, "fileRef")
                if ref and ref not in files:
                    raise DescriptorError(f"Disk {did}: fileRef {ref!r} is not in References")
                cap = _int(_attr(d, "capacity"), f"Disk {did} capacity")
                disks[did] = OvfDisk(disk_id=did, file_ref=ref,
                                     capacity_bytes=cap * unit_bytes(_attr(d, "capacityAllocationUnits")),
                                     format_uri=_attr(d, "format"),
                                     populated_size=_int(_attr(d, "populatedSize"), f"Disk {did} populatedSize"))
        elif name == "NetworkSection":
            networks += [_attr(n, "name") for n in _children(section, "Network") if _attr(n, "name")]
        elif name == "VirtualSystem":
            systems.append(section)
        elif name == "VirtualSystemCollection":
            inner = [c for c in section.iter() if _local(c.tag) == "VirtualSystem"]
            raise DescriptorError(f"the package holds a collection of {len(inner)} virtual systems; this agent imports "
                                  "one VM per package")
    if not systems:
        raise DescriptorError("the envelope has no VirtualSystem")
    if len(systems) > 1:
        raise DescriptorError(f"the envelope has {len(systems)} virtual systems; this agent imports one VM per package")
    system = _system(systems[0], disks, files)
    return Envelope(version=version, files=files, disks=disks, networks=networks, system=system)


_CONTROLLER_SUBTYPES = {"lsilogic": "scsi", "lsilogicsas": "scsi", "virtualscsi": "scsi", "buslogic": "scsi",
                        "virtio-scsi": "scsi", "vmware.sata.ahci": "sata", "ahci": "sata", "sata": "sata",
                        "vmware.nvme.controller": "nvme", "nvme": "nvme", "virtio": "virtio", "virtio-blk": "virtio"}


def _system(vs: ET.Element, disks: dict[str, OvfDisk], files: dict[str, OvfFile]) -> OvfSystem:
    sysid = _attr(vs, "id")
    system = OvfSystem(id=sysid, name=_text(vs, "Name") or sysid)
    for section in vs:
        name = _local(section.tag)
        if name == "OperatingSystemSection":
            system.os_id = _int(_attr(section, "id"), "OperatingSystemSection id")
            system.os_type = _attr(section, "osType")
            system.os_description = _text(section, "Description")
        elif name == "AnnotationSection":
            system.annotation = _text(section, "Annotation")
        elif name == "VirtualHardwareSection":
            _hardware(section, system, disks, files)
        elif name == "ProductSection":
            system.properties += [_attr(p, "key") for p in section.iter() if _local(p.tag) == "Property"]
        elif name == "AgentSection" and _ns(section.tag) == CNA_NS:
            for s in _children(section, "Setting"):
                system.agent_settings[_attr(s, "key")] = _attr(s, "value")
        elif name in ("Name", "Info", "Description"):
            continue
        elif _attr(section, "required", "true").lower() != "false" and _ns(section.tag) != VMW_NS \
                and name not in ("EulaSection", "StartupSection", "InstallSection", "ResourceAllocationSection"):
            system.unknown_required.append(name)
    return system


def _hardware(hw: ET.Element, system: OvfSystem, disks: dict[str, OvfDisk], files: dict[str, OvfFile]) -> None:
    sysel = _child(hw, "System")
    if sysel is not None:
        system.system_types = _text(sysel, "VirtualSystemType").split()
    for cfg in [c for c in hw if _local(c.tag) in ("Config", "ExtraConfig")]:
        system.vmw_config[_attr(cfg, "key")] = _attr(cfg, "value")
    fw = system.vmw_config.get("firmware", "").lower()
    system.firmware = fw if fw in ("bios", "efi") else ""
    system.secure_boot = any(system.vmw_config.get(k, "").lower() == "true"
                             for k in ("uefi.secureBoot.enabled", "bootOptions.efiSecureBootEnabled"))
    items = [c for c in hw if _local(c.tag) in ("Item", "StorageItem", "EthernetPortItem")]
    if len(items) > MAX_ITEMS:
        raise DescriptorError(f"the hardware section has {len(items)} items; at most {MAX_ITEMS} are read")
    seen: set[str] = set()
    for el in items:
        rtype = _int(_text(el, "ResourceType"), "Item ResourceType")
        iid = _text(el, "InstanceID")
        if not iid or iid in seen:
            raise DescriptorError(f"a hardware item ({RESOURCE_NAMES.get(rtype, rtype)}) has a missing or repeated "
                                  f"InstanceID ({iid!r})")
        seen.add(iid)
        sub = _text(el, "ResourceSubType")
        label = _text(el, "ElementName")
        required = _attr(el, "required", "true").lower() != "false"
        host = _text(el, "HostResource")
        if rtype == RT_CPU:
            system.vcpus = _int(_text(el, "VirtualQuantity"), "processor VirtualQuantity")
            cps = _child(el, "CoresPerSocket")
            if cps is not None:
                system.cores_per_socket = _int((cps.text or "").strip(), "CoresPerSocket")
        elif rtype == RT_MEMORY:
            qty = _int(_text(el, "VirtualQuantity"), "memory VirtualQuantity")
            system.memory_mib = qty * unit_bytes(_text(el, "AllocationUnits"), 1 << 20) >> 20
        elif rtype in (RT_IDE, RT_SCSI) or (rtype == RT_OTHER_STORAGE and sub.lower() in _CONTROLLER_SUBTYPES):
            kind = "ide" if rtype == RT_IDE else _CONTROLLER_SUBTYPES.get(sub.lower(), "scsi" if rtype == RT_SCSI else "other")
            system.controllers[iid] = OvfController(instance_id=iid, kind=kind, subtype=sub, name=label)
        elif rtype in (RT_DISK, RT_CDROM, RT_DVD, RT_FLOPPY):
            kind = {RT_DISK: "disk", RT_FLOPPY: "floppy"}.get(rtype, "cdrom")
            disk_id = file_ref = ""
            if host:
                tail = host.split(":", 1)[-1] if host.startswith("ovf:") else host
                if tail.startswith("/disk/"):
                    disk_id = tail[len("/disk/"):]
                    if disk_id not in disks:
                        raise DescriptorError(f"{label or kind} {iid}: HostResource {host!r} names no Disk in DiskSection")
                elif tail.startswith("/file/"):
                    file_ref = tail[len("/file/"):]
                    if file_ref not in files:
                        raise DescriptorError(f"{label or kind} {iid}: HostResource {host!r} names no File in References")
            addr = _text(el, "AddressOnParent")
            system.drives.append(OvfDrive(instance_id=iid, kind=kind, name=label, disk_id=disk_id, file_ref=file_ref,
                                          controller=_text(el, "Parent"), address=_int(addr, "AddressOnParent", -1),
                                          boot_order=_int(_attr(el, "bootOrder"), "bootOrder")))
            if kind == "disk" and not disk_id:
                raise DescriptorError(f"disk drive {label or iid} has no HostResource naming a Disk")
        elif rtype == RT_NIC:
            auto = _text(el, "AutomaticAllocation").lower()
            system.nics.append(OvfNic(instance_id=iid, network=_text(el, "Connection"), subtype=sub,
                                      mac=_text(el, "Address"), connected=auto != "false", name=label))
        else:
            system.others.append(OvfItem(instance_id=iid, resource_type=rtype, subtype=sub, name=label, required=required))
