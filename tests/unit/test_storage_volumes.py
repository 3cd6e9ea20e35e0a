"""Volumes made by the real qemu-img on a directory datastore: formats, sizes, clones, imports.

No daemons; qemu-img and qemu-io run for real on files under tmp_path. Hostile input must be
refused naming the field and leave no file behind (not even a temporary one).
"""

from __future__ import annotations

import hashlib
import os
import subprocess

import pytest

from cna_agent.errors import AlreadyExists, FailedPrecondition, InvalidArgument
from cna_agent.storage import paths
from cna_agent.storage.runner import SubprocessRunner
from cna_agent.storage.volumes import MiB, VolumeManager

EiB = 1024**6


@pytest.fixture()
def vm(tmp_path):
    (tmp_path / "ds").mkdir()
    (tmp_path / "imp").mkdir()
    return VolumeManager({"ds": str(tmp_path / "ds"), "imp": str(tmp_path / "imp")}, SubprocessRunner(), timeout=60)


def _files(root):
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


def _sha(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def _qemu_io(path, fmt, cmd):
    p = subprocess.run(["qemu-io", "-f", fmt, "-c", cmd, path], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    return p.stdout


def test_create_thin_qcow2_and_preallocated_raw(vm):
    q = vm.create(vm.ref("ds", "vm1/root.qcow2", "path"), "qcow2", 64 * MiB)
    assert (q.format, q.virtual_size) == ("qcow2", 64 * MiB)
    assert q.actual_size < 4 * MiB  # thin
    r = vm.create(vm.ref("ds", "vm1/data.raw", "path"), "raw", 8 * MiB, preallocate=True)
    assert r.format == "raw" and r.virtual_size == 8 * MiB
    assert os.stat(r.path).st_blocks * 512 >= 8 * MiB  # fallocated
    assert oct(os.stat(q.path).st_mode & 0o777) == oct(0o600)
    assert {v.id for v in vm.list("ds")} == {"ds/vm1/root.qcow2", "ds/vm1/data.raw"}
    with pytest.raises(AlreadyExists):
        vm.create(vm.ref("ds", "vm1/root.qcow2", "path"), "qcow2", MiB)


@pytest.mark.parametrize("path, fmt, size, field", [
    ("a.qcow2", "qcow2", 0, "size_bytes"),
    ("a.qcow2", "qcow2", EiB, "size_bytes"),
    ("a.raw", "raw", 1000, "size_bytes"),
    ("a.vmdk", "vmdk", MiB, "format"),
    ("a.qcow2", "nbd", MiB, "format"),
    ("a.raw", "qcow2", MiB, "path"),
])
def test_hostile_create_refused_leaving_nothing(vm, tmp_path, path, fmt, size, field):
    with pytest.raises(InvalidArgument) as exc:
        vm.create(vm.ref("ds", path, "path"), fmt, size)
    assert exc.value.field == field
    assert _files(tmp_path / "ds") == []


@pytest.mark.parametrize("rel", ["../imp/x.qcow2", "/etc/x.qcow2", "a/../../x.qcow2", "a\x00.qcow2"])
def test_escaping_paths_refused(vm, tmp_path, rel):
    with pytest.raises(InvalidArgument) as exc:
        vm.ref("ds", rel, "path")
    assert exc.value.field == "path"
    assert _files(tmp_path) == []


def test_resize_grows_and_refuses_shrink(vm):
    ref = vm.ref("ds", "v.qcow2", "path")
    vm.create(ref, "qcow2", 16 * MiB)
    assert vm.resize(ref, 32 * MiB).virtual_size == 32 * MiB
    for size in (32 * MiB, 8 * MiB):
        with pytest.raises(InvalidArgument, match="new_size_bytes.*shrinking is refused"):
            vm.resize(ref, size)
    assert vm.info(ref).virtual_size == 32 * MiB


def test_linked_clone_keeps_template_unchanged(vm):
    tpl = vm.ref("ds", "templates/base.qcow2", "path")
    vm.create(tpl, "qcow2", 16 * MiB)
    _qemu_io(tpl.path, "qcow2", "write -P 0xab 0 1M")
    before = _sha(tpl.path)
    clone = vm.clone(tpl, vm.ref("ds", "vm2/root.qcow2", "path"), linked=True, fmt="", on_progress=lambda p: None)
    assert clone.backing_volume == "ds/templates/base.qcow2"
    assert clone.actual_size < 1 * MiB  # an overlay, not a copy
    assert vm.info(tpl).template and os.stat(tpl.path).st_mode & 0o222 == 0
    _qemu_io(clone.path, "qcow2", "write -P 0xcd 0 64k")
    assert "pattern" not in _qemu_io(clone.path, "qcow2", "read -P 0xcd 0 64k")  # clone sees its write
    _qemu_io(clone.path, "qcow2", "read -P 0xab 64k 64k")  # and the template's data beyond it
    assert _sha(tpl.path) == before
    with pytest.raises(FailedPrecondition, match="linked clone"):
        vm.delete(tpl)
    vm.delete(vm.ref("ds", "vm2/root.qcow2", "path"))
    vm.delete(tpl)
    assert vm.list("ds") == []


def test_full_clone_copies_data_with_progress(vm):
    src = vm.ref("ds", "src.raw", "path")
    vm.create(src, "raw", 8 * MiB)
    _qemu_io(src.path, "raw", "write -P 0x5a 1M 1M")
    seen: list[float] = []
    c = vm.clone(src, vm.ref("ds", "copy.qcow2", "path"), linked=False, fmt="qcow2", on_progress=seen.append)
    assert c.format == "qcow2" and not c.backing_volume
    _qemu_io(c.path, "qcow2", "read -P 0x5a 1M 1M")
    assert seen and seen[-1] == 100.0


@pytest.mark.parametrize("src_fmt", ["vmdk", "vpc", "vhdx", "qcow2", "raw"])
def test_import_converts_and_reports_check(vm, tmp_path, src_fmt):
    raw = tmp_path / "seed.raw"
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(raw), "4M"], check=True, timeout=30)
    _qemu_io(str(raw), "raw", "write -P 0x11 0 512k")
    name = f"disk.{src_fmt}"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", src_fmt, str(raw), str(tmp_path / "imp" / name)], check=True, timeout=60)
    seen: list[float] = []
    got = vm.import_(vm.resolve(f"imp/{name}", "source"), "", vm.ref("ds", "imported.qcow2", "path"), "qcow2", seen.append)
    assert got.format == "qcow2" and got.virtual_size >= 4 * MiB
    assert got.check is not None and got.check.clean
    assert got.check.supported == (src_fmt in ("vmdk", "vhdx", "qcow2"))
    _qemu_io(got.path, "qcow2", "read -P 0x11 0 512k")
    assert seen


