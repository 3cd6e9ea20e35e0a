"""How the agent picks its libvirt connection."""

from __future__ import annotations

import socket

from cna_agent import hypervisor
from cna_agent.hypervisor import Hypervisor, choose_uri


def test_configured_uri_wins(tmp_path):
    assert choose_uri("qemu+tcp://h/system", str(tmp_path)) == "qemu+tcp://h/system"


def test_system_when_a_daemon_answers_on_its_socket(tmp_path, monkeypatch):
    path = tmp_path / "virtqemud-sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen()
    try:
        monkeypatch.setattr(hypervisor, "SYSTEM_SOCKETS", (str(tmp_path / "absent"), str(path)))
        assert choose_uri("", "/var/lib/cna-agent") == "qemu:///system"
    finally:
        listener.close()


def test_a_stale_socket_file_is_not_a_daemon(tmp_path, monkeypatch):
    path = tmp_path / "libvirt-sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.close()  # the file stays, nobody listens: a stopped libvirtd
    monkeypatch.setattr(hypervisor, "SYSTEM_SOCKETS", (str(path),))
    assert choose_uri("", "/var/lib/cna-agent").startswith("qemu:///embed?root=")


def test_embedded_under_the_state_dir_otherwise(tmp_path, monkeypatch):
    monkeypatch.setattr(hypervisor, "SYSTEM_SOCKETS", (str(tmp_path / "absent"),))
    uri = choose_uri("", "/var/lib/cna-agent")
    assert uri == "qemu:///embed?root=/var/lib/cna-agent/libvirt"
    assert Hypervisor(uri).mode == "embedded"
    assert Hypervisor("qemu:///system").mode == "system"


def test_embedded_root_gets_a_qemu_conf_once(tmp_path):
    from cna_agent.hypervisor import embedded_root, prepare_embedded_root

    root = embedded_root(f"qemu:///embed?root={tmp_path}/lv")
    assert root == f"{tmp_path}/lv"
    assert embedded_root("qemu:///system") is None
    prepare_embedded_root(root)
    conf = tmp_path / "lv" / "etc" / "qemu.conf"
    assert 'stdio_handler = "file"' in conf.read_text()
    conf.write_text("# the admin's own\n")
    prepare_embedded_root(root)
    assert conf.read_text() == "# the admin's own\n"
