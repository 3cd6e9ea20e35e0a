"""tools/guest_efi_disk.py: the aarch64 test guest's UEFI boot disk, checked from outside with
the partitioning and FAT tools, not by booting it (tests/e2e/test_aarch64_uefi_boot.py boots it).

A stand-in kernel, initramfs and a grub-efi-arm64-signed .deb made here with ``dpkg-deb -b``
keep the test offline and under a second; the layout is what AAVMF needs to find the loader
on a disk with empty NVRAM: a GPT, one EFI System Partition, ``/EFI/BOOT/BOOTAA64.EFI``.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from support.tools import load_tool

for _dep in ("guest_build_util", "guest_boot_disk"):  # what guest_efi_disk imports by name
    load_tool(_dep, f"{_dep}.py")
efi = load_tool("guest_efi_disk", "guest_efi_disk.py")

pytestmark = pytest.mark.skipif(
    any(shutil.which(t) is None for t in ("sfdisk", "mkfs.vfat", "mmd", "mcopy", "mdir", "mtype", "dpkg-deb")),
    reason="needs fdisk, dosfstools, mtools and dpkg-deb")


def _run(*cmd: str) -> str:
    return subprocess.run(list(cmd), check=True, capture_output=True, text=True, timeout=60).stdout


def _fake_grub_deb(tmp: Path) -> Path:
    """A .deb with only the file the builder takes from grub-efi-arm64-signed."""
    root = tmp / "pkg"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN" / "control").write_text(
        "Package: grub-efi-arm64-signed\nVersion: 1\nArchitecture: arm64\nMaintainer: t <t@t>\nDescription: t\n")
    grub = root / efi.EFI_GRUB_PATH
    grub.parent.mkdir(parents=True)
    grub.write_bytes(b"MZ fake signed grub")
    deb = tmp / "grub-efi-arm64-signed_1_arm64.deb"
    _run("dpkg-deb", "--root-owner-group", "-b", str(root), str(deb))
    return deb


@pytest.fixture
def guest(tmp_path: Path) -> tuple[Path, dict, Path]:
    out = tmp_path / "out"
    out.mkdir()
    (out / "vmlinuz").write_bytes(b"kernel" * 1000)
    (out / "initrd.gz").write_bytes(b"initrd" * 1000)
    manifest = {"kernel": str(out / "vmlinuz"), "initrd": str(out / "initrd.gz"), "console": "ttyAMA0",
                "inputs_hash": "0" * 64}
    return out, manifest, _fake_grub_deb(tmp_path)


def test_efi_disk_is_a_gpt_with_one_esp_holding_grub_as_the_removable_media_loader(guest) -> None:
    out, manifest, deb = guest
    disk = efi.build_efi_boot_disk("aarch64", out, manifest, lambda: deb, log=lambda s: None)
    assert disk == out / "disk-efi.raw" and disk.stat().st_size == efi.EFI_DISK_SIZE
    table = json.loads(_run("sfdisk", "-J", str(disk)))["partitiontable"]
    assert table["label"] == "gpt"
    [part] = table["partitions"]
    assert part["type"] == efi.ESP_TYPE_GUID  # gdisk's EF00
    assert (part["start"], part["size"]) == (efi.EFI_PART_START, efi.EFI_PART_SECTORS)
    img = f"{disk}@@{efi.EFI_PART_START * 512}"
    assert "BOOTAA64 EFI" in _run("mdir", "-i", img, "::/EFI/BOOT")
    assert _run("mtype", "-i", img, "::/EFI/BOOT/BOOTAA64.EFI") == "MZ fake signed grub"
    # the signed GRUB's embedded config looks in $prefix (/EFI/debian), then $cmdpath (/EFI/BOOT)
    cfgs = {_run("mtype", "-i", img, f"::/EFI/{d}/grub.cfg") for d in ("debian", "BOOT")}
    assert len(cfgs) == 1
    cfg = cfgs.pop()
    assert "set timeout=0" in cfg and "\nboot" in cfg and "initrd /initrd.gz" in cfg
    assert "linux /vmlinuz console=ttyAMA0 cna.bootsrc=efi-disk panic=-1" in cfg
    assert _run("mtype", "-i", img, "::/vmlinuz") == "kernel" * 1000


def test_efi_disk_is_rebuilt_only_when_an_input_changes(guest) -> None:
    out, manifest, deb = guest
    disk = efi.build_efi_boot_disk("aarch64", out, manifest, lambda: deb, log=lambda s: None)
    first = disk.stat().st_ino
    assert efi.build_efi_boot_disk("aarch64", out, manifest, lambda: deb, log=lambda s: None).stat().st_ino == first
    (out / "initrd.gz").write_bytes(b"other initramfs")
    again = efi.build_efi_boot_disk("aarch64", out, manifest, lambda: deb, log=lambda s: None)
    assert again.stat().st_ino != first  # replaced by a new file, not written in place
    img = f"{again}@@{efi.EFI_PART_START * 512}"
    assert _run("mtype", "-i", img, "::/initrd.gz") == "other initramfs"


def test_efi_disk_is_refused_for_x86_64(guest) -> None:
    out, manifest, deb = guest
    with pytest.raises(RuntimeError, match="only aarch64"):
        efi.build_efi_boot_disk("x86_64", out, manifest, lambda: deb)
