"""Host helpers the test-guest builders share: run a command, hash a file, make a FAT disk.

Separate so that tools/build-test-guest.py and its boot-disk builder (guest_boot_disk.py)
run commands the same way (argument lists, a timeout, the command's stderr in the error)
without one importing the other. Standard library only, like the builders.
"""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

__all__ = ["TIMEOUT_APT", "fat_disk", "run", "sha256_file"]

#: Default timeout of run(): apt-get update/download are the slowest commands the builders run.
TIMEOUT_APT = 600


def run(cmd: list[str], *, timeout: float = TIMEOUT_APT, cwd: Path | None = None) -> str:
    """Run a command (argument list, timeout); raise with its stderr so failures are diagnosable."""
    try:
        p = subprocess.run(cmd, cwd=cwd, timeout=timeout, capture_output=True, text=True)
    except subprocess.TimeoutExpired as e:
        raise RuntimeError(f"timed out after {timeout}s: {cmd}") from e
    if p.returncode != 0:
        raise RuntimeError(f"{cmd} failed ({p.returncode}): {p.stderr.strip()[-2000:]}")
    return p.stdout


def sha256_file(p: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks (kernels and disks are large)."""
    h = hashlib.sha256()
    with p.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fat_disk(path: Path, size: int, table: str, start: int, sectors: int, label: str,
             fat_args: tuple[str, ...] = ()) -> str:
    """A new sparse image of ``size`` bytes at ``path``, partitioned by sfdisk from its script
    ``table``, with a FAT file system (``fat_args``: more mkfs.vfat options, e.g. FAT32) made in
    the partition at sector ``start`` (``sectors`` long); returns mtools' name of that file
    system (``path@@offset``). The BIOS, UEFI and Debian disks are all built this way: no loop
    device and no mount, so the builders run in containers and on CI hosts that have neither."""
    path.unlink(missing_ok=True)
    with path.open("wb") as f:
        f.truncate(size)
    p = subprocess.run(["sfdisk", "-q", str(path)], input=table, capture_output=True, text=True, timeout=60)
    if p.returncode != 0:
        raise RuntimeError(f"sfdisk failed: {p.stderr.strip()}")
    run(["mkfs.vfat", "--offset", str(start), "-h", str(start), *fat_args, "-n", label, str(path), str(sectors // 2)],
        timeout=60)
    return f"{path}@@{start * 512}"
