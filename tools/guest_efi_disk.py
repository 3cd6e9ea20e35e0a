"""The UEFI-bootable boot disk of the aarch64 test guest: a GPT image whose EFI System Partition
holds Debian's signed GRUB, a grub.cfg, the guest's kernel and its initramfs.

``disk-efi.raw`` is 64 MiB: a GPT with one EFI System Partition (FAT16, 62 MiB from sector
2048) holding ``/EFI/BOOT/BOOTAA64.EFI`` (the removable-media path AAVMF boots from a disk with
an empty NVRAM), the same ``grub.cfg`` in ``/EFI/debian/`` and ``/EFI/BOOT/`` and the kernel
and initramfs at its root. GRUB boots the kernel with ``cna.bootsrc=efi-disk``, so an aarch64
VM with firmware UEFI and no direct kernel boot shows on its serial log that AAVMF -> GRUB ->
kernel ran, as a TaiShan host boots its guests.

Why Debian's *signed* monolithic GRUB (grub-efi-arm64-signed): it is one self-contained EFI
binary with every module built in (no grub-install, no grub-mkimage and no module tree on the
ESP), for arm64 whatever the build host is, and the binary a real Debian guest boots. Its
embedded config sources ``$prefix/grub.cfg`` (prefix /EFI/debian) or else ``$cmdpath/grub.cfg``,
hence the config in both places.

Separate from guest_boot_disk.py (SYSLINUX, BIOS, x86_64; its fat_disk makes the partitioned FAT
image both disks start from) because the rest differs; the package is fetched by tools/build-test-guest.py's Apt (private apt lists for a foreign architecture),
which hands this module a callable that returns the .deb. Standard library only.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import tempfile
from pathlib import Path
from typing import Callable

from guest_boot_disk import fat_disk, need_tools
from guest_build_util import run, sha256_file

__all__ = [
    "EFI_DISK_SIZE",
    "EFI_GRUB_CFG",
    "EFI_GRUB_PACKAGE",
    "EFI_GRUB_PATH",
    "EFI_PART_SECTORS",
    "EFI_PART_START",
    "ESP_TYPE_GUID",
    "build_efi_boot_disk",
]

#: GPT + one EFI System Partition at 1 MiB; the backup GPT's 33 sectors fit in the last MiB.
EFI_DISK_SIZE = 64 * 1024 * 1024
EFI_PART_START = 2048  # sectors
EFI_PART_SECTORS = 126976  # 62 MiB
ESP_TYPE_GUID = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
EFI_GRUB_PACKAGE = "grub-efi-arm64-signed"
EFI_GRUB_PATH = "usr/lib/grub/arm64-efi-signed/grubaa64.efi.signed"
#: No menu and no wait: GRUB runs these commands in order; ``boot`` starts the kernel.
EFI_GRUB_CFG = """set timeout=0
linux /vmlinuz console={console} cna.bootsrc=efi-disk panic=-1
initrd /initrd.gz
boot
"""
_TOOLS = ("sfdisk", "mkfs.vfat", "mmd", "mcopy", "dpkg-deb")


def build_efi_boot_disk(arch: str, out: Path, manifest: dict, grub_deb: Callable[[], Path], log=print) -> Path:
    """A raw GPT disk AAVMF boots through GRUB; rebuilt when one of its inputs changes.

    ``grub_deb`` returns the grub-efi-arm64-signed .deb (downloaded or cached); it is called
    under the output dir's lock, which the guest build and the BIOS disk take too, so parallel
    test workers fetch and build once. The stamp ``disk-efi.raw.inputs`` hashes the guest's
    inputs, its initramfs, the .deb, the grub.cfg and this file. No loop devices or mounts:
    sfdisk writes the GPT into the file, mkfs.vfat/mmd/mcopy work at the ESP's byte offset.
    """
    if arch != "aarch64":
        raise RuntimeError("the UEFI boot disk carries arm64 GRUB (AAVMF); only aarch64 is supported")
    disk = out / "disk-efi.raw"
    stamp = out / "disk-efi.raw.inputs"
    with (out / ".lock").open("w") as lockf:
        fcntl.flock(lockf, fcntl.LOCK_EX)
        deb = grub_deb()
        want = hashlib.sha256("".join((
            manifest["inputs_hash"], sha256_file(Path(manifest["initrd"])), sha256_file(deb),
            EFI_GRUB_CFG, manifest["console"], sha256_file(Path(__file__)))).encode()).hexdigest()
        if disk.exists() and stamp.exists() and stamp.read_text().strip() == want:
            return disk
        need_tools(_TOOLS)
        tmp = out / "disk-efi.raw.new"
        table = f"label: gpt\nstart={EFI_PART_START}, size={EFI_PART_SECTORS}, type={ESP_TYPE_GUID}, name=ESP\n"
        img = fat_disk(tmp, EFI_DISK_SIZE, table, EFI_PART_START, EFI_PART_SECTORS, "CNAEFI")
        with tempfile.TemporaryDirectory(prefix="cna-efi-", dir=out) as t:
            run(["dpkg-deb", "-x", str(deb), f"{t}/grub"], timeout=120)
            grub = Path(t) / "grub" / EFI_GRUB_PATH
            if not grub.is_file():
                raise RuntimeError(f"{deb.name} has no {EFI_GRUB_PATH}")
            cfg = Path(t) / "grub.cfg"
            cfg.write_text(EFI_GRUB_CFG.format(console=manifest["console"]))
            run(["mmd", "-i", img, "::/EFI", "::/EFI/BOOT", "::/EFI/debian"], timeout=60)
            run(["mcopy", "-i", img, str(grub), "::/EFI/BOOT/BOOTAA64.EFI"], timeout=60)
            for d in ("BOOT", "debian"):
                run(["mcopy", "-i", img, str(cfg), f"::/EFI/{d}/grub.cfg"], timeout=60)
            run(["mcopy", "-i", img, manifest["kernel"], "::/vmlinuz"], timeout=60)
            run(["mcopy", "-i", img, manifest["initrd"], "::/initrd.gz"], timeout=60)
        os.replace(tmp, disk)
        stamp.write_text(want + "\n")
        log(f"built {arch} UEFI boot disk {disk} (GRUB from {deb.name})")
        return disk
