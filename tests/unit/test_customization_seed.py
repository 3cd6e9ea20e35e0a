"""First-boot customization (compute/customization.py, seed_drive.py, customization_mark.py):
what is refused and naming which field, the NoCloud files cloud-init reads (parsed back with a
YAML parser, as cloud-init does), and the FAT drive made by the real mkfs.vfat and mcopy, read
back with mtools' own mdir/mtype."""

from __future__ import annotations

import email
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from cna_agent.compute import customization as cz
from cna_agent.compute import seed_drive
from cna_agent.compute.customization_mark import CustomizationMark
from cna_agent.compute.first_boot import DONE, FAILED, PENDING, parse_report
from cna_agent.compute.spec import NicSpec, VmSpec
from cna_agent.errors import InvalidArgument

HASH = "$6$rounds=4096$saltsalt$" + "a" * 86
KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGq0vOjH1v7h8u1tA4h7JmQXc2Ykq9b0xqD8zYbq2p3Q ops@vrm"
UNATTEND = ('<?xml version="1.0"?><unattend xmlns="urn:schemas-microsoft-com:unattend">'
            '<settings pass="specialize"/></unattend>')


def _spec(**kw) -> VmSpec:
    base = dict(name="web1", uuid="6f1c3a52-8d0e-4b7a-9c1d-2e3f4a5b6c7d", guest_agent=True,
                nics=[NicSpec(port_group="pg", mac="52:54:00:aa:bb:01"), NicSpec(port_group="pg", mac="52:54:00:aa:bb:02")])
    base.update(kw)
    return VmSpec(**base)


def _full() -> cz.GuestCustomization:
    return cz.GuestCustomization(
        hostname="web1.example.org",
        users=[cz.GuestUser(name="root", password_hash=HASH, ssh_authorized_keys=[KEY]),
               cz.GuestUser(name="ops", password_hash=HASH, ssh_authorized_keys=[KEY], sudo=True)],
        nics=[cz.GuestNicConfig(nic_index=0, addresses=["192.0.2.10/24", "2001:db8::10/64"], gateway4="192.0.2.1",
                                routes=[cz.GuestRoute(to="198.51.100.0/24", via="192.0.2.254")]),
              cz.GuestNicConfig(nic_index=1, dhcp=True)],
        dns_servers=["192.0.2.53"], dns_search=["example.org"])


@pytest.mark.parametrize("change, field", [
    (dict(hostname="-bad"), "customization.hostname"),
    (dict(hostname="a" * 64), "customization.hostname"),
    (dict(users=[cz.GuestUser(name="Bad User")]), "customization.users[0].name"),
    (dict(users=[cz.GuestUser(name="ops", password_hash="secret")]), "customization.users[0].password_hash"),
    (dict(users=[cz.GuestUser(name="ops", ssh_authorized_keys=["ssh-rsa AAAA\nssh-rsa BBBB"])]),
     "customization.users[0].ssh_authorized_keys[0]"),
    (dict(users=[cz.GuestUser(name="ops"), cz.GuestUser(name="ops")]), "customization.users[1].name"),
    (dict(nics=[cz.GuestNicConfig(nic_index=2, dhcp=True)]), "customization.nics[0].nic_index"),
    (dict(nics=[cz.GuestNicConfig(nic_index=0)]), "customization.nics[0].addresses"),
    (dict(nics=[cz.GuestNicConfig(nic_index=0, addresses=["192.0.2.10"])]), "customization.nics[0].addresses[0]"),
    (dict(nics=[cz.GuestNicConfig(nic_index=0, addresses=["192.0.2.10/24"], gateway4="2001:db8::1")]),
     "customization.nics[0].gateway4"),
    (dict(nics=[cz.GuestNicConfig(nic_index=0, addresses=["192.0.2.10/24"], gateway6="2001:db8::1")]),
     "customization.nics[0].gateway6"),
    (dict(nics=[cz.GuestNicConfig(nic_index=0, dhcp=True, routes=[cz.GuestRoute(to="10.0.0.1/8", via="10.0.0.1")])]),
     "customization.nics[0].routes[0].to"),
    (dict(nics=[cz.GuestNicConfig(nic_index=0, dhcp=True)] * 2), "customization.nics[1].nic_index"),
    (dict(dns_servers=["192.0.2.53"]), "customization.dns_servers"),
    (dict(nics=[cz.GuestNicConfig(nic_index=0, dhcp=True)], dns_search=["bad..name"]), "customization.dns_search[0]"),
    (dict(user_data="a\x00b"), "customization.user_data"),
    (dict(windows_unattend_xml=UNATTEND), "customization.windows_unattend_xml"),
    (dict(), "customization"),
])
def test_a_bad_linux_customization_is_refused_naming_its_field(change, field) -> None:
    with pytest.raises(InvalidArgument) as err:
        cz.validate(cz.GuestCustomization(**change), _spec())
    assert err.value.field == field, err.value


