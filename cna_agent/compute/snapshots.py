"""VM snapshots on libvirt, presented as a tree.

* Stopped VM: an *internal* snapshot (qcow2 keeps it inside each disk image); revert and
  delete are libvirt's own. Every disk must be qcow2 (raw images cannot hold one).
* Running VM: an *external, disk-only* snapshot: each writable disk gets a new qcow2 overlay
  next to it (``<disk>.<snapshot>.qcow2``, so it stays inside the disk's datastore), the old
  image becomes its read-only backing file. ``quiesce`` freezes guest filesystems through the
  guest agent first (libvirt's QUIESCE flag); asked without a guest agent channel it is
  refused rather than silently skipped.
* Running VM with ``memory``: RAM and device state as well as the disks, consistent with
  each other. On libvirt 9.0 (this host) the one path that can also be reverted is the
  *internal* active snapshot: QEMU's savevm writes the guest's state into its qcow2 disks (the
  guest is paused for the save; 128 MiB of TCG guest: 0.2 s here) and a revert is loadvm in a
  restarted QEMU, the guest running on from the snapshot. So every writable disk must be a
  qcow2 file, and a VM booting UEFI from a writable NVRAM (pflash) is refused (QEMU cannot
  snapshot a raw pflash; libvirt >= 9.2 refuses internal snapshots with pflash firmware
  outright). Later libvirt reverts external snapshots (below), whose memory goes to a file
  beside the disks and which lift both limits; the agent does not use them here.
* Revert to an external snapshot needs libvirt >= 9.9 (older ones refuse it); on older
  libvirt the agent says so with FAILED_PRECONDITION instead of rewriting chains by hand.
  Deleting an external snapshot that libvirt cannot merge keeps the overlay chain (the data
  is in use) and removes only the snapshot's metadata; the result says which happened.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import libvirt

from cna_agent.compute import domxml as dx
from cna_agent.compute import state as st
from cna_agent.compute.snapshotxml import DomainSnapshot, SnapshotDisk, SnapshotMemory
from cna_agent.errors import FailedPrecondition, InvalidArgument, NotFound

MAX_DESCRIPTION = 1024


@dataclass
class SnapshotInfo:
    name: str
    parent: str = ""
    create_time: int = 0
    description: str = ""
    kind: str = "internal"
    vm_state: str = st.STOPPED
    current: bool = False
    children: list[str] = field(default_factory=list)
    #: RAM and device state are in it (a revert resumes the guest).
    memory: bool = False


def validate_description(text: str) -> None:
    if len(text) > MAX_DESCRIPTION:
        raise InvalidArgument("description", f"at most {MAX_DESCRIPTION} characters")
    if any(ord(c) < 32 and c not in "\t\n" for c in text):
        raise InvalidArgument("description", "must not contain control characters")


def _lookup(dom: libvirt.virDomain, name: str) -> libvirt.virDomainSnapshot:
    try:
        return dom.snapshotLookupByName(name, 0)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN_SNAPSHOT:
            raise NotFound(f"snapshot {name!r} not found", field="snapshot") from None
        raise


def _info(snap: libvirt.virDomainSnapshot) -> SnapshotInfo:
    doc = DomainSnapshot.from_xml(snap.getXMLDesc(0))
    kind = "external" if doc.external else "internal"
    state = doc.state or "shutoff"
    vm_state = {"running": st.RUNNING, "paused": st.PAUSED, "disk-snapshot": st.RUNNING}.get(state, st.STOPPED)
    memory = doc.memory is not None and doc.memory.snapshot in ("internal", "external")
    return SnapshotInfo(name=snap.getName(), parent=doc.parent or "", create_time=doc.creation_time or 0,
                        description=doc.description or "", kind=kind, vm_state=vm_state, current=bool(snap.isCurrent(0)),
                        memory=memory)


def list_tree(dom: libvirt.virDomain) -> list[SnapshotInfo]:
    """All snapshots, parents before children (siblings by creation time)."""
    infos = {s.name: s for s in (_info(x) for x in dom.listAllSnapshots(0))}
    for s in infos.values():
        if s.parent in infos:
            infos[s.parent].children.append(s.name)
    for s in infos.values():
        s.children.sort(key=lambda n: (infos[n].create_time, n))
    out: list[SnapshotInfo] = []
    roots = sorted((s for s in infos.values() if s.parent not in infos), key=lambda s: (s.create_time, s.name))
    stack = list(reversed(roots))
    while stack:
        s = stack.pop()
        out.append(s)
        stack.extend(reversed([infos[c] for c in s.children]))
    return out


def _disks(domain: dx.Domain) -> list[tuple[str, str, str, bool]]:
    """(target, source file, driver type, writable disk) for the domain's disks."""
    out = []
    for d in domain.devices.disks if domain.devices else []:
        path = d.source_file or d.source_dev or ""
        writable = (d.device or "disk") == "disk" and not d.readonly and not d.shareable
        out.append((d.target_dev, path, d.driver_type or "raw", writable))
    return out


