"""The destination's domain definition for an incoming live migration.

Why not simply render the spec again: a live migration needs a definition whose guest ABI is the
source's (libvirt checks device models, PCI addresses, controller indexes, CPU and NUMA cells),
and a running VM's devices may sit where hot-plug put them, not where a fresh rendering would.
Why not the source's definition as it is: its host-side half belongs to the source (nova's and
KubeVirt's "pinning copied verbatim" bug: the destination's CPUs 4-7 are another VM's). So the
destination renders the spec for *its* host with the typed builder (render.build_domain, its
own placement plan, port and disk bindings) and splices exactly the host-side elements of that
rendering into libvirt's migratable document; everything guest-visible stays the source's:

* ``cputune``, ``numatune``, ``memoryBacking``: the destination's plan (guest NUMA cells in
  ``cpu`` stay, only their host binding moves);
* each disk's ``source`` (and the ``auth`` of a network disk): the destination's binding, the
  disk matched by its guest target;
* each interface: the destination's rendering, matched by MAC, keeping the source's PCI
  address and alias (and no tap name: the destination names its own);
* the agent's host paths: the serial log, the side-channel monitor (``qemu:commandline``) and
  the UEFI variable store, under the destination agent's directories.
"""

from __future__ import annotations

import copy
from xml.etree import ElementTree as ET

from cna_agent.compute import domxml as dx
from cna_agent.errors import FailedPrecondition

QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
#: Top-level elements whose content is the host's, replaced wholesale.
HOST_SIDE = ("cputune", "numatune", "memoryBacking")
#: Children of a device element that identify it to the guest (kept from the source).
GUEST_IDENTITY = ("address", "alias")


def _replace_top(dst: ET.Element, src_fresh: ET.Element, tag: str) -> None:
    """Make ``dst``'s ``<tag>`` the fresh rendering's (or remove it when the rendering has none),
    at the same position."""
    old = dst.find(tag)
    new = src_fresh.find(tag)
    if old is not None:
        index = list(dst).index(old)
        dst.remove(old)
        if new is not None:
            dst.insert(index, copy.deepcopy(new))
    elif new is not None:
        # libvirt's order: after <vcpu>/<iothreads> (cputune) - placing it before <os> is valid.
        anchor = dst.find("os")
        dst.insert(list(dst).index(anchor) if anchor is not None else len(dst), copy.deepcopy(new))


def _with_identity(fresh: ET.Element, source: ET.Element) -> ET.Element:
    out = copy.deepcopy(fresh)
    for tag in GUEST_IDENTITY:
        for old in out.findall(tag):
            out.remove(old)
        kept = source.find(tag)
        if kept is not None:
            out.append(copy.deepcopy(kept))
    return out


def destination_xml(source_xml: str, fresh: dx.Domain) -> str:
    """``source_xml`` (the source's migratable definition) with the host-side parts of
    ``fresh`` (the spec rendered for this host). Raises FailedPrecondition when the two do
    not describe the same devices (the spec and the running VM disagree)."""
    dst = ET.fromstring(source_xml)
    new = fresh.to_element()
    for tag in HOST_SIDE:
        _replace_top(dst, new, tag)

    # OS: the UEFI variable store is under this agent's state directory.
    nvram_new = new.find("os/nvram")
    nvram_old = dst.find("os/nvram")
    if nvram_old is not None and nvram_new is not None:
        nvram_old.text = nvram_new.text

    devices, fresh_devices = dst.find("devices"), new.find("devices")
    if devices is None or fresh_devices is None:
        raise FailedPrecondition("the source definition has no devices", field="vm")
    # Disks by guest target.
    fresh_disks = {d.find("target").get("dev"): d for d in fresh_devices.findall("disk") if d.find("target") is not None}
    for disk in devices.findall("disk"):
        target = disk.find("target")
        dev = target.get("dev") if target is not None else None
        if dev not in fresh_disks:
            raise FailedPrecondition(f"the running VM has a disk {dev!r} its spec does not name", field="vm")
        for tag in ("source", "auth"):
            old, rep = disk.find(tag), fresh_disks[dev].find(tag)
            if old is not None:
                index = list(disk).index(old)
                disk.remove(old)
                if rep is not None:
                    disk.insert(index, copy.deepcopy(rep))
            elif rep is not None:
                disk.insert(0, copy.deepcopy(rep))
        if fresh_disks[dev].get("type"):
            disk.set("type", fresh_disks[dev].get("type"))
    # Interfaces by MAC.
    fresh_nics = {i.find("mac").get("address").lower(): i for i in fresh_devices.findall("interface") if i.find("mac") is not None}
    for nic in devices.findall("interface"):
        mac_el = nic.find("mac")
        mac = mac_el.get("address", "").lower() if mac_el is not None else ""
        if mac not in fresh_nics:
            raise FailedPrecondition(f"the running VM has a NIC {mac!r} its spec does not name", field="vm")
        index = list(devices).index(nic)
        devices.remove(nic)
        devices.insert(index, _with_identity(fresh_nics[mac], nic))
    # Serial log files: this agent's run directory.
    fresh_logs = [s.find("log") for s in fresh_devices.findall("serial")]
    for serial, log in zip(devices.findall("serial"), fresh_logs):
        old = serial.find("log")
        if old is not None and log is not None:
            old.set("file", log.get("file", ""))
    # The side channel: this agent's socket path.
    qtag = f"{{{QEMU_NS}}}commandline"
    old_cmd, new_cmd = dst.find(qtag), new.find(qtag)
    if old_cmd is not None:
        dst.remove(old_cmd)
    if new_cmd is not None:
        dst.append(copy.deepcopy(new_cmd))
    ET.register_namespace("qemu", QEMU_NS)
    return ET.tostring(dst, encoding="unicode")
