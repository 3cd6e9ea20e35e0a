"""[storage.datastores.*] in agent.toml: dir, iSCSI and FC datastores, refused with the key named."""

from __future__ import annotations

import pytest

from cna_agent.config import ConfigError, load_config

GOOD = """
[storage.datastores.local]
type = "dir"
path = "/var/lib/cna/images/"

[storage.datastores.san1]
type = "iscsi"
portals = ["127.0.0.1:3260", "[::1]:3261", "san.example"]
target_iqn = "iqn.2006-08.com.huawei:oceanstor:21::20000:192.0.2.20"
initiator = "kernel"
chap_user = "cna"
chap_secret_file = "/etc/cna-agent/san1.chap"
scan_timeout_s = 5

[storage.datastores.fc1]
type = "fc"
target_wwpns = ["21:00:00:00:00:00:00:01"]
lun_wwns = ["36A8FFBA1005D5A0A0000000000000001"]
"""


def _load(tmp_path, text: str, dropin: str | None = None):
    path = tmp_path / "agent.toml"
    path.write_text(text)
    if dropin is not None:
        (tmp_path / "agent.toml.d").mkdir()
        (tmp_path / "agent.toml.d" / "10-ds.toml").write_text(dropin)
    return load_config(path, environ={})


def test_declarations_load_normalised(tmp_path):
    cfg = _load(tmp_path, GOOD)
    ds = {d.name: d for d in cfg.storage.datastores}
    assert ds["local"].path == "/var/lib/cna/images"
    assert ds["san1"].portal_hosts() == (("127.0.0.1", 3260), ("::1", 3261), ("san.example", 3260))
    assert ds["san1"].initiator == "kernel" and ds["san1"].scan_timeout_s == 5.0
    # WWNs normalised: lower case, colons and the by-id NAA designator "3" dropped
    assert ds["fc1"].target_wwpns == ("2100000000000001",)
    assert ds["fc1"].lun_wwns == ("6a8ffba1005d5a0a0000000000000001",)
    # the effective config prints them back as tables
    assert cfg.to_dict()["storage"]["datastores"]["local"]["type"] == "dir"
    again = tmp_path / "effective.toml"
    again.write_text(cfg.to_toml())
    assert load_config(again, environ={}).storage.datastores == cfg.storage.datastores


def test_dropin_adds_and_replaces_entries(tmp_path):
    cfg = _load(tmp_path, GOOD, '[storage.datastores.local]\ntype = "dir"\npath = "/srv/vols"\n')
    ds = {d.name: d for d in cfg.storage.datastores}
    assert ds["local"].path == "/srv/vols" and "san1" in ds


@pytest.mark.parametrize("table, key_named", [
    ('[storage.datastores.x]\ntype = "nfs"\npath = "/a"', "storage.datastores.x.type"),
    ('[storage.datastores.x]\ntype = "dir"\npath = "rel/dir"', "storage.datastores.x.path"),
    ('[storage.datastores.x]\ntype = "dir"\npath = "/a/../etc"', "storage.datastores.x.path"),
    ('[storage.datastores.x]\ntype = "dir"', "storage.datastores.x.path"),
    ('[storage.datastores.x]\ntype = "dir"\npath = "/a"\ntarget_iqn = "iqn.2020-01.x"', "storage.datastores.x.target_iqn"),
    ('[storage.datastores.x]\ntype = "iscsi"\ntarget_iqn = "iqn.2020-01.x"', "storage.datastores.x.portals"),
    ('[storage.datastores.x]\ntype = "iscsi"\nportals = ["h:99999"]\ntarget_iqn = "iqn.2020-01.x"', "storage.datastores.x.portals[0]"),
    ('[storage.datastores.x]\ntype = "iscsi"\nportals = ["-oProxy=x"]\ntarget_iqn = "iqn.2020-01.x"', "storage.datastores.x.portals[0]"),
    ('[storage.datastores.x]\ntype = "iscsi"\nportals = ["h"]\ntarget_iqn = "IQN bad"', "storage.datastores.x.target_iqn"),
    ('[storage.datastores.x]\ntype = "iscsi"\nportals = ["h"]\ntarget_iqn = "iqn.2020-01.x"\ninitiator = "open"', "storage.datastores.x.initiator"),
    ('[storage.datastores.x]\ntype = "iscsi"\nportals = ["h"]\ntarget_iqn = "iqn.2020-01.x"\nchap_user = "u"', "storage.datastores.x.chap_secret_file"),
    ('[storage.datastores.x]\ntype = "iscsi"\nportals = ["h"]\ntarget_iqn = "iqn.2020-01.x"\nchap_user = "u"\nchap_secret_file = "rel"', "storage.datastores.x.chap_secret_file"),
    ('[storage.datastores.x]\ntype = "fc"', "storage.datastores.x.lun_wwns"),
    ('[storage.datastores.x]\ntype = "fc"\nlun_wwns = ["xyz"]', "storage.datastores.x.lun_wwns[0]"),
    ('[storage.datastores.x]\ntype = "fc"\nlun_wwns = ["6a8ffba1005d5a0a"]\ntarget_wwpns = ["21"]', "storage.datastores.x.target_wwpns[0]"),
    ('[storage.datastores.x]\ntype = "dir"\npath = "/a"\nscan_timeout_s = 0', "storage.datastores.x.scan_timeout_s"),
    ('[storage.datastores."../x"]\ntype = "dir"\npath = "/a"', 'storage.datastores.../x'),
    ('[storage.datastores.x]\ntype = "dir"\npath = "/a"\nflavour = 1', "storage.datastores.x.flavour"),
    ('[storage.datastores.x]\ntype = "fc"\nlun_wwns = "6a8ffba1005d5a0a"', "storage.datastores.x.lun_wwns"),
    ('[storage.datastores.x]\ntype = 3', "storage.datastores.x.type"),
])
def test_bad_declarations_name_the_key_and_file(tmp_path, table, key_named):
    with pytest.raises(ConfigError) as exc:
        _load(tmp_path, table)
    msg = str(exc.value)
    assert key_named in msg, msg
    assert str(tmp_path / "agent.toml") in msg, msg


def test_datastores_cannot_come_from_the_environment(tmp_path):
    (tmp_path / "agent.toml").write_text("")
    with pytest.raises(ConfigError, match="storage.datastores"):
        load_config(tmp_path / "agent.toml", environ={"CNA_AGENT_STORAGE_DATASTORES": "x"})
