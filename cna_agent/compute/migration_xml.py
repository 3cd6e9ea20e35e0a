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


def _swap(parent: ET.Element, fresh_parent: ET.Element, tag: str, *, anchor: str | None = None) -> None:
    """Make ``parent``'s ``<tag>`` the fresh rendering's, at the same position (removed when the
    rendering has none; added before ``<anchor>``, or first, when only the rendering has one)."""
    old, new = parent.find(tag), fresh_parent.find(tag)
    if old is not None:
        index = list(parent).index(old)
        parent.remove(old)
    else:
        at = parent.find(anchor) if anchor else None
        index = list(parent).index(at) if at is not None else (len(parent) if anchor else 0)
    if new is not None:
        parent.insert(index, copy.deepcopy(new))


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
        # libvirt's order puts them after <vcpu>/<iothreads>: before <os> is valid.
        _swap(dst, new, tag, anchor="os")

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
            _swap(disk, fresh_disks[dev], tag)
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
