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


class _ListingRace:
    """A connection whose listing still holds a domain that was undefined after libvirt
    listed it (a DeleteVm finishing while ListVms reads definitions)."""

    def __init__(self, conn, stale) -> None:
        self._conn = conn
        self._stale = stale

    def getAllDomainStats(self, flags, _flags2):
        assert flags == libvirt.VIR_DOMAIN_STATS_STATE, "the listing must not ask a group that needs QEMU's monitor"
        return [(self._stale, {"state.state": libvirt.VIR_DOMAIN_SHUTOFF, "state.reason": 0})] + \
            self._conn.getAllDomainStats(flags, 0)


def test_a_listing_skips_a_domain_undefined_meanwhile():
    import asyncio

    from cna_agent.operations import ResourceLocks
    from support.libvirt import ConnHypervisor

    conn = libvirt.open("test:///default")
    libvirt.registerErrorHandler(lambda c, e: None, None)
    gone = conn.defineXML(XML.format(name="meta-gone"))
    gone.undefine()
    try:
        VmInventory.read_definition(gone)
        raise AssertionError("a vanished domain must not read as an unmanaged one")
    except libvirt.libvirtError as exc:
        assert exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN
    inventory = VmInventory(ConnHypervisor(_ListingRace(conn, gone)), ResourceLocks())  # type: ignore[arg-type]
    listed = asyncio.run(inventory.list(include_unmanaged=True))
    assert "meta-gone" not in [vm.name for vm in listed]
    assert "test" in [vm.name for vm in listed]  # the test driver's own domain is still there
