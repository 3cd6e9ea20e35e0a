"""An Envelope (descriptor.py's model) written as an OVF 1.0 descriptor.

OVF 1.0 with rasd/vssd items is what every importer reads (VMware, VirtualBox, oVirt, virt-v2v,
FusionCompute); descriptor.parse reads the result back to the same model, which is what the
round-trip test holds it to. Settings OVF has no item for (machine type, guest OS family,
virtio drivers, guest agent) go in our own section, ovf:required="false", so other readers skip
it; VMware's firmware and Secure Boot keys are written as vmw:Config, which VMware reads too.
"""

from __future__ import annotations

from xml.etree import ElementTree as ET

from cna_agent.ovf.descriptor import (CNA_NS, RT_CDROM, RT_CPU, RT_DISK, RT_FLOPPY, RT_IDE, RT_MEMORY, RT_NIC,
                                      RT_OTHER_STORAGE, RT_SCSI, VMW_NS, Envelope, OvfController)

OVF_NS = "http://schemas.dmtf.org/ovf/envelope/1"
RASD_NS = "http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData"
VSSD_NS = "http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_VirtualSystemSettingData"
STREAM_OPTIMIZED = "http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized"

# ElementTree's prefixes are process-wide: these must not reuse one the domain XML needs ("cna"
# is domxml's metadata namespace; registering it here once renamed it in every rendered domain).
for _p, _u in (("ovf", OVF_NS), ("rasd", RASD_NS), ("vssd", VSSD_NS), ("vmw", VMW_NS), ("cnaovf", CNA_NS)):
    ET.register_namespace(_p, _u)

_RASD_ORDER = ("Address", "AddressOnParent", "AllocationUnits", "AutomaticAllocation", "Connection", "Description",
               "ElementName", "HostResource", "InstanceID", "Parent", "ResourceSubType", "ResourceType",
               "VirtualQuantity")
_CONTROLLER_TYPES = {"ide": (RT_IDE, "PIIX4"), "scsi": (RT_SCSI, "virtio-scsi"), "sata": (RT_OTHER_STORAGE, "vmware.sata.ahci"),
                     "nvme": (RT_OTHER_STORAGE, "vmware.nvme.controller"), "virtio": (RT_OTHER_STORAGE, "virtio")}


def _o(name: str) -> str:
    return f"{{{OVF_NS}}}{name}"


def _sub(parent: ET.Element, ns: str, tag: str, text: str | None = None, /, **attrs: str) -> ET.Element:
    el = ET.SubElement(parent, f"{{{ns}}}{tag}", {(_o(k) if ":" not in k else k): v for k, v in attrs.items()})
    if text is not None:
        el.text = text
    return el


def _item(hw: ET.Element, fields: dict[str, str], *, extra: list[tuple[str, str, str]] | None = None) -> ET.Element:
    item = _sub(hw, OVF_NS, "Item")
    for key in _RASD_ORDER:  # the rasd schema's order (xs:sequence, alphabetical)
        if key in fields:
            _sub(item, RASD_NS, key, fields[key])
    for ns, name, text in extra or []:
        _sub(item, ns, name, text, required="false")
    return item


def controller_kind_resource(kind: str) -> tuple[int, str]:
    return _CONTROLLER_TYPES.get(kind, (RT_OTHER_STORAGE, kind))