#: libvirt's errors for a guest agent that is not connected, not answering, or timed out.
_AGENT_ERRORS = {libvirt.VIR_ERR_AGENT_UNRESPONSIVE, getattr(libvirt, "VIR_ERR_AGENT_COMMAND_TIMEOUT", -1),
                 getattr(libvirt, "VIR_ERR_AGENT_UNSYNCED", -1)}


def _has_guest_agent(domain: dx.Domain) -> bool:
    return any(c.target_name == "org.qemu.guest_agent.0" for c in (domain.devices.channels if domain.devices else []))


def _memory_request(domain: dx.Domain, doc: DomainSnapshot, disks: list[tuple[str, str, str, bool]]) -> DomainSnapshot:
    """An internal snapshot of a running VM, RAM included (QEMU savevm): what refuses one is
    said before libvirt is asked."""
    writable = [(t, p, fmt) for t, p, fmt, w in disks if w]
    raw = [t for t, _p, fmt in writable if fmt != "qcow2"]
    if raw:
        raise FailedPrecondition(f"a memory snapshot is kept inside the VM's qcow2 disks on this host (libvirt 9.0: QEMU "
                                 f"savevm); {', '.join(raw)} are not qcow2", field="memory")
    if not writable:
        raise FailedPrecondition("a memory snapshot is kept inside the VM's qcow2 disks on this host (libvirt 9.0: QEMU "
                                 "savevm); the VM has no writable disk", field="memory")
    if domain.os is not None and (domain.os.loader_type == "pflash" or domain.os.nvram):
        raise FailedPrecondition("the VM boots UEFI from a writable NVRAM (pflash), which cannot hold a memory snapshot on "
                                 "this host; take a disk-only snapshot (memory unset)", field="memory")
    doc.memory = SnapshotMemory(snapshot="internal")
    return doc


def request(domain: dx.Domain, name: str, description: str, *, running: bool, memory: bool = False) -> DomainSnapshot:
    """The ``<domainsnapshot>`` :func:`create` asks libvirt for, from the domain's definition.

    Stopped: internal (name and description only; every writable disk must be qcow2).
    Running with ``memory``: internal, RAM included (_memory_request).
    Running: external disk-only, each writable disk with a file or device to a new qcow2
    overlay next to it, every other disk ``snapshot='no'``.
    """
    disks = _disks(domain)
    doc = DomainSnapshot(name=name, description=description or None)
    if memory:
        if not running:
            raise InvalidArgument("memory", "only applies to a running VM (a stopped VM has no RAM to save)")
        return _memory_request(domain, doc, disks)
    if not running:
        raw = [t for t, _p, fmt, w in disks if w and fmt != "qcow2"]
        if raw:
            raise FailedPrecondition(f"internal snapshots need qcow2 disks; {', '.join(raw)} are not qcow2", field="vm")
        return doc
    for target, path, _fmt, writable in disks:
        if not writable or not path:
            doc.disks.append(SnapshotDisk(name=target, snapshot="no"))
            continue
        base = os.path.splitext(path)[0]
        overlay = f"{base}.{name}.qcow2"
        if os.path.exists(overlay):
            raise FailedPrecondition(f"{overlay} already exists; choose another snapshot name", field="name")
        doc.disks.append(SnapshotDisk(name=target, snapshot="external", driver_type="qcow2", source_file=overlay))
    if not doc.external:
        raise FailedPrecondition("the VM has no writable disk to snapshot", field="vm")
    return doc


