"""cna-ctl vm define's files (cli/vm.py): one YAML file may hold both the spec and the first-boot
customization, or the customization comes from a file of its own; short enum spellings work,
and a file that is not what it should be is refused naming the file."""

from __future__ import annotations

from pathlib import Path

import pytest

from cna_agent.api import pb
from cna_agent.cli.common import CliError
from cna_agent.cli.vm import load_customization, load_spec

v = pb.vm_pb2

BOTH = """\
spec:
  name: web1
  vcpus: 2
  memory_mib: 1024
  os_family: linux
  guest_agent: true
  nics: [{port_group: pg-web}]
customization:
  hostname: web1.example.org
  users:
    - name: ops
      password_hash: "$6$saltsalt$hash"
      ssh_authorized_keys: ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGq0 ops@vrm"]
      sudo: true
  nics: [{nic_index: 0, addresses: ["192.0.2.10/24"], gateway4: 192.0.2.1}]
"""


def test_one_file_holds_the_spec_and_its_customization(tmp_path: Path) -> None:
    f = tmp_path / "web1.yaml"
    f.write_text(BOTH)
    spec, custom = load_spec(str(f)), load_customization(str(f))
    assert (spec.name, spec.os_family, spec.guest_agent) == ("web1", v.OS_FAMILY_LINUX, True)
    assert custom.hostname == "web1.example.org" and custom.users[0].sudo and custom.users[0].password_hash.startswith("$6$")
    assert list(custom.nics[0].addresses) == ["192.0.2.10/24"] and custom.nics[0].gateway4 == "192.0.2.1"


def test_a_customization_file_of_its_own_and_bad_files_are_named(tmp_path: Path) -> None:
    own = tmp_path / "c.json"
    own.write_text('{"hostname": "h1", "dns_servers": ["192.0.2.53"]}')
    assert load_customization(str(own)).hostname == "h1"
    only = tmp_path / "only-custom.yaml"
    only.write_text("customization:\n  hostname: h1\n")
    with pytest.raises(CliError, match="only-custom.yaml: holds a customization but no spec"):
        load_spec(str(only))
    bad = tmp_path / "bad.json"
    bad.write_text('{"hostname": "h1", "no_such_field": 1}')
    with pytest.raises(CliError, match="bad.json"):
        load_customization(str(bad))
