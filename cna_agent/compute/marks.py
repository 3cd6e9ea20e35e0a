"""Marks the agent keeps in a domain's persistent definition, as libvirt metadata elements.

Why in the definition and not in the agent's database: a mark (in the recycle bin, hibernated)
says what the VM *is*, and must hold for an agent restarted without its state database, or for
another agent of the same host. Each kind of mark has its own namespace, so setting one never
touches the others or the agent's spec (domxml.CNA_NS).
"""

from __future__ import annotations

import xml.etree.ElementTree as ET

import libvirt


class DefinitionMetadata:
    """Every metadata element of one persistent definition, from ONE libvirt call.

    Reading a VM's spec and its five marks one ``virDomainGetMetadata`` at a time is seven
    calls (``isPersistent`` included), seven RPCs per domain through libvirtd, 7,000 when an
    agent restarted on 1,000 VMs fills its cache; ``virDomainGetXMLDesc(INACTIVE)`` returns
    them all. Passed where a domain is (``read_config_metadata`` reads it instead of asking).
    """

    def __init__(self, name: str, elements: dict[str, str]) -> None:
        self._name = name
        self._elements = elements

    @classmethod
    def read(cls, dom: libvirt.virDomain) -> "DefinitionMetadata":
        """The persistent definition's (a transient domain's: its live one, as libvirt gives
        for INACTIVE; it has no persistent marks to find). Runs in the libvirt pool."""
        return cls.from_xml(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))

    @classmethod
    def from_xml(cls, xml: str) -> "DefinitionMetadata":
        root = ET.fromstring(xml)
        elements: dict[str, str] = {}
        for child in root.iterfind("metadata/*"):
            if child.tag.startswith("{"):
                elements.setdefault(child.tag[1:].split("}", 1)[0], ET.tostring(child, encoding="unicode"))
        return cls(root.findtext("name") or "", elements)

    def name(self) -> str:
        return self._name

    def element(self, namespace: str) -> str | None:
        return self._elements.get(namespace)


def read_config_metadata(dom: libvirt.virDomain | DefinitionMetadata, namespace: str) -> str | None:
    """The element in ``namespace`` of the persistent definition, or None when there is none
    (or the domain is transient). Runs in the libvirt pool."""
    if isinstance(dom, DefinitionMetadata):
        return dom.element(namespace)
    try:
        return dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, namespace, libvirt.VIR_DOMAIN_AFFECT_CONFIG)
    except libvirt.libvirtError:
        return None  # VIR_ERR_NO_DOMAIN_METADATA, or a transient domain


def write_metadata(dom: libvirt.virDomain, namespace: str, key: str, body: str | None, *,
                   live: bool = False) -> None:
    """Set the element (``body``, without a namespace declaration: libvirt adds ``key`` as
    its prefix) or, with None, remove it; removing one that is already gone is done.

    ``live``: in the running domain's definition instead, for a mark about this QEMU process
    that must go with it (guest_agent.py's "qemu-ga answered here")."""
    flags = libvirt.VIR_DOMAIN_AFFECT_LIVE if live else libvirt.VIR_DOMAIN_AFFECT_CONFIG
    try:
        dom.setMetadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, body, key if body is not None else None, namespace, flags)
    except libvirt.libvirtError as exc:
        if body is not None or exc.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN_METADATA:
            raise
