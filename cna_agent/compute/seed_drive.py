"""The first-boot drive: a small FAT image holding the customization files (customization.py),
attached read-only to a new VM and removed once the guest says it is done (first_boot.py).

Why FAT made by ``mkfs.vfat -C`` and filled by ``mcopy``: both are plain files operations (no
loop device, no mount, nothing the host's kernel must parse), dosfstools and mtools ship on
every target distribution, and both cloud-init (a ``cidata`` label) and Windows Setup (removable
media) read FAT. The image lives in the agent's state directory, 0600, under ``seeds/``: it holds
password hashes and the caller's user data, so only root and (through libvirt's labelling) the
VM's own QEMU read it.

The device: a virtio disk for Linux guests (hot-unpluggable, so it leaves the running guest
when done), a removable USB disk for Windows (Windows Setup reads answer files from removable
media; it needs no driver). Its serial ``cna-seed`` is how the agent finds it again in a
definition, after a restart as well.
"""

from __future__ import annotations

import os
import subprocess
import tempfile

from cna_agent.compute import domxml as dx
from cna_agent.errors import Internal
from cna_agent.qemu_access import QemuUser, make_dirs, open_way

SERIAL = "cna-seed"
CLOUD_INIT_LABEL = "CIDATA"
WINDOWS_LABEL = "UNATTEND"
COMMAND_TIMEOUT_S = 30.0
#: Smallest FAT12 image mkfs.vfat makes comfortably; the files are a few KiB.
MIN_KIB = 1024


def seed_path(state_dir: str, uuid: str) -> str:
    return os.path.join(state_dir, "seeds", f"{uuid}.img")


def _run(argv: list[str]) -> None:
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)
    except FileNotFoundError:
        raise Internal(f"{argv[0]} is not installed (dosfstools and mtools make the first-boot drive)") from None
    except subprocess.TimeoutExpired:
        raise Internal(f"{argv[0]} did not finish in {COMMAND_TIMEOUT_S:.0f} s making the first-boot drive") from None
    if p.returncode != 0:
        raise Internal(f"{' '.join(argv[:2])} failed (exit {p.returncode}): {(p.stderr or p.stdout).strip()[-500:]}")


def write_seed(state_dir: str, uuid: str, files: dict[str, bytes], *, label: str, qemu: QemuUser | None) -> str:
    """Make the drive image for ``uuid`` holding ``files`` (name -> content) and return its
    path. Written beside and renamed into place, so a half-made image is never attached."""
    state = os.path.normpath(state_dir)
    os.makedirs(state, mode=0o700, exist_ok=True)
    seeds = os.path.join(state, "seeds")
    make_dirs(seeds, below=state)
    path = seed_path(state, uuid)
    size_kib = max(MIN_KIB, (sum(len(b) for b in files.values()) * 2) // 1024 + 512)
    size_kib += -size_kib % 64
    with tempfile.TemporaryDirectory(prefix=".seed-", dir=seeds) as work:
        image = os.path.join(work, "seed.img")
        _run(["mkfs.vfat", "-C", "-n", label, image, str(size_kib)])
        os.chmod(image, 0o600)
        for name, data in sorted(files.items()):
            local = os.path.join(work, name)
            with open(os.open(local, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as f:
                f.write(data)
            _run(["mcopy", "-o", "-i", image, local, f"::{name}"])
        os.replace(image, path)
    open_way(path, owned_below=os.path.dirname(state), user=qemu, what="the VM's first-boot drive", field="customization")
    return path


def remove_seed(state_dir: str, uuid: str) -> bool:
    try:
        os.unlink(seed_path(state_dir, uuid))
        return True
    except FileNotFoundError:
        return False


def seed_disk(path: str, *, windows: bool) -> dx.Disk:
    """The read-only disk that carries the drive (see the module docstring for the bus)."""
    d = dx.Disk(type="file", device="disk")
    d.driver_name, d.driver_type = "qemu", "raw"
    d.source_file = path
    d.target_dev, d.target_bus = ("sdz", "usb") if windows else ("vdz", "virtio")
    if windows:
        d.target_removable = "on"
    d.readonly = True
    d.serial = SERIAL
    return d


def find_seed(dom: dx.Domain) -> dx.Disk | None:
    return next((d for d in (dom.devices.disks if dom.devices else []) if d.serial == SERIAL), None)
