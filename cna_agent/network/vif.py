"""One VM NIC as libvirt ``<interface>`` XML, parsed back, and collision-free MACs.

Why here: hot-plug (AttachNic) needs the XML of one interface, not a whole domain, and the
reconciler needs to read every VM's interfaces back from libvirt. Compute's domain builder
can render NICs with :func:`interface_xml` too, so a NIC looks the same whether it was
defined with the VM or plugged later.

OVS NICs are ``<interface type='bridge'>`` with ``<virtualport type='openvswitch'>``: libvirt
adds the tap to the bridge and writes iface-id / attached-mac / vm-id into the Interface's
external_ids; ``<vlan>`` becomes the port's tag or trunks. Linux-bridge NICs are the same
without virtualport. ``<bandwidth>`` is libvirt's QoS: tc on the tap for Linux bridges, and
OVS ingress policing + QoS rows for OVS ports.
"""

from __future__ import annotations

import random
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from typing import Iterable

from cna_agent.contracts import Bandwidth, NicBinding
from cna_agent.errors import InvalidArgument, ResourceBusy

MAC_PREFIX = "52:54:00"
NIC_MODELS = ("virtio", "e1000e", "e1000", "rtl8139")


@dataclass(frozen=True)
class NicRequest:
    """What a caller wants for one NIC (NicSpec, minus the port group already bound)."""

    mac: str
    model: str = "virtio"
    link_down: bool = False
    interface_id: str = ""
    inbound: Bandwidth | None = None
    outbound: Bandwidth | None = None
    #: Host tap name; "" lets libvirt pick (vnetN).
    target_dev: str = ""


@dataclass
class VifInfo:
    """One interface as libvirt reports it (live XML of a running domain, or the config)."""

    mac: str
    type: str
    bridge: str = ""
    target_dev: str = ""
    model: str = ""
    virtualport: str = ""
    interface_id: str = ""
    vlan: int | None = None
    trunk: tuple[int, ...] = ()
    link_up: bool = True
    inbound_kbps: int = 0
    outbound_kbps: int = 0
    alias: str = ""
    extra: dict[str, str] = field(default_factory=dict)


def _bandwidth(parent: ET.Element, tag: str, bw: Bandwidth) -> None:
    # libvirt: average/peak in KiB/s, burst in KiB; the API speaks kbit/s.
    el = ET.SubElement(parent, tag, average=str(max(1, bw.average_kbps // 8)))
    if bw.peak_kbps:
        el.set("peak", str(max(1, bw.peak_kbps // 8)))
    if bw.burst_kib:
        el.set("burst", str(bw.burst_kib))


def interface_element(nic: NicRequest, binding: NicBinding) -> ET.Element:
    """The ``<interface>`` element for a NIC bound to a port group."""
    if nic.model not in NIC_MODELS:
        raise InvalidArgument("nic.model", f"{nic.model!r} is not one of {', '.join(NIC_MODELS)}")
    iface = ET.Element("interface", type="bridge")
    ET.SubElement(iface, "mac", address=nic.mac)
    ET.SubElement(iface, "source", bridge=binding.bridge)
    if binding.kind == "ovs":
        vp = ET.SubElement(iface, "virtualport", type="openvswitch")
        if nic.interface_id:
            ET.SubElement(vp, "parameters", interfaceid=nic.interface_id)
    if binding.vlan is not None:
        vlan = ET.SubElement(iface, "vlan")
        ET.SubElement(vlan, "tag", id=str(binding.vlan))
    elif binding.trunk:
        vlan = ET.SubElement(iface, "vlan", trunk="yes")
        for v in binding.trunk:
            ET.SubElement(vlan, "tag", id=str(v))
    if nic.target_dev:
        ET.SubElement(iface, "target", dev=nic.target_dev)
    ET.SubElement(iface, "model", type=nic.model)
    inbound = nic.inbound or binding.inbound
    outbound = nic.outbound or binding.outbound
    if (inbound and inbound.average_kbps) or (outbound and outbound.average_kbps):
        bw = ET.SubElement(iface, "bandwidth")
        if inbound and inbound.average_kbps:
            _bandwidth(bw, "inbound", inbound)
        if outbound and outbound.average_kbps:
            _bandwidth(bw, "outbound", outbound)
    if binding.filter:
        fr = ET.SubElement(iface, "filterref", filter=binding.filter)
        for k, v in sorted(binding.filter_params.items()):
            ET.SubElement(fr, "parameter", name=k, value=v)
    if binding.mtu:
        ET.SubElement(iface, "mtu", size=str(binding.mtu))
    ET.SubElement(iface, "link", state="down" if nic.link_down else "up")
    return iface


def interface_xml(nic: NicRequest, binding: NicBinding) -> str:
    return ET.tostring(interface_element(nic, binding), encoding="unicode")


def parse_interface(el: ET.Element) -> VifInfo:
    mac_el = el.find("mac")
    info = VifInfo(mac=(mac_el.get("address", "") if mac_el is not None else "").lower(), type=el.get("type", ""))
    src = el.find("source")
    if src is not None:
        info.bridge = src.get("bridge", "")
    tgt = el.find("target")
    if tgt is not None:
        info.target_dev = tgt.get("dev", "")
    model = el.find("model")
    if model is not None:
        info.model = model.get("type", "")
    vp = el.find("virtualport")
    if vp is not None:
        info.virtualport = vp.get("type", "")
        params = vp.find("parameters")
        if params is not None:
            info.interface_id = params.get("interfaceid", "")
    vlan = el.find("vlan")
    if vlan is not None:
        tags = tuple(int(t.get("id", "0")) for t in vlan.findall("tag"))
        if vlan.get("trunk") == "yes":
            info.trunk = tags
        elif tags:
            info.vlan = tags[0]
    link = el.find("link")
    info.link_up = link is None or link.get("state", "up") != "down"
    for direction in ("inbound", "outbound"):
        bw = el.find(f"bandwidth/{direction}")
        if bw is not None:
            setattr(info, f"{direction}_kbps", int(bw.get("average", "0")) * 8)
    alias = el.find("alias")
    if alias is not None:
        info.alias = alias.get("name", "")
    return info


def domain_interfaces(domain_xml: str) -> list[VifInfo]:
    root = ET.fromstring(domain_xml)
    return [parse_interface(el) for el in root.findall("./devices/interface")]


def domain_macs(domain_xml: str) -> set[str]:
    return {v.mac for v in domain_interfaces(domain_xml) if v.mac}


def generate_mac(taken: Iterable[str], rng: random.Random | None = None) -> str:
    """A locally administered-looking 52:54:00:xx:xx:xx MAC not in ``taken``.

    ``taken`` is every MAC of every domain on this host (running and defined) plus any the
    caller reserved; 2^24 candidates make a collision unlikely but it is checked anyway.
    """
    used = {m.lower() for m in taken}
    rng = rng or random.SystemRandom()
    for _ in range(1000):
        tail = rng.getrandbits(24)
        mac = f"{MAC_PREFIX}:{tail >> 16 & 0xff:02x}:{tail >> 8 & 0xff:02x}:{tail & 0xff:02x}"
        if mac not in used:
            return mac
    raise ResourceBusy("could not find a free MAC address in 52:54:00:00:00:00/24 after 1000 tries")
