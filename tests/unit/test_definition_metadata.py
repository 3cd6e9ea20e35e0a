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


def test_a_listing_works_out_host_limitations_once_per_definition():
    """host_limitations depends on the spec and the host only: a listing of 1,000 VMs asks the
    builder once per definition, and again after the definition changed."""
    import asyncio

    from cna_agent.compute.spec import VmSpec
    from cna_agent.operations import ResourceLocks
    from support.libvirt import ConnHypervisor

    conn = libvirt.open("test:///default")
    libvirt.registerErrorHandler(lambda c, e: None, None)
    asked: list[str] = []

    def limitations(spec: VmSpec) -> tuple[str, ...]:
        asked.append(spec.name)
        return (f"hyperv: left out of {spec.name}",)

    inventory = VmInventory(ConnHypervisor(conn), ResourceLocks(), limitations=limitations)  # type: ignore[arg-type]
    uuid = conn.lookupByName("test").UUIDString()
    inventory.remember(uuid, VmSpec(name="test", vcpus=1, memory_mib=64))
    for _ in range(3):
        (vm,) = [v for v in asyncio.run(inventory.list()) if v.uuid == uuid]
        assert vm.host_limitations == ("hyperv: left out of test",)
    assert asked == ["test"]
    assert asyncio.run(inventory.list(status_only=True))[0].host_limitations == ()
    inventory.remember(uuid, VmSpec(name="test", vcpus=2, memory_mib=64))
    asyncio.run(inventory.list())
    assert asked == ["test", "test"]
