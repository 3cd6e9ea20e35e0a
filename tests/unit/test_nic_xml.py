"""NIC XML as compute renders it for hot-plug (schema-valid, parsed back by the inventory's
reader of the typed model), MAC generation, and the declaration checks of network/model.py."""

from __future__ import annotations

import random
import xml.etree.ElementTree as ET

import pytest

from cna_agent.compute.binder import generate_mac
from cna_agent.compute.inventory import interfaces_of
from cna_agent.compute.nics import _spec_field
from cna_agent.compute.render import interface_xml
from cna_agent.compute.spec import NicSpec, VmSpec
from cna_agent.compute.spec_validation import ValidationContext, check_mac, validate
from cna_agent.contracts import Bandwidth, NicBinding
from cna_agent.errors import InvalidArgument, ResourceBusy
from cna_agent.network.model import BridgeDecl, PortGroupDecl, validate_bridge, validate_port_group
from support.xml import schema_check

OVS = NicBinding(kind="ovs", bridge="br-int", port_group="pg-web", vlan=100, inbound=Bandwidth(8000, 16000, 512))
TRUNK = NicBinding(kind="ovs", bridge="br-int", port_group="pg-trunk", trunk=(200, 300))
LINUX = NicBinding(kind="linux-bridge", bridge="br0", port_group="pg-lan", filter="clean-traffic", mtu=1400)
IFACE_ID = "7f1c0f0e-0000-4000-8000-000000000001"


def _xml(binding: NicBinding, **nic) -> str:
    spec = VmSpec(name="vm", uuid="u", nics=[NicSpec(port_group=binding.port_group, **nic)])
    return interface_xml(spec, 0, binding)


def _parsed(xml: str):
    (nic,) = interfaces_of("u", "vm", True, f"<domain><devices>{xml}</devices></domain>", {})
    return nic


def test_ovs_access_nic_renders_virtualport_vlan_and_bandwidth():
    xml = _xml(OVS, mac="52:54:00:aa:bb:cc", interface_id=IFACE_ID, outbound=Bandwidth(4000))
    el = ET.fromstring(xml)
    assert el.get("type") == "bridge" and el.find("source").get("bridge") == "br-int"
    assert el.find("virtualport").get("type") == "openvswitch"
    assert el.find("virtualport/parameters").get("interfaceid") == IFACE_ID
    assert [t.get("id") for t in el.findall("vlan/tag")] == ["100"] and el.find("vlan").get("trunk") is None
    # kbit/s in the API -> KiB/s in libvirt; the NIC's own limit wins over the port group's.
    assert el.find("bandwidth/inbound").attrib == {"average": "1000", "peak": "2000", "burst": "512"}
    # The outbound limit is enforced by network (nft limit / OpenFlow meter), not libvirt's tc
    # police; the inventory reads it from the spec.
    assert el.find("bandwidth/outbound") is None
    back = _parsed(xml)
    assert (back.mac, back.bridge, back.vlan, back.virtualport, back.interface_id) == ("52:54:00:aa:bb:cc", "br-int", 100, "openvswitch", IFACE_ID)
    assert (back.inbound_kbps, back.outbound_kbps, back.link_up) == (8000, 0, True)
    spec_nic = NicSpec(port_group="pg-web", mac="52:54:00:aa:bb:cc", outbound=Bandwidth(4000), ip_addresses=["192.0.2.7"])
    (nic,) = interfaces_of("u", "vm", True, f"<domain><devices>{xml}</devices></domain>", {}, {spec_nic.mac: spec_nic})
    assert (nic.outbound_kbps, nic.ip_addresses) == (4000, ("192.0.2.7",))


def test_an_agent_plugged_ovs_nic_is_an_ethernet_tap_with_no_bridge_or_vlan():
    xml = _xml(NicBinding(kind="ovs", bridge="br-int", port_group="pg-web", vlan=100, plugged_by="agent"),
               mac="52:54:00:aa:bb:cd", interface_id=IFACE_ID)
    el = ET.fromstring(xml)
    assert el.get("type") == "ethernet" and el.find("source") is None
    assert el.find("virtualport") is None and el.find("vlan") is None
    assert _parsed(xml).type == "ethernet"


def test_trunk_and_linux_bridge_nics():
    xml = _xml(TRUNK, mac="52:54:00:00:00:01", link_down=True)
    el = ET.fromstring(xml)
    assert el.find("vlan").get("trunk") == "yes" and [t.get("id") for t in el.findall("vlan/tag")] == ["200", "300"]
    assert _parsed(xml).trunk == (200, 300) and not _parsed(xml).link_up
    el = ET.fromstring(_xml(LINUX, mac="52:54:00:00:00:02", model="e1000e"))
    assert el.find("virtualport") is None and el.find("vlan") is None
    assert el.find("filterref").get("filter") == "clean-traffic" and el.find("mtu").get("size") == "1400"
    assert el.find("model").get("type") == "e1000e"