def create(dom: libvirt.virDomain, name: str, description: str, quiesce: bool, memory: bool = False) -> SnapshotInfo:
    try:
        dom.snapshotLookupByName(name, 0)
        raise FailedPrecondition(f"snapshot {name!r} already exists", field="name")
    except libvirt.libvirtError:
        pass
    domain = dx.Domain.from_xml(dom.XMLDesc(0))
    running = bool(dom.isActive())
    if not running and quiesce:
        raise InvalidArgument("quiesce", "only applies to a running VM (a stopped VM's disks are already quiet)")
    if memory and quiesce:
        raise InvalidArgument("quiesce", "a memory snapshot is consistent by itself (the guest is paused while it is "
                                         "saved); quiesce applies to disk-only snapshots")
    doc = request(domain, name, description, running=running, memory=memory)
    flags = 0
    if running and not memory:
        flags = libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_DISK_ONLY | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_ATOMIC
        if quiesce:
            if not _has_guest_agent(domain):
                raise FailedPrecondition("quiesce needs the guest agent channel (spec.guest_agent)", field="quiesce")
            flags |= libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_QUIESCE
    try:
        snap = dom.snapshotCreateXML(doc.to_xml(pretty=False), flags)
    except libvirt.libvirtError as exc:
        if quiesce and exc.get_error_code() in _AGENT_ERRORS:
            # libvirt freezes through the guest agent before it snapshots, and thaws what it froze
            # before it returns; when the agent does not answer, nothing was frozen or taken.
            raise FailedPrecondition(f"quiesce: the guest agent of vm {domain.name!r} does not answer (is "
                                     f"qemu-guest-agent running in the guest?), so its filesystems could not be "
                                     f"frozen; no snapshot was taken and the VM runs on ({exc.get_error_message()})",
                                     field="quiesce") from None
        raise FailedPrecondition(f"libvirt could not take the snapshot: {exc}") from None
    return _info(snap)


def revert(dom: libvirt.virDomain, name: str) -> None:
    snap = _lookup(dom, name)
    if _info(snap).kind == "external":
        if libvirt.getVersion() < 9_009_000:
            raise FailedPrecondition("reverting to an external (live, disk-only) snapshot needs libvirt >= 9.9 on this host",
                                     field="snapshot")
        if dom.isActive():
            raise FailedPrecondition("stop the VM before reverting to an external snapshot", field="vm")
    try:
        dom.revertToSnapshot(snap, 0)
    except libvirt.libvirtError as exc:
        raise FailedPrecondition(f"libvirt could not revert to {name!r}: {exc}") from None


def delete(dom: libvirt.virDomain, name: str) -> str:
    """Delete a snapshot; returns "deleted" or "metadata-only" (external data kept in use)."""
    snap = _lookup(dom, name)
    try:
        snap.delete(0)
        return "deleted"
    except libvirt.libvirtError as exc:
        if _info(snap).kind != "external":
            raise FailedPrecondition(f"libvirt could not delete {name!r}: {exc}") from None
    snap.delete(libvirt.VIR_DOMAIN_SNAPSHOT_DELETE_METADATA_ONLY)
    return "metadata-only"
