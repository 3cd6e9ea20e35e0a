"""[network] in agent.toml: declared bridges and port groups, refused with the key named."""

from __future__ import annotations

import tomllib

import pytest

from cna_agent.config import ConfigError, load_config

GOOD = """
[network]
ovsdb = "unix:/tmp/x/db.sock"

[network.bridges.br-int]
type = "ovs"
uplink = "eth1"
mtu = 9000
datapath_type = "netdev"

[network.bridges.br-lx]
type = "linux"
addresses = ["192.0.2.1/24"]

[network.port_groups.pg-web]
bridge = "br-int"
vlan = 100
inbound = { average_kbps = 1000, peak_kbps = 2000 }

[network.port_groups.pg-trunk]
bridge = "br-int"
trunk_vlans = [300, 200]
"""


def _load(tmp_path, text: str, dropin: str | None = None):
    path = tmp_path / "agent.toml"
    path.write_text(text)
    if dropin is not None:
        (tmp_path / "agent.toml.d").mkdir()
        (tmp_path / "agent.toml.d" / "10-net.toml").write_text(dropin)
    return load_config(path, environ={})


def test_declarations_load_normalised(tmp_path):
    cfg = _load(tmp_path, GOOD)
    bridges = {b.name: b for b in cfg.network.bridges}
    assert bridges["br-int"].datapath_type == "netdev"
    assert bridges["br-int"].fail_mode == "standalone"  # default filled in for OVS
    assert bridges["br-int"].source == "config"
    assert bridges["br-lx"].fail_mode == "" and bridges["br-lx"].addresses == ("192.0.2.1/24",)
    pgs = {p.name: p for p in cfg.network.port_groups}
    assert pgs["pg-web"].vlan == 100 and pgs["pg-web"].inbound.peak_kbps == 2000
    assert pgs["pg-trunk"].trunk_vlans == (200, 300)


def test_to_toml_round_trips_declarations(tmp_path):
    cfg = _load(tmp_path, GOOD)
    again = tmp_path / "again.toml"
    again.write_text(cfg.to_toml())
    assert tomllib.loads(again.read_text())["network"]["bridges"]["br-int"]["mtu"] == 9000
    assert load_config(again, environ={}).network == cfg.network


def test_dropin_replaces_one_bridge(tmp_path):
    cfg = _load(tmp_path, GOOD, dropin='[network.bridges.br-lx]\ntype = "linux"\nmtu = 1400\n')
    bridges = {b.name: b for b in cfg.network.bridges}
    assert bridges["br-lx"].mtu == 1400 and bridges["br-lx"].addresses == ()
    assert bridges["br-int"].mtu == 9000


@pytest.mark.parametrize("snippet, key, words", [
    ('[network.bridges.br-very-long-name0]\ntype = "ovs"\n', "network.bridges.br-very-long-name0.name", "IFNAMSIZ"),
    ('[network.bridges."br/0"]\n', "network.bridges.br/0.name", "not a valid interface name"),
    ('[network.bridges.br0]\nmtu = 20\n', "network.bridges.br0.mtu", "68..65535"),
    ('[network.bridges.br0]\ntype = "vmware"\n', "network.bridges.br0.type", "ovs"),
    ('[network.bridges.br0]\ndatapath_type = "dpdk"\n', "network.bridges.br0.datapath_type", "netdev"),
    ('[network.bridges.br0]\ntype = "linux"\nfail_mode = "secure"\n', "network.bridges.br0.fail_mode", "Open vSwitch"),
    ('[network.bridges.br0]\naddresses = ["10.0.0.1"]\n', "network.bridges.br0.addresses[0]", "prefix"),
    ('[network.bridges.br0]\nuplink = "eth0"\n[network.bridges.br1]\nuplink = "eth0"\n', "network.bridges.br1.uplink", "already the uplink"),
    ('[network.bridges.br0]\n[network.port_groups.pg]\nbridge = "br0"\nvlan = 4095\n', "network.port_groups.pg.vlan", "4095 is reserved"),
    ('[network.bridges.br0]\n[network.port_groups.pg]\nbridge = "br0"\nvlan = 0\ntrunk_vlans = [10, 5000]\n', "network.port_groups.pg.trunk_vlans[1]", "1..4094"),
    ('[network.bridges.br0]\n[network.port_groups.pg]\nbridge = "br0"\nvlan = 10\ntrunk_vlans = [20]\n', "network.port_groups.pg.trunk_vlans", "not both"),
    ('[network.port_groups.pg]\nbridge = "nope"\n', "network.port_groups.pg.bridge", "unknown bridge 'nope'"),
    ('[network.bridges.br0]\nspeed = 10\n', "network.bridges.br0.speed", "unknown key"),
    ('[network.bridges.br0]\nmtu = "big"\n', "network.bridges.br0.mtu", "expected an integer"),
    ('[network.bridges.br0]\n[network.port_groups.pg]\nbridge = "br0"\ninbound = { peak_kbps = 5 }\n', "network.port_groups.pg.inbound.average_kbps", "required"),
    ('[network]\novsdb = "/run/db.sock"\n', "network.ovsdb", "OVSDB remote"),
])
def test_bad_declarations_name_the_key_and_file(tmp_path, snippet, key, words):
    with pytest.raises(ConfigError) as err:
        _load(tmp_path, snippet)
    text = str(err.value)
    assert key in text and words in text and "agent.toml" in text, text


def test_tables_cannot_come_from_environment(tmp_path):
    path = tmp_path / "agent.toml"
    path.write_text("")
    with pytest.raises(ConfigError, match="network.bridges"):
        load_config(path, environ={"CNA_AGENT_NETWORK_BRIDGES": "x"})
    cfg = load_config(path, environ={"CNA_AGENT_NETWORK_OVSDB": "tcp:127.0.0.1:6640"})
    assert cfg.network.ovsdb == "tcp:127.0.0.1:6640"
