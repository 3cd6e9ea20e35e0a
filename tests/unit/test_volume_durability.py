"""New volumes reach the disk before their name appears (and the name reaches it too).

qemu-img convert does not flush its target at the end (default cache mode "unsafe"), so a
volume linked into place straight after it could be torn by a host crash although its
operation said "done". The real qemu-img runs here; os.fsync is wrapped to record which file
or directory each flush hit and whether the volume's final name existed at that moment.
"""

from __future__ import annotations

import os
import subprocess

import pytest

from cna_agent.storage import paths
from cna_agent.storage.runner import SubprocessRunner
from cna_agent.storage.volumes import MiB, VolumeManager


@pytest.fixture()
def mgr(tmp_path):
    (tmp_path / "ds").mkdir()
    (tmp_path / "imp").mkdir()
    return VolumeManager({"ds": str(tmp_path / "ds"), "imp": str(tmp_path / "imp")}, SubprocessRunner(), timeout=60)


@pytest.fixture()
def flushes(monkeypatch):
    """Record (path flushed, is it a directory) for every os.fsync; the final target path is
    set by the test so each record also says whether the volume was visible yet."""
    seen: list[tuple[str, bool, bool]] = []
    target: list[str] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        path = os.readlink(f"/proc/self/fd/{fd}")
        seen.append((path, os.path.isdir(path), bool(target) and os.path.exists(target[0])))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return seen, target


def _make(mgr: VolumeManager, how: str, tmp_path) -> paths.VolumeRef:
    if how == "create":
        return mgr.ref("ds", "vm/new.qcow2", "path")
    if how == "clone":
        mgr.create(mgr.ref("ds", "tpl/base.qcow2", "path"), "qcow2", 4 * MiB)
        return mgr.ref("ds", "vm/clone.qcow2", "path")
    src = tmp_path / "imp" / "disk.vmdk"
    subprocess.run(["qemu-img", "create", "-q", "-f", "vmdk", str(src), "8M"], check=True, timeout=60)
    return mgr.ref("ds", "vm/imported.qcow2", "path")


@pytest.mark.parametrize("how", ["create", "clone", "import", "export"])
def test_volume_is_flushed_before_its_name_appears_and_its_directory_after(mgr, flushes, tmp_path, how):
    seen, target = flushes
    dst = _make(mgr, how, tmp_path)
    target.append(dst.path)
    seen.clear()  # only the flushes of the operation under test
    if how == "create":
        mgr.create(dst, "qcow2", 8 * MiB)
    elif how == "clone":
        mgr.clone(mgr.resolve("ds/tpl/base.qcow2", "source"), dst, linked=False, fmt="qcow2", on_progress=lambda p: None)
    elif how == "import":
        mgr.import_(mgr.resolve("imp/disk.vmdk", "source"), "", dst, "qcow2", on_progress=lambda p: None)
    else:
        mgr.create(mgr.ref("ds", "src.qcow2", "path"), "qcow2", 4 * MiB)
        seen.clear()
        dst = mgr.ref("imp", "out.vmdk", "path")
        target[0] = dst.path
        mgr.export(mgr.resolve("ds/src.qcow2", "id"), dst, "vmdk", on_progress=lambda p: None)
    assert os.path.isfile(dst.path)
    parent = os.path.dirname(dst.path)
    files = [(p, visible) for p, is_dir, visible in seen if not is_dir]
    dirs = [(p, visible) for p, is_dir, visible in seen if is_dir]
    # the data was flushed under its temporary name, while the volume was not visible yet ...
    assert files and all(paths.TEMP_MARK in os.path.basename(p) and not visible for p, visible in files), seen
    assert all(os.path.dirname(p) == parent for p, _ in files), seen
    # ... and the directory entry was flushed once the name existed
    assert (parent, True) in dirs, seen
    assert not [f for f in os.listdir(parent) if paths.TEMP_MARK in f]