def test_import_corrupt_qcow2_refused_without_partial_files(vm, tmp_path):
    bad = tmp_path / "imp" / "bad.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(bad), "4M"], check=True, timeout=30)
    _qemu_io(str(bad), "qcow2", "write 0 64k")
    data = bytearray(bad.read_bytes())
    data[0x30:0x38] = (0x7FFFFFFF00000).to_bytes(8, "big")  # L1 table offset far beyond the file
    bad.write_bytes(bytes(data))
    with pytest.raises(InvalidArgument) as exc:
        vm.import_(vm.resolve("imp/bad.qcow2", "source"), "", vm.ref("ds", "x.qcow2", "path"), "qcow2", lambda p: None)
    assert exc.value.field == "source"
    assert _files(tmp_path / "ds") == []


def test_import_with_backing_file_refused(vm, tmp_path):
    outside = tmp_path / "host-secret.raw"
    outside.write_bytes(b"s" * 4096)
    ov = tmp_path / "imp" / "ov.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(outside), "-F", "raw", str(ov)], check=True, timeout=30)
    with pytest.raises(InvalidArgument, match="backing file"):
        vm.import_(vm.resolve("imp/ov.qcow2", "source"), "", vm.ref("ds", "x.qcow2", "path"), "qcow2", lambda p: None)
    assert _files(tmp_path / "ds") == []


def test_import_unknown_format_refused(vm, tmp_path):
    (tmp_path / "imp" / "x.img").write_bytes(b"\0" * 4096)
    with pytest.raises(InvalidArgument) as exc:
        vm.import_(vm.resolve("imp/x.img", "source"), "qed", vm.ref("ds", "x.qcow2", "path"), "qcow2", lambda p: None)
    assert exc.value.field == "source_format"


