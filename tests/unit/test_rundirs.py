"""The directories the agent makes for QEMU (compute/rundirs.py), on the real filesystem:
created from nothing with the modes and owners unprivileged QEMU needs, repaired when found
wrong, refused (naming the directory, changing nothing) where the path is not the agent's."""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Iterator

import pytest

from cna_agent.compute.render import RenderContext, qmp_socket_path
from cna_agent.compute.rundirs import QemuRunDirs, QemuUser
from cna_agent.errors import FailedPrecondition

UUID = "6f1c3a52-8d0e-4b7a-9c1d-2e3f4a5b6c7d"
#: Debian's libvirt-qemu:kvm; any uid works for chown as root, the user need not exist.
QEMU = QemuUser(64055, 107)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="chown to QEMU's user needs root")


def _ctx(run_dir: Path, fallback: Path) -> RenderContext:
    return RenderContext(host_arch="x86_64", virt_type="qemu", state_dir="/var/lib/cna-agent", run_dir=str(run_dir),
                         qmp_fallback_dir=str(fallback))


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


@pytest.fixture
def top() -> Iterator[Path]:
    """A short, world-traversable directory standing in for /run (pytest's tmp_path is too deep
    for socket paths under it and sits under 0700 directories)."""
    path = Path(tempfile.mkdtemp(prefix="cnrd-", dir="/tmp"))
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_deep_run_dir_on_a_fresh_host_gets_a_fallback_root_qemu_can_reach(top: Path) -> None:
    run = top / ("r" * 90)  # too deep for sun_path: sockets fall back
    fallback = top / "cna-qmp"
    old = os.umask(0o077)  # the unit's UMask=: a plain mkdir would give 0700
    try:
        QemuRunDirs(_ctx(run, fallback)).prepare(UUID, QEMU)
    finally:
        os.umask(old)
    sock = Path(qmp_socket_path(_ctx(run, fallback), UUID))
    assert sock.parent.parent == fallback
    assert _mode(fallback) == 0o711 and os.lstat(fallback).st_uid == 0
    st = os.lstat(sock.parent)
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (QEMU.uid, QEMU.gid, 0o700)
    assert _mode(run) & 0o111 == 0o111
    assert (run / "vms" / UUID).is_dir() and _mode(run / "vms" / UUID) == 0o700


def test_short_run_dir_keeps_sockets_under_it_and_opens_it_for_qemu(top: Path) -> None:
    run = top / "run"
    run.mkdir(mode=0o700)
    dirs = QemuRunDirs(_ctx(run, top / "unused"))
    dirs.prepare(UUID, QEMU)
    assert _mode(run) == 0o711
    st = os.lstat(run / "qmp")
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (QEMU.uid, 0o700)
    assert not (top / "unused").exists()


def test_wrong_fallback_root_and_socket_dir_are_repaired(top: Path) -> None:
    run = top / ("r" * 90)
    fallback = top / "cna-qmp"
    fallback.mkdir()
    os.chmod(fallback, 0o777)
    os.chown(fallback, 1234, 1234)
    sock_dir = Path(qmp_socket_path(_ctx(run, fallback), UUID)).parent
    sock_dir.mkdir()
    os.chmod(sock_dir, 0o755)  # left root-owned and listable, e.g. by an embedded-mode run
    QemuRunDirs(_ctx(run, fallback)).prepare(UUID, QEMU)
    st = os.lstat(fallback)
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, 0, 0o711)
    st = os.lstat(sock_dir)
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (QEMU.uid, QEMU.gid, 0o700)


def test_a_symlinked_fallback_root_is_refused(top: Path) -> None:
    elsewhere = top / "elsewhere"
    elsewhere.mkdir()
    fallback = top / "cna-qmp"
    fallback.symlink_to(elsewhere)
    with pytest.raises(FailedPrecondition, match=f"{fallback} is a symlink") as exc:
        QemuRunDirs(_ctx(top / ("r" * 90), fallback)).prepare(UUID, QEMU)
    assert exc.value.field == "vm"
    assert list(elsewhere.iterdir()) == []


def test_a_closed_directory_the_agent_does_not_own_is_named_and_nothing_is_made(top: Path) -> None:
    closed = top / "closed"
    closed.mkdir()
    os.chmod(closed, 0o700)
    run = closed / "run"
    with pytest.raises(FailedPrecondition) as exc:
        QemuRunDirs(_ctx(run, top / "cna-qmp")).prepare(UUID, QEMU)
    assert f"{closed} (mode 0700" in str(exc.value) and "uid 64055" in str(exc.value)
    assert not run.exists() and _mode(closed) == 0o700


def test_a_directory_qemu_reaches_through_its_group_is_accepted(top: Path) -> None:
    grp = top / "grp"
    grp.mkdir()
    os.chown(grp, 0, QEMU.gid)
    os.chmod(grp, 0o710)
    QemuRunDirs(_ctx(grp / "run", top / "cna-qmp")).prepare(UUID, QEMU)
    assert (grp / "run" / "qmp").is_dir()


def test_embedded_mode_needs_no_opening_up(top: Path) -> None:
    closed = top / "closed"
    closed.mkdir(mode=0o700)
    run = closed / "run"
    QemuRunDirs(_ctx(run, top / "cna-qmp")).prepare(UUID, QemuUser(0, 0))
    st = os.lstat(run / "qmp")
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o700)


def test_remove_forgets_the_vm_only(top: Path) -> None:
    run = top / "run"
    dirs = QemuRunDirs(_ctx(run, top / "cna-qmp"))
    other = "0e6a6b4c-3a62-4c2e-9d7c-8d1b2f9d0a11"
    for uuid in (UUID, other):
        dirs.prepare(uuid, QEMU)
    dirs.remove(UUID)
    assert not (run / "vms" / UUID).exists() and (run / "vms" / other).is_dir()
