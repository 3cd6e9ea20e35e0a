"""Caller paths stay inside their datastore (CVE-2015-5313), refused with the field named."""

from __future__ import annotations

import os

import pytest

from cna_agent.errors import InvalidArgument, NotFound
from cna_agent.storage import paths


@pytest.fixture()
def roots(tmp_path):
    (tmp_path / "ds").mkdir()
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret.img").write_bytes(b"x")
    (tmp_path / "ds" / "vm1").mkdir()
    (tmp_path / "ds" / "vm1" / "root.qcow2").write_bytes(b"x")
    os.symlink(tmp_path / "outside", tmp_path / "ds" / "escape")
    os.symlink(tmp_path / "outside" / "secret.img", tmp_path / "ds" / "link.img")
    os.symlink("vm1", tmp_path / "ds" / "inner")
    return {"ds": str(tmp_path / "ds")}


def test_resolves_inside(roots):
    ref = paths.resolve(roots, "ds/vm1/root.qcow2", "volume", must_exist=True)
    assert ref.path == os.path.join(os.path.realpath(roots["ds"]), "vm1", "root.qcow2")
    assert ref.id == "ds/vm1/root.qcow2"
    # a symlink that stays inside the datastore is fine
    assert paths.resolve(roots, "ds/inner/root.qcow2", "volume").path == ref.path


@pytest.mark.parametrize("vid", [
    "ds/../outside/secret.img", "ds/vm1/../../outside/secret.img", "ds//etc", "ds/./x", "ds/",
    "/ds/x", "ds//", "ds/a\x00b", "ds/a\nb", "ds/escape/secret.img", "ds/link.img", "ds/escape",
    "ds/" + "a" * 300, "ds/-oformat.img", "nods", "other/x", "ds/x.cna-tmp-1",
])
def test_hostile_paths_are_refused_naming_the_field(roots, vid):
    with pytest.raises(InvalidArgument) as exc:
        paths.resolve(roots, vid, "spec.disks[0].volume")
    assert exc.value.field == "spec.disks[0].volume"
    assert exc.value.message.startswith("spec.disks[0].volume:")


def test_missing_volume_is_not_found(roots):
    with pytest.raises(NotFound):
        paths.resolve(roots, "ds/vm1/none.qcow2", "volume", must_exist=True)
    # but resolving a new name for creation works
    assert paths.resolve(roots, "ds/vm2/new.qcow2", "path").relpath == "vm2/new.qcow2"


HOSTILE_NEW_NAMES = ["$(id).qcow2", "`id`.qcow2", "vm;reboot", "vm<1>", "&xxe;", " ", " lead.qcow2", "a&b'\".qcow2",
                     "evil\u202egpj.qcow2", "<x><y/></x>/a.qcow2", "dir with space/a.qcow2", "a|b.raw", "caf\u00e9.qcow2",
                     ".hidden.qcow2", "ok/-rf.qcow2", "tab\tname.raw"]


@pytest.mark.parametrize("rel", HOSTILE_NEW_NAMES)
def test_new_file_names_follow_the_vm_name_policy(rel):
    from cna_agent.storage.paths import check_new_relpath

    with pytest.raises(InvalidArgument) as err:
        check_new_relpath(rel, "path")
    assert err.value.field == "path"


@pytest.mark.parametrize("rel", ["root.qcow2", "vm1/root.qcow2", "a_b-c.1.raw", "_x/Y9.img"])
def test_well_named_new_files_pass(rel):
    from cna_agent.storage.paths import check_new_relpath

    assert check_new_relpath(rel, "path") == rel


def test_a_hostile_volume_name_is_refused_before_anything_is_created(tmp_path):
    from cna_agent.storage.runner import RecordingRunner
    from cna_agent.storage.volumes import VolumeManager

    root = tmp_path / "ds"
    root.mkdir()
    vm = VolumeManager({"ds": str(root)}, RecordingRunner(), timeout=30)
    for rel in ("$(id).qcow2", "sub dir/x.qcow2"):
        with pytest.raises(InvalidArgument) as err:
            vm.ref("ds", rel, "path")
        assert err.value.field == "path"
    assert list(root.iterdir()) == []
