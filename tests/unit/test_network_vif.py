"""NIC XML (rendered, schema-valid, parsed back), MAC generation, and the declaration checks."""

from __future__ import annotations

import random
import shutil
import subprocess
import xml.etree.ElementTree as ET

import pytest

from cna_agent.contracts import Bandwidth, NicBinding
from cna_agent.errors import InvalidArgument, ResourceBusy
from cna_agent.network import vif
from cna_agent.network.model import BridgeDecl, PortGroupDecl, check_mac, validate_bridge, validate_port_group

OVS = NicBinding(kind="ovs", bridge="br-int", port_group="pg-web", vlan=100, inbound=Bandwidth(8000, 16000, 512))
TRUNK = NicBinding(kind="ovs", bridge="br-int", port_group="pg-trunk", trunk=(200, 300))
LINUX = NicBinding(kind="linux-bridge", bridge="br0", port_group="pg-lan", filter="clean-traffic", mtu=1400)


def test_ovs_access_nic_renders_virtualport_vlan_and_bandwidth():
    nic = vif.NicRequest(mac="52:54:00:aa:bb:cc", interface_id="7f1c0f0e-0000-4000-8000-000000000001",
                         outbound=Bandwidth(4000))
    el = ET.fromstring(vif.interface_xml(nic, OVS))
    assert el.get("type") == "bridge" and el.find("source").get("bridge") == "br-int"
    assert el.find("virtualport").get("type") == "openvswitch"
    assert el.find("virtualport/parameters").get("interfaceid") == nic.interface_id
    assert [t.get("id") for t in el.findall("vlan/tag")] == ["100"] and el.find("vlan").get("trunk") is None
    # kbit/s in the API -> KiB/s in libvirt; the NIC's own limit wins over the port group's.
    assert el.find("bandwidth/inbound").attrib == {"average": "1000", "peak": "2000", "burst": "512"}
    assert el.find("bandwidth/outbound").attrib == {"average": "500"}
    back = vif.parse_interface(el)
    assert (back.mac, back.bridge, back.vlan, back.virtualport, back.interface_id) == (nic.mac, "br-int", 100, "openvswitch", nic.interface_id)
    assert (back.inbound_kbps, back.outbound_kbps, back.link_up) == (8000, 4000, True)


def test_trunk_and_linux_bridge_nics():
    el = ET.fromstring(vif.interface_xml(vif.NicRequest(mac="52:54:00:00:00:01", link_down=True), TRUNK))
    assert el.find("vlan").get("trunk") == "yes" and [t.get("id") for t in el.findall("vlan/tag")] == ["200", "300"]
    assert vif.parse_interface(el).trunk == (200, 300) and not vif.parse_interface(el).link_up
    el = ET.fromstring(vif.interface_xml(vif.NicRequest(mac="52:54:00:00:00:02", model="e1000e"), LINUX))
    assert el.find("virtualport") is None and el.find("vlan") is None
    assert el.find("filterref").get("filter") == "clean-traffic" and el.find("mtu").get("size") == "1400"
    assert el.find("model").get("type") == "e1000e"
    with pytest.raises(InvalidArgument, match="nic.model"):
        vif.interface_xml(vif.NicRequest(mac="52:54:00:00:00:03", model="ne2k"), LINUX)


@pytest.mark.skipif(shutil.which("virt-xml-validate") is None, reason="virt-xml-validate (libvirt-clients) not installed")
def test_rendered_nics_validate_against_libvirts_schema(tmp_path):
    nics = "".join(vif.interface_xml(vif.NicRequest(mac=f"52:54:00:00:00:1{i}", interface_id="7f1c0f0e-0000-4000-8000-000000000001"), b)
                   for i, b in enumerate((OVS, TRUNK, LINUX)))
    doc = tmp_path / "d.xml"
    doc.write_text(f"<domain type='qemu'><name>n</name><memory>131072</memory><os><type arch='x86_64'>hvm</type></os>"
                   f"<devices>{nics}</devices></domain>")
    p = subprocess.run(["virt-xml-validate", str(doc), "domain"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr + p.stdout


def test_generated_macs_avoid_every_taken_one():
    rng = random.Random(7)
    first = vif.generate_mac((), rng=random.Random(7))
    assert first.startswith("52:54:00:")
    # Reserve exactly what the same random stream would produce first: the generator moves on.
    again = vif.generate_mac({first}, rng=rng)
    assert again != first and check_mac(again, "m") == again
    macs: set[str] = set()
    for _ in range(200):
        macs.add(vif.generate_mac(macs))
    assert len(macs) == 200


def test_mac_space_exhaustion_is_reported(monkeypatch):
    class Same(random.Random):
        def getrandbits(self, k: int) -> int:
            return 0
    with pytest.raises(ResourceBusy):
        vif.generate_mac({"52:54:00:00:00:00"}, rng=Same())


def test_domain_interfaces_and_macs():
    xml = (f"<domain><devices>{vif.interface_xml(vif.NicRequest(mac='52:54:00:00:00:0a'), OVS)}"
           "<interface type='network'><mac address='52:54:00:00:00:0B'/><source network='default'/></interface></devices></domain>")
    assert vif.domain_macs(xml) == {"52:54:00:00:00:0a", "52:54:00:00:00:0b"}


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