@pytest.mark.parametrize("c, field", [
    (cz.GuestCustomization(hostname="w1", windows_unattend_xml=UNATTEND), "customization.hostname"),
    (cz.GuestCustomization(windows_unattend_xml="<unattend>"), "customization.windows_unattend_xml"),
    (cz.GuestCustomization(windows_unattend_xml="<unattend/>"), "customization.windows_unattend_xml"),
    (cz.GuestCustomization(windows_unattend_xml='<!DOCTYPE x [<!ENTITY a "b">]>' + UNATTEND),
     "customization.windows_unattend_xml"),
    (cz.GuestCustomization(users=[cz.GuestUser(name="ops")]), "customization.users"),
])
def test_a_windows_guest_takes_a_valid_answer_file_and_nothing_else(c, field) -> None:
    with pytest.raises(InvalidArgument) as err:
        cz.validate(c, _spec(os_family="windows"))
    assert err.value.field == field, err.value
    cz.validate(cz.GuestCustomization(windows_unattend_xml=UNATTEND), _spec(os_family="windows"))
    assert cz.unattend_files(cz.GuestCustomization(windows_unattend_xml=UNATTEND)) == {"autounattend.xml": UNATTEND.encode()}


def test_nocloud_files_say_what_was_asked_in_the_schema_cloud_init_reads() -> None:
    c, spec = _full(), _spec()
    cz.validate(c, spec)
    files = cz.nocloud_files(c, spec, instance_id=spec.uuid)
    assert set(files) == {"meta-data", "user-data", "network-config"}
    assert yaml.safe_load(files["meta-data"]) == {"instance-id": spec.uuid, "local-hostname": "web1"}
    assert files["user-data"].startswith(b"#cloud-config\n")
    cfg = yaml.safe_load(files["user-data"])
    assert (cfg["hostname"], cfg["fqdn"], cfg["preserve_hostname"]) == ("web1", "web1.example.org", False)
    assert cfg["chpasswd"] == {"expire": False, "list": f"root:{HASH}"}
    assert cfg["ssh_authorized_keys"] == [KEY] and cfg["disable_root"] is False
    (ops,) = cfg["users"]  # root is customized through chpasswd and its keys, not as a new user
    assert ops == {"name": "ops", "shell": "/bin/bash", "lock_passwd": False, "hashed_passwd": HASH,
                   "ssh_authorized_keys": [KEY], "sudo": "ALL=(ALL) NOPASSWD:ALL"}
    # what the first boot wrote stays on later boots, which have no drive
    (keep,) = cfg["write_files"]
    assert keep["path"] == cz.KEEP_NETWORK_PATH and yaml.safe_load(keep["content"]) == {"network": {"config": "disabled"}}
    net = yaml.safe_load(files["network-config"])
    assert net["version"] == 2
    eth0, eth1 = net["ethernets"]["nic0"], net["ethernets"]["nic1"]
    assert eth0["match"] == {"macaddress": "52:54:00:aa:bb:01"} and eth0["set-name"] == "eth0"
    assert eth0["addresses"] == ["192.0.2.10/24", "2001:db8::10/64"] and eth0["gateway4"] == "192.0.2.1"
    assert eth0["routes"] == [{"to": "198.51.100.0/24", "via": "192.0.2.254"}]
    assert eth0["nameservers"] == {"addresses": ["192.0.2.53"], "search": ["example.org"]}
    assert eth1["match"] == {"macaddress": "52:54:00:aa:bb:02"} and eth1["dhcp4"] is True and "addresses" not in eth1


