"""The directories on QEMU's way (cna_agent/qemu_access.py) and the backing chains it walks
(storage/qcow2hdr.py), on real files; the boot of a volume in a datastore subdirectory under an
unprivileged QEMU is tests/e2e/test_storage_boot.py's system-mode run."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

import pytest

from cna_agent.errors import FailedPrecondition
from cna_agent.qemu_access import QemuUser, make_dirs, open_way
from cna_agent.storage.qcow2hdr import backing_chain

QEMU = QemuUser(64055, 64055)  # not the test's own uid: only "other" bits let it through


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_made_directories_are_traversable_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o077)
    try:
        make_dirs(str(tmp_path / "a" / "b" / "c"), below=str(tmp_path))
    finally:
        os.umask(old)
    assert [_mode(tmp_path / p) for p in ("a", "a/b", "a/b/c")] == [0o711] * 3
    with pytest.raises(ValueError):
        make_dirs("/elsewhere/x", below=str(tmp_path))


@pytest.fixture
def open_tmp():
    """A directory whose ancestors QEMU's user can pass (pytest's tmp_path sits in 0700 ones)."""
    d = Path(tempfile.mkdtemp(prefix="qa", dir="/tmp"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_closed_subdirectories_are_opened_and_a_closed_root_is_refused_by_name(open_tmp: Path) -> None:
    root = open_tmp / "ds"
    (root / "vm1" / "disks").mkdir(parents=True)
    for d in (root / "vm1", root / "vm1" / "disks"):
        d.chmod(0o700)
    vol = root / "vm1" / "disks" / "x.qcow2"
    open_way(str(vol), owned_below=str(root), user=QEMU, what="volume 'ds/vm1/disks/x.qcow2'", field="spec.disks[0]")
    assert _mode(root / "vm1") == 0o711 and _mode(root / "vm1" / "disks") == 0o711
    root.chmod(0o700)
    with pytest.raises(FailedPrecondition) as err:
        open_way(str(vol), owned_below=str(root), user=QEMU, what="volume 'ds/vm1/disks/x.qcow2'", field="spec.disks[0]")
    assert f"{root} (mode 0700" in str(err.value) and err.value.field == "spec.disks[0]"
    assert _mode(root) == 0o700  # the datastore root is the admin's: checked, never changed
    open_way(str(vol), owned_below=str(root), user=QemuUser(0, 0), what="v", field="f")  # root QEMU: nothing to do


def test_backing_chain_from_the_headers(tmp_path: Path) -> None:
    def img(name: str, backing: str | None = None) -> Path:
        args = ["qemu-img", "create", "-q", "-f", "qcow2"]
        if backing:
            args += ["-b", backing, "-F", "qcow2"]
        subprocess.run([*args, str(tmp_path / name), "16M"], check=True, timeout=30)
        return tmp_path / name

    (tmp_path / "tpl").mkdir()
    base = img("tpl/base.qcow2")
    mid = img("mid.qcow2", str(base))
    top = img("top.qcow2", "mid.qcow2")  # relative: resolved against the image's directory
    assert backing_chain(str(top)) == [str(mid), str(base)]
    assert backing_chain(str(base)) == []
    raw = tmp_path / "r.raw"
    raw.write_bytes(b"\0" * 4096)
    assert backing_chain(str(raw)) == []


def test_post_copy_is_refused_for_unprivileged_qemu_unless_the_sysctl_allows_userfaultfd(tmp_path) -> None:
    from cna_agent.qemu_access import post_copy_blocker

    knob = tmp_path / "sys" / "vm" / "unprivileged_userfaultfd"
    knob.parent.mkdir(parents=True)
    knob.write_text("0\n")
    why = post_copy_blocker(QemuUser(64055, 64055), proc_root=str(tmp_path))
    assert "vm.unprivileged_userfaultfd is 0" in why and "uid 64055" in why
    assert post_copy_blocker(QemuUser(0, 0), proc_root=str(tmp_path)) == ""  # root may
    assert post_copy_blocker(None, proc_root=str(tmp_path)) == ""  # not known yet: QEMU answers
    knob.write_text("1\n")
    assert post_copy_blocker(QemuUser(64055, 64055), proc_root=str(tmp_path)) == ""
    knob.unlink()  # a kernel without the knob allows it
    assert post_copy_blocker(QemuUser(64055, 64055), proc_root=str(tmp_path)) == ""
