"""Linux bridges through netlink in a scratch network namespace (the host is never touched):
uplink enslaved, MTU, addresses, up; idempotent; a missing uplink changes nothing; the VLAN
probe answers for this kernel and the answer matches what the kernel really does."""

from __future__ import annotations

import subprocess
import uuid

import pytest

from cna_agent.errors import FailedPrecondition, InvalidArgument
from cna_agent.network.linuxbridge import LinuxBridgeDriver, probe_vlan_support

pytestmark = pytest.mark.needs_root


@pytest.fixture
def netns():
    from pyroute2 import netns as nsmod

    name = f"cna-t-{uuid.uuid4().hex[:8]}"
    nsmod.create(name)
    yield name
    nsmod.remove(name)


def ip(ns: str, *args: str) -> str:
    p = subprocess.run(["ip", "-n", ns, *args], capture_output=True, text=True, timeout=10)
    assert p.returncode == 0, p.stderr
    return p.stdout


def test_bridge_with_uplink_mtu_addresses(netns):
    ip(netns, "link", "add", "up0", "type", "veth", "peer", "name", "up1")
    drv = LinuxBridgeDriver(netns)
    changes = drv.ensure("br-t", uplink="up0", mtu=1400, addresses=("192.0.2.1/24", "2001:db8::1/64"))
    assert changes[0] == "created Linux bridge br-t" and "enslaved uplink up0" in changes
    st = drv.state("br-t")
    assert st.exists and st.up and st.mtu == 1400 and st.ports == ["up0"]
    assert "192.0.2.1/24" in st.addresses and "2001:db8::1/64" in st.addresses
    assert "master br-t" in ip(netns, "link", "show", "up0")
    assert drv.ensure("br-t", uplink="up0", mtu=1400, addresses=("192.0.2.1/24", "2001:db8::1/64")) == []
    ip(netns, "link", "set", "br-t", "down")
    assert drv.ensure("br-t", uplink="up0", mtu=1400) == ["brought up"]
    assert drv.delete("br-t") and not drv.state("br-t").exists


def test_missing_uplink_or_non_bridge_changes_nothing(netns):
    drv = LinuxBridgeDriver(netns)
    before = ip(netns, "-o", "link")
    with pytest.raises(InvalidArgument) as err:
        drv.ensure("br-x", uplink="nosuch0")
    assert err.value.field == "bridge.uplink"
    assert ip(netns, "-o", "link") == before
    ip(netns, "link", "add", "dum0", "type", "veth", "peer", "name", "dum1")
    with pytest.raises(FailedPrecondition, match="not a bridge"):
        drv.ensure("dum0")


def test_vlan_probe_matches_the_kernel(netns):
    support = probe_vlan_support()
    ip(netns, "link", "add", "vb0", "type", "bridge")
    p = subprocess.run(["ip", "-n", netns, "link", "add", "link", "vb0", "name", "vb0.5", "type", "vlan", "id", "5"],
                       capture_output=True, text=True, timeout=10)
    assert support.vlan_devices == (p.returncode == 0), p.stderr
    drv = LinuxBridgeDriver(netns)
    if not support.vlan_devices:
        with pytest.raises(FailedPrecondition, match="8021q") as err:
            drv.require_vlans("port_group.vlan")
        assert err.value.field == "port_group.vlan"
    assert probe_vlan_support() is support  # cached
