"""libvirt domain snapshot XML (``<domainsnapshot>``) as typed objects.

The one description of the snapshot documents the agent sends (snapshotCreateXML) and reads
back (virDomainSnapshotGetXMLDesc), on the field tables of cna_agent/xmlobj.py like the
domain model in domxml.py. Element and attribute names are libvirt's domainsnapshot.rng;
fields are declared in the order libvirt's formatter writes them (the schema itself is an
interleave), so a document libvirt returns is rebuilt in the same order.

Modelled are what the agent reads or writes (name, description, state, parent, creation
time, memory, per-disk snapshot mode with its overlay) and, opaque, the domain definitions
libvirt embeds in what it returns (``<domain>``, ``<inactiveDomain>``) and its save cookie:
kept only so ``build(parse(xml))`` round-trips. Anything that needs the domain a snapshot
holds parses that element with domxml.Domain; this module never reads into it.
"""

from __future__ import annotations

from cna_agent.xmlobj import Child, Children, Opaque, Prop, XmlObject


class SnapshotMemory(XmlObject):
    """``<memory>``: what happened to guest RAM; ``snapshot`` is no, internal or external
    (external names the ``file`` libvirt saved it to)."""

    TAG = "memory"
    snapshot = Prop("@snapshot")
    file = Prop("@file")


class SnapshotDisk(XmlObject):
    """One ``<disks><disk>``: what the snapshot does with one domain disk.

    ``name`` is the disk's target dev (or its source path); ``snapshot`` is no, internal,
    external or manual. An external disk names its new overlay: ``type`` file (the default)
    with ``source_file``, or block with ``source_dev``, and the overlay's format.
    """

    TAG = "disk"
    name = Prop("@name")
    snapshot = Prop("@snapshot")
    type = Prop("@type")
    driver_type = Prop("driver/@type")
    source_file = Prop("source/@file")
    source_dev = Prop("source/@dev")


class DomainSnapshot(XmlObject):
    TAG = "domainsnapshot"
    name = Prop("name")
    description = Prop("description")
    #: The domain's state when taken (libvirt's output only): running, paused, shutoff,
    #: disk-snapshot (an external disk-only snapshot of a running domain), ...
    state = Prop("state")
    #: The parent snapshot's name (libvirt's output only).
    parent = Prop("parent/name")
    #: Seconds since the epoch (libvirt's output only).
    creation_time = Prop("creationTime", "int")
    memory = Child(SnapshotMemory, "memory")
    disks = Children(SnapshotDisk, "disks/disk")
    domain = Opaque("domain")
    inactive_domain = Opaque("inactiveDomain")
    cookie = Opaque("cookie")

    @property
    def external(self) -> bool:
        """Any disk went to a new overlay (an external snapshot), rather than inside its image."""
        return any(d.snapshot == "external" for d in self.disks)