def test_an_unknown_nic_model_is_refused_naming_the_requests_field():
    spec = VmSpec(name="vm", vcpus=1, memory_mib=128, nics=[NicSpec(port_group="pg", mac="52:54:00:00:00:03", model="ne2k")])
    with pytest.raises(InvalidArgument) as err:
        validate(spec, ValidationContext(host_arch="x86_64", virt_type="qemu", host_cpus=2))
    assert err.value.field == "spec.nics[0].model"
    # AttachNic reports it against its own request field.
    mapped = _spec_field(err.value, 0)
    assert mapped.field == "nic.model" and mapped.message.startswith("nic.model: ")


def test_the_default_model_is_virtio_and_legacy_windows_gets_e1000e():
    assert ET.fromstring(_xml(LINUX, mac="52:54:00:00:00:04")).find("model").get("type") == "virtio"
    spec = VmSpec(name="w", uuid="u", os_family="windows", virtio_drivers=False,
                  nics=[NicSpec(port_group="pg-lan", mac="52:54:00:00:00:05")])
    assert ET.fromstring(interface_xml(spec, 0, LINUX)).find("model").get("type") == "e1000e"


def test_rendered_nics_validate_against_libvirts_schema(tmp_path):
    nics = "".join(_xml(b, mac=f"52:54:00:00:00:1{i}", interface_id=IFACE_ID) for i, b in enumerate((OVS, TRUNK, LINUX)))
    schema_check(tmp_path, f"<domain type='qemu'><name>n</name><memory>131072</memory><os><type arch='x86_64'>hvm</type></os>"
                       f"<devices>{nics}</devices></domain>", "domain", "d")


def test_generated_macs_avoid_every_taken_one():
    rng = random.Random(7)
    first = generate_mac((), rng=random.Random(7))
    assert first.startswith("52:54:00:")
    # Reserve exactly what the same random stream would produce first: the generator moves on.
    again = generate_mac({first}, rng=rng)
    assert again != first and check_mac(again, "m") == again
    macs: set[str] = set()
    for _ in range(200):
        macs.add(generate_mac(macs))
    assert len(macs) == 200


def test_mac_space_exhaustion_is_reported():
    class Same(random.Random):
        def getrandbits(self, k: int) -> int:
            return 0
    with pytest.raises(ResourceBusy):
        generate_mac({"52:54:00:00:00:00"}, rng=Same())


def test_domain_interfaces_and_macs():
    xml = (f"<domain><devices>{_xml(OVS, mac='52:54:00:00:00:0a')}"
           "<interface type='network'><mac address='52:54:00:00:00:0B'/><source network='default'/></interface></devices></domain>")
    nics = interfaces_of("u", "vm", False, xml, {"52:54:00:00:00:0a": "pg-web"})
    assert {n.mac for n in nics} == {"52:54:00:00:00:0a", "52:54:00:00:00:0b"}
    assert [(n.type, n.port_group) for n in nics] == [("bridge", "pg-web"), ("network", "")]


@pytest.mark.parametrize("mac, words", [("52:54:00:aa:bb", "not a MAC"), ("01:00:5e:00:00:01", "multicast"),
                                        ("00:00:00:00:00:00", "all-zero"), ("52-54-00-aa-bb-cc", "not a MAC")])
def test_bad_macs(mac, words):
    with pytest.raises(InvalidArgument, match=words) as err:
        check_mac(mac, "nic.mac")
    assert err.value.field == "nic.mac"


def test_api_declarations_name_the_field():
    with pytest.raises(InvalidArgument) as err:
        validate_bridge(BridgeDecl(name="br\u00e9" * 5, type="ovs"))
    assert err.value.field == "bridge.name"
    with pytest.raises(InvalidArgument) as err:
        validate_port_group(PortGroupDecl(name="pg", bridge="br0", vlan=4095), {"br0": BridgeDecl(name="br0")})
    assert err.value.field == "port_group.vlan" and "4095 is reserved" in err.value.message
    with pytest.raises(InvalidArgument) as err:
        validate_port_group(PortGroupDecl(name="pg", bridge="br9"), {"br0": BridgeDecl(name="br0")})
    assert err.value.field == "port_group.bridge" and "br0" in err.value.message
    ok = validate_bridge(BridgeDecl(name="br0", type="ovs"))
    assert (ok.datapath_type, ok.fail_mode) == ("system", "standalone")


@pytest.mark.parametrize("addr", ["10.0.0.300", "10.0.0.0/24", "0.0.0.0", "224.0.0.1", "host", ""])
def test_a_nic_address_for_ip_anti_spoofing_is_one_unicast_address(addr):
    spec = VmSpec(name="vm", vcpus=1, memory_mib=128, nics=[NicSpec(port_group="pg", ip_addresses=["10.0.0.5", addr])])
    with pytest.raises(InvalidArgument) as err:
        validate(spec, ValidationContext(host_arch="x86_64", virt_type="qemu", host_cpus=2))
    assert err.value.field == "spec.nics[0].ip_addresses[1]"


def test_nic_addresses_are_normalised_and_sorted():
    spec = VmSpec(name="vm", vcpus=1, memory_mib=128,
                  nics=[NicSpec(port_group="pg", ip_addresses=["2001:DB8::0005", "10.0.0.5"])])
    validate(spec, ValidationContext(host_arch="x86_64", virt_type="qemu", host_cpus=2))
    assert spec.nics[0].ip_addresses == ["10.0.0.5", "2001:db8::5"]