def test_strings_cannot_break_out_of_the_files_and_user_data_rides_along_as_its_own_part() -> None:
    hostile = '#!/bin/sh\necho "x: y"\n'
    c = cz.GuestCustomization(hostname="h1", user_data=hostile,
                              users=[cz.GuestUser(name="ops", ssh_authorized_keys=[KEY + ' "quoted": {x}'])])
    cz.validate(c, _spec())
    files = cz.nocloud_files(c, _spec(), instance_id="iid-1")
    msg = email.message_from_bytes(files["user-data"])
    assert msg.is_multipart()
    parts = [(p.get_content_type(), p.get_payload(decode=True).decode()) for p in msg.get_payload()]
    assert parts[0][0] == "text/cloud-config" and parts[1] == ("text/x-shellscript", hostile)
    agent = yaml.safe_load(parts[0][1])
    assert agent["users"][0]["ssh_authorized_keys"] == [KEY + ' "quoted": {x}'] and set(agent) == {
        "hostname", "preserve_hostname", "users"}
    assert "network-config" not in files  # no NIC asked: the image's own network setup stays
    assert "write_files" not in agent
    config_part = cz.nocloud_files(cz.GuestCustomization(hostname="h1", user_data="#cloud-config\nruncmd: [x]\n"),
                                   _spec(), "i")["user-data"]
    second = email.message_from_bytes(config_part).get_payload()[1]
    assert second.get_content_type() == "text/cloud-config" and second["Merge-Type"].startswith("list(append)")
    assert "users" not in yaml.safe_load(cz.nocloud_files(cz.GuestCustomization(hostname="h1"), _spec(), "i")["user-data"])


@pytest.mark.skipif(not (shutil.which("mkfs.vfat") and shutil.which("mtype")), reason="needs dosfstools and mtools")
def test_the_drive_is_a_labelled_fat_image_holding_the_files_and_only_root_reads_it(tmp_path: Path) -> None:
    files = cz.nocloud_files(_full(), _spec(), instance_id="iid-42")
    path = seed_drive.write_seed(str(tmp_path / "state"), "6f1c3a52-8d0e-4b7a-9c1d-2e3f4a5b6c7d", files,
                                 label=seed_drive.CLOUD_INIT_LABEL, qemu=None)
    assert path == seed_drive.seed_path(str(tmp_path / "state"), "6f1c3a52-8d0e-4b7a-9c1d-2e3f4a5b6c7d")
    assert (Path(path).stat().st_mode & 0o777) == 0o600
    assert sorted(p.name for p in Path(path).parent.iterdir()) == [Path(path).name]  # no work files left
    blkid = subprocess.run(["blkid", "-o", "export", path], capture_output=True, text=True, timeout=30).stdout
    assert "LABEL=CIDATA" in blkid and "TYPE=vfat" in blkid, blkid
    for name, data in files.items():
        got = subprocess.run(["mtype", "-i", path, f"::{name}"], capture_output=True, timeout=30)
        assert got.returncode == 0 and got.stdout == data, name
    assert seed_drive.remove_seed(str(tmp_path / "state"), "6f1c3a52-8d0e-4b7a-9c1d-2e3f4a5b6c7d")
    assert not Path(path).exists()


def test_the_drive_device_is_read_only_virtio_for_linux_and_removable_usb_for_windows() -> None:
    linux = seed_drive.seed_disk("/s/x.img", windows=False).to_xml()
    assert "<readonly" in linux and 'bus="virtio"' in linux and "cna-seed" in linux and 'type="raw"' in linux
    windows = seed_drive.seed_disk("/s/x.img", windows=True).to_xml()
    assert 'bus="usb"' in windows and 'removable="on"' in windows


def test_the_mark_round_trips_and_reports_are_read_as_cloud_init_and_windows_write_them() -> None:
    mark = CustomizationMark("failed", "linux", 1700000000.5, 1700000100.25, 'cloud-init reported: "x"')
    assert CustomizationMark.from_xml(mark.to_xml()) == mark
    assert CustomizationMark.from_xml("<customization state='bogus'/>") is None
    assert parse_report("linux", '{"v1": {"datasource": "DataSourceNoCloud", "errors": []}}') == (DONE, "cloud-init finished")
    state, message = parse_report("linux", '{"v1": {"errors": ["module x failed"]}}')
    assert state == FAILED and "module x failed" in message
    assert parse_report("linux", '{"v1": {"err')[0] == PENDING  # half written
    assert parse_report("windows", "[State]\r\nImageState=IMAGE_STATE_COMPLETE\r\n")[0] == DONE
    assert parse_report("windows", "[State]\r\nImageState=IMAGE_STATE_SPECIALIZE_RESEAL_TO_OOBE\r\n")[0] == PENDING


def test_a_vm_whose_first_boot_is_pending_is_not_moved_off_this_host() -> None:
    from cna_agent.compute.customization_mark import refuse_while_pending
    from cna_agent.errors import FailedPrecondition

    with pytest.raises(FailedPrecondition, match="first-boot customization"):
        refuse_while_pending(CustomizationMark(PENDING, "linux", 1.0), "web1", "migrate")
    refuse_while_pending(CustomizationMark(DONE, "linux", 1.0, 2.0), "web1", "migrate")
    refuse_while_pending(None, "web1", "migrate")