def test_failed_conversion_leaves_no_partial_file(vm, tmp_path):
    from cna_agent.storage.runner import CommandError, Result

    class FailsAfterWriting(SubprocessRunner):
        """qemu-img really writes the target, then the command reports failure (e.g. ENOSPC at the end)."""

        def run_progress(self, argv, *, timeout, on_progress):
            super().run_progress(argv, timeout=timeout, on_progress=on_progress)
            raise CommandError(Result(tuple(argv), 1, "", "No space left on device"))

    src = vm.ref("ds", "src.qcow2", "path")
    vm.create(src, "qcow2", 4 * MiB)
    vm.runner = FailsAfterWriting()
    with pytest.raises(FailedPrecondition, match="No space left"):
        vm.clone(src, vm.ref("ds", "sub/copy.qcow2", "path"), linked=False, fmt="qcow2", on_progress=lambda p: None)
    assert _files(tmp_path / "ds") == ["src.qcow2"]


def test_export_to_vpc_and_sweep(vm, tmp_path):
    src = vm.ref("ds", "v.qcow2", "path")
    vm.create(src, "qcow2", 4 * MiB)
    out = vm.export(src, vm.ref("imp", "v.vhd", "path"), "vpc", lambda p: None)
    assert out.format == "vpc" and os.path.isfile(out.path)
    stale = tmp_path / "ds" / f".v.qcow2{paths.TEMP_MARK}dead"
    stale.write_bytes(b"x")
    assert vm.sweep_temp_files() == [str(stale)]
    with pytest.raises(InvalidArgument):
        vm.export(src, vm.ref("imp", "v2.vmdk", "path"), "vhdx", lambda p: None)


def test_import_of_a_vmdk_descriptor_naming_a_host_file_is_refused(vm, tmp_path):
    """A monolithicFlat vmdk is a text descriptor whose extent can name any file: importing it
    would copy that host file into a volume the caller's guest then reads."""
    secret = tmp_path / "host-secret"
    secret.write_bytes(b"root:$6$secret" + bytes(4096 - 14))
    (tmp_path / "imp" / "flat.vmdk").write_text(
        '# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\ncreateType="monolithicFlat"\n\n'
        f'RW 8 FLAT "{secret}" 0\n\nddb.virtualHWVersion = "4"\n')
    with pytest.raises(InvalidArgument, match="monolithicFlat vmdk whose data is in other files") as exc:
        vm.import_(vm.resolve("imp/flat.vmdk", "source"), "", vm.ref("ds", "x.qcow2", "path"), "qcow2", lambda p: None)
    assert exc.value.field == "source"
    assert _files(tmp_path / "ds") == []


def test_an_image_stored_inside_another_file_imports_in_place(vm, tmp_path):
    """The bytes of a streamOptimized vmdk at an offset of a bigger file (a disk inside an OVA)
    convert without being extracted."""
    from cna_agent.contracts import ImageSource

    raw = tmp_path / "seed.raw"
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(raw), "4M"], check=True, timeout=30)
    _qemu_io(str(raw), "raw", "write -P 0x5a 1M 256k")
    vmdk = tmp_path / "d.vmdk"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=streamOptimized", str(raw), str(vmdk)],
                   check=True, timeout=60)
    box = tmp_path / "imp" / "box,with,commas.ova"
    box.write_bytes(b"H" * 1536 + vmdk.read_bytes() + b"T" * 512)
    src = ImageSource(str(box), 1536, vmdk.stat().st_size)
    got = vm.import_source(src, vm.ref("ds", "in/place.qcow2", "path"), "source", "box", lambda p: None)
    assert got.format == "qcow2" and got.virtual_size == 4 * MiB
    cmp = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "qcow2", str(raw), got.path], capture_output=True,
                         text=True, timeout=60)
    assert cmp.returncode == 0, cmp.stdout + cmp.stderr


def test_an_exports_staging_directory_is_swept(vm, tmp_path):
    staging = tmp_path / "ds" / "out" / f".pkg{paths.TEMP_MARK}beef"
    staging.mkdir(parents=True)
    (staging / "pkg-disk1.vmdk").write_bytes(b"x")
    assert str(staging) in vm.sweep_temp_files()
    assert not staging.exists() and (tmp_path / "ds" / "out").is_dir()
