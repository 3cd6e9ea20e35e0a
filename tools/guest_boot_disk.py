"""The BIOS-bootable boot disk of the test guest: an MBR disk image with SYSLINUX on FAT16.

``disk.raw`` is 64 MiB: SYSLINUX's MBR boot code, one bootable FAT16 partition (40 MiB from
sector 2048) holding the guest's kernel, initramfs and a syslinux.cfg that adds
``cna.bootsrc=disk`` to the command line, and 23 MiB of unpartitioned scratch space at the end.
SeaBIOS boots it, so root-disk tests (a LUN, an imported vmdk, a linked clone) boot the guest
from a disk instead of direct kernel boot.

Separate from tools/build-test-guest.py because it is a different job with different tools
(sfdisk, mkfs.vfat, mcopy, syslinux instead of apt and dpkg-deb): it only consumes the
manifest the guest build returned (kernel, initrd, console, inputs_hash). The script imports
it (and re-exports its names); guest_efi_disk.py (aarch64's UEFI disk) starts from its
fat_disk too. Standard library only.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from guest_build_util import fat_disk, run, sha256_file

__all__ = [
    "BOOT_PART_SECTORS",
    "BOOT_PART_START",
    "DISK_SIZE",
    "SYSLINUX_CFG",
    "SYSLINUX_MBR",
    "build_boot_disk",
    "fat_disk",
    "need_tools",
]

#: MBR (syslinux mbr.bin) + one bootable FAT16 partition at 1 MiB.
DISK_SIZE = 64 * 1024 * 1024
BOOT_PART_START = 2048  # sectors
BOOT_PART_SECTORS = 81920  # 40 MiB
SYSLINUX_MBR = Path("/usr/lib/syslinux/mbr/mbr.bin")
SYSLINUX_CFG = """DEFAULT cna
PROMPT 0
TIMEOUT 0
LABEL cna
  KERNEL vmlinuz
  INITRD initrd.gz
  APPEND console={console} cna.bootsrc=disk
"""


def need_tools(tools: tuple[str, ...]) -> None:
    """Fail with the package hint before a disk build starts, not half-way through it."""
    for tool in tools:
        if shutil.which(tool) is None:
            raise RuntimeError(f"{tool} not found (tools/setup.sh installs syslinux mtools dosfstools fdisk)")


def build_boot_disk(arch: str, out: Path, manifest: dict, log=print) -> Path:
    """A raw disk SeaBIOS boots through SYSLINUX; rebuilt when the kernel/initramfs change.

    No loop devices or mounts (containers and CI hosts often have neither): sfdisk writes the
    partition table into the file, mkfs.vfat/mcopy/syslinux work at a byte offset inside it.
    ``manifest`` is what the guest build returned; its console goes on the kernel command line.
    """
    if arch != "x86_64":
        raise RuntimeError("the boot disk uses SYSLINUX (BIOS); only x86_64 is supported")
    disk = out / "disk.raw"
    stamp = out / "disk.raw.inputs"
    want = hashlib.sha256((manifest["inputs_hash"] + sha256_file(Path(manifest["initrd"]))
                           + SYSLINUX_CFG).encode()).hexdigest()
    with (out / ".lock").open("w") as lockf:
        fcntl.flock(lockf, fcntl.LOCK_EX)
        if disk.exists() and stamp.exists() and stamp.read_text().strip() == want:
            return disk
        need_tools(("sfdisk", "mkfs.vfat", "mcopy", "syslinux"))
        tmp = out / "disk.raw.new"
        table = f"label: dos\nstart={BOOT_PART_START}, size={BOOT_PART_SECTORS}, type=6, bootable\n"
        img = fat_disk(tmp, DISK_SIZE, table, BOOT_PART_START, BOOT_PART_SECTORS, "CNABOOT")
        with tmp.open("r+b") as f:  # boot code only: the partition table after byte 440 stays
            f.write(SYSLINUX_MBR.read_bytes()[:440])
        with tempfile.TemporaryDirectory(prefix="cna-disk-", dir=out) as t:
            cfg = Path(t) / "syslinux.cfg"
            cfg.write_text(SYSLINUX_CFG.format(console=manifest["console"]))
            run(["mcopy", "-i", img, manifest["kernel"], manifest["initrd"], str(cfg), "::/"], timeout=60)
        run(["syslinux", "--offset", str(BOOT_PART_START * 512), "--install", str(tmp)], timeout=60)
        os.replace(tmp, disk)
        stamp.write_text(want + "\n")
        log(f"built {arch} boot disk {disk}")
        return disk
