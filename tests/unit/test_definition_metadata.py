"""One XMLDesc(INACTIVE) read gives the same spec and marks as libvirt's per-namespace metadata calls."""

from __future__ import annotations

import libvirt

from cna_agent.compute import recycle, template_mark
from cna_agent.compute.inventory import VmInventory
from cna_agent.compute.marks import DefinitionMetadata, read_config_metadata

XML = """<domain type='test'><name>{name}</name><memory>65536</memory><vcpu>1</vcpu>
<os><type arch='x86_64'>hvm</type></os></domain>"""


def test_one_read_equals_the_per_namespace_calls():
    conn = libvirt.open("test:///default")
    libvirt.registerErrorHandler(lambda c, e: None, None)
    dom = conn.defineXML(XML.format(name="meta-one-read"))
    try:
        recycle.write_mark(dom, recycle.RecycleMark(deleted_at=100.0, expires_at=200.0, delete_disks=True))
        template_mark.write_mark(dom, template_mark.TemplateMark(since=5.0))
        dom.setMetadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, "<other a='1'/>", "x", "urn:example:other",
                        libvirt.VIR_DOMAIN_AFFECT_CONFIG)
        one = DefinitionMetadata.read(dom)
        assert one.name() == "meta-one-read"
        for ns in (recycle.RECYCLE_NS, template_mark.TEMPLATE_NS, "urn:example:other", "urn:example:absent"):
            per_call = read_config_metadata(dom, ns)
            assert (one.element(ns) is None) == (per_call is None), ns
        assert recycle.read_mark(one) is not None and recycle.read_mark(one) == recycle.read_mark(dom)
        assert template_mark.read_mark(one) is not None and template_mark.read_mark(one) == template_mark.read_mark(dom)
        # Not an agent VM (no spec element): unmanaged, from the same single read.
        d = VmInventory.read_definition(dom)
        assert (d.name, d.managed, d.spec) == ("meta-one-read", False, None)
    finally:
        dom.undefine()
