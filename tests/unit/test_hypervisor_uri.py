"""How the agent picks its libvirt connection."""

from __future__ import annotations

import os
import socket

import pytest

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


def test_the_seed_turns_namespaces_off_where_a_forked_child_cannot_enter_one(tmp_path):
    """Debian 12's grpcio 1.51 restarts its thread pool in every forked child: libvirt's setns()
    into the guest's mount namespace then fails (forkprobe.py). The seed says so and why."""
    from cna_agent.host.forkprobe import ForkVerdict
    from cna_agent.hypervisor import EMBEDDED_QEMU_CONF, prepare_embedded_root

    def never() -> ForkVerdict:
        raise AssertionError("probed again")

    conf = tmp_path / "lv" / "etc" / "qemu.conf"
    prepare_embedded_root(str(tmp_path / "lv"), probe=lambda: ForkVerdict(True, "fine"))
    text = conf.read_text()
    # libvirt's default (namespaces on) stays, and the verdict is on record
    assert text.startswith(EMBEDDED_QEMU_CONF) and "namespaces = " not in text and text.endswith("kept: fine.\n"), text
    # ...so the next start does not probe again (once per root, not once per start)
    prepare_embedded_root(str(tmp_path / "lv"), probe=never)
    assert conf.read_text() == text

    # An unmodified earlier seed (a version without the probe) is the agent's to rewrite; the probe decides.
    conf.write_text(EMBEDDED_QEMU_CONF)
    prepare_embedded_root(str(tmp_path / "lv"), probe=lambda: ForkVerdict(False, "a forked child has 4 threads"))
    text = conf.read_text()
    assert text.startswith(EMBEDDED_QEMU_CONF) and text.rstrip().endswith("namespaces = []")
    assert "a forked child has 4 threads" in text
    # Now it differs from the plain seed: never probed or rewritten again.
    prepare_embedded_root(str(tmp_path / "lv"), probe=never)
    assert conf.read_text() == text


def test_the_fork_probe_on_this_machine_sees_a_single_threaded_child():
    """The agent's grpc with GRPC_ENABLE_FORK_SUPPORT=0 (cna_agent/__init__.py): a child forked
    next to a running gRPC aio server has one thread and enters a mount namespace, so the
    embedded driver keeps its per-guest /dev here. A grpc upgrade that breaks this fails here."""
    from cna_agent.host.forkprobe import probe_forked_setns

    if os.geteuid() != 0:
        pytest.skip("setns() into a mount namespace needs CAP_SYS_ADMIN")
    verdict = probe_forked_setns()
    assert verdict.grpc_version, verdict  # the probe ran, it did not fall back
    assert (verdict.can_setns, verdict.threads_in_child) == (True, 1), verdict