def write(env: Envelope) -> bytes:
    """The descriptor's bytes (UTF-8, with an XML declaration)."""
    root = ET.Element(_o("Envelope"))
    refs = _sub(root, OVF_NS, "References")
    for f in env.files.values():
        attrs = {"href": f.href, "id": f.id}
        if f.size:
            attrs["size"] = str(f.size)
        _sub(refs, OVF_NS, "File", **attrs)
    ds = _sub(root, OVF_NS, "DiskSection")
    _sub(ds, OVF_NS, "Info", "Virtual disk information")
    for d in env.disks.values():
        attrs = {"capacity": str(d.capacity_bytes), "capacityAllocationUnits": "byte", "diskId": d.disk_id,
                 "format": d.format_uri or STREAM_OPTIMIZED}
        if d.file_ref:
            attrs["fileRef"] = d.file_ref
        if d.populated_size:
            attrs["populatedSize"] = str(d.populated_size)
        _sub(ds, OVF_NS, "Disk", **attrs)
    ns = _sub(root, OVF_NS, "NetworkSection")
    _sub(ns, OVF_NS, "Info", "The logical networks (port groups) the VM's NICs connect to")
    for net in env.networks:
        n = _sub(ns, OVF_NS, "Network", name=net)
        _sub(n, OVF_NS, "Description", f"port group {net}")

    s = env.system
    vs = _sub(root, OVF_NS, "VirtualSystem", id=s.id)
    _sub(vs, OVF_NS, "Info", "A virtual machine")
    _sub(vs, OVF_NS, "Name", s.name)
    if s.annotation:
        ann = _sub(vs, OVF_NS, "AnnotationSection")
        _sub(ann, OVF_NS, "Info", "A description of the VM")
        _sub(ann, OVF_NS, "Annotation", s.annotation)
    os_attrs = {"id": str(s.os_id)}
    if s.os_type:
        os_attrs[f"{{{VMW_NS}}}osType"] = s.os_type
    oss = _sub(vs, OVF_NS, "OperatingSystemSection", **os_attrs)
    _sub(oss, OVF_NS, "Info", "The guest operating system")
    if s.os_description:
        _sub(oss, OVF_NS, "Description", s.os_description)

    hw = _sub(vs, OVF_NS, "VirtualHardwareSection")
    _sub(hw, OVF_NS, "Info", "Virtual hardware requirements")
    system = _sub(hw, OVF_NS, "System")
    _sub(system, VSSD_NS, "ElementName", "Virtual Hardware Family")
    _sub(system, VSSD_NS, "InstanceID", "0")
    _sub(system, VSSD_NS, "VirtualSystemIdentifier", s.name)
    _sub(system, VSSD_NS, "VirtualSystemType", " ".join(s.system_types) or "vmx-14")
    next_id = 1
    extra = [(VMW_NS, "CoresPerSocket", str(s.cores_per_socket))] if s.cores_per_socket else None
    _item(hw, {"AllocationUnits": "hertz * 10^6", "Description": "Number of virtual CPUs",
               "ElementName": f"{s.vcpus} virtual CPU(s)", "InstanceID": str(next_id), "ResourceType": str(RT_CPU),
               "VirtualQuantity": str(s.vcpus)}, extra=extra)
    next_id += 1
    _item(hw, {"AllocationUnits": "byte * 2^20", "Description": "Memory size", "ElementName": f"{s.memory_mib} MB of memory",
               "InstanceID": str(next_id), "ResourceType": str(RT_MEMORY), "VirtualQuantity": str(s.memory_mib)})
    for c in s.controllers.values():
        _controller(hw, c)
    for d in s.drives:
        rtype = {"disk": RT_DISK, "floppy": RT_FLOPPY}.get(d.kind, RT_CDROM)
        fields = {"ElementName": d.name or d.kind, "InstanceID": d.instance_id, "ResourceType": str(rtype)}
        if d.disk_id:
            fields["HostResource"] = f"ovf:/disk/{d.disk_id}"
        elif d.file_ref:
            fields["HostResource"] = f"ovf:/file/{d.file_ref}"
        if d.controller:
            fields["Parent"] = d.controller
        if d.address >= 0:
            fields["AddressOnParent"] = str(d.address)
        item = _item(hw, fields)
        if d.boot_order:
            item.set(_o("bootOrder"), str(d.boot_order))
    for n in s.nics:
        fields = {"AutomaticAllocation": "true" if n.connected else "false", "Connection": n.network,
                  "ElementName": n.name or "ethernet", "InstanceID": n.instance_id, "ResourceSubType": n.subtype,
                  "ResourceType": str(RT_NIC)}
        if n.mac:
            fields["Address"] = n.mac
        _item(hw, fields)
    for key, value in s.vmw_config.items():
        _sub(hw, VMW_NS, "Config", required="false", **{f"{{{VMW_NS}}}key": key, f"{{{VMW_NS}}}value": value})
    if s.agent_settings:
        sec = _sub(vs, CNA_NS, "AgentSection", required="false")
        _sub(sec, OVF_NS, "Info", "cna-agent settings OVF has no item for")
        for key, value in s.agent_settings.items():
            _sub(sec, CNA_NS, "Setting", **{f"{{{CNA_NS}}}key": key, f"{{{CNA_NS}}}value": value})
    ET.indent(root)
    return ET.tostring(root, encoding="utf-8", xml_declaration=True) + b"\n"


def _controller(hw: ET.Element, c: OvfController) -> None:
    rtype, subtype = controller_kind_resource(c.kind)
    _item(hw, {"Description": f"{c.kind.upper()} controller", "ElementName": c.name or f"{c.kind} controller",
               "InstanceID": c.instance_id, "ResourceSubType": c.subtype or subtype, "ResourceType": str(rtype)})
