"""The anti-spoofing rules network/vifguard.py generates (no daemons): what the nft chain and
the OpenFlow flows of one NIC say, the cookie <-> MAC mapping they are found by again, and the
checks that keep caller data off the command lines. The rules themselves are proven with real
traffic in tests/integration/test_nic_traffic.py."""

from __future__ import annotations

import pytest

from cna_agent.errors import FailedPrecondition
from cna_agent.network.vifguard import (GuardWant, OpenFlowGuard, _flows, _nft_rules, check_want, cookie_of,
                                        mac_of)

VM = "6f1c3a52-8d0e-4b7a-9c1d-2e3f4a5b6c7d"
MAC = "52:54:00:12:34:56"


def test_mac_only_chain_drops_other_sources_and_records_its_policy():
    w = GuardWant(device="vnet3", mac=MAC, vm_uuid=VM)
    (rule,) = _nft_rules(w)
    assert rule.startswith(f"ether saddr != {MAC} counter drop")
    assert f'comment "cna vm={VM} mac={MAC} ips=*"' in rule


def test_ip_chain_allows_declared_addresses_dhcp_and_link_local_only():
    w = GuardWant(device="vnet3", mac=MAC, vm_uuid=VM, ip_check=True, ips=("10.0.0.5", "2001:db8::5"))
    rules = _nft_rules(w)
    assert f"arp saddr ether != {MAC} counter drop" in rules
    assert "arp saddr ip != { 0.0.0.0, 10.0.0.5 } counter drop" in rules
    assert "ip saddr != { 10.0.0.5 } counter drop" in rules
    assert "ip6 saddr != { ::, fe80::/10, 2001:db8::5 } counter drop" in rules
    assert rules[-1] == "meta protocol != { ip, arp, ip6 } counter drop"
    no_ips = _nft_rules(GuardWant(device="vnet3", mac=MAC, vm_uuid=VM, ip_check=True))
    assert "meta protocol ip counter drop" in no_ips  # nothing declared: no IPv4 source passes


def test_outbound_limit_without_anti_spoofing_is_a_limit_only():
    w = GuardWant(device="vnet3", mac=MAC, vm_uuid=VM, mac_check=False, rate_kbps=4000)
    rules = _nft_rules(w)
    assert not any("ether saddr" in r for r in rules)
    assert rules[-1] == "limit rate over 500 kbytes/second burst 50 kbytes counter drop"
    (flow,) = _flows(w, 7)
    assert "in_port=7" in flow and "dl_src" not in flow and flow.endswith("actions=meter:7,NORMAL")


def test_ovs_flows_are_found_again_by_their_cookie():
    w = GuardWant(device="vnet3", mac=MAC, vm_uuid=VM, ip_check=True, ips=("10.0.0.5",))
    flows = _flows(w, 12)
    assert all(f.startswith(f"cookie={cookie_of(MAC):#x},table=0,in_port=12") for f in flows)
    assert flows[0].endswith("priority=40000,actions=drop")
    assert any("ip,nw_src=10.0.0.5" in f and f"dl_src={MAC}" in f for f in flows)
    assert any(f"arp,arp_sha={MAC},arp_spa=10.0.0.5" in f for f in flows)
    assert mac_of(cookie_of(MAC)) == MAC
    state = OpenFlowGuard("/run/openvswitch").expected(w, 12)
    assert state.in_ports == {12} and "10.0.0.5" in state.addresses and state.count == len(flows)


@pytest.mark.parametrize("bad", [
    {"device": "vnet0;rm"}, {"device": "a-very-long-device-name"}, {"mac": "52:54:00:12:34"},
    {"vm_uuid": "x y"}, {"ips": ("10.0.0.300",)},
])
def test_hostile_values_never_reach_a_rule(bad):
    fields = {"device": "vnet0", "mac": MAC, "vm_uuid": VM, **bad}
    with pytest.raises((FailedPrecondition, ValueError)):
        check_want(GuardWant(**fields))
