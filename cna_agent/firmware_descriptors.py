"""Which UEFI builds this host's QEMU offers, read from QEMU's firmware descriptors.

Why: libvirt chooses the firmware for ``<os firmware='efi'>`` from the JSON descriptors QEMU's
firmware packages install (docs/interop/firmware.json: ``/usr/share/qemu/firmware``, overridden
by ``/etc/qemu/firmware``), and a VM asking for Secure Boot with Microsoft's keys needs one whose
features include ``secure-boot`` and ``enrolled-keys`` for its architecture. Without one libvirt
refuses the start with "Unable to find any firmware to satisfy 'efi'", after the definition was
made; reading the same descriptors up front lets CreateVm refuse ``spec.secure_boot`` with a clear
reason and change nothing. The distributions ship them in the ovmf/edk2-ovmf (x86_64) and
qemu-efi-aarch64/edk2-aarch64 (aarch64) packages.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass

log = logging.getLogger(__name__)

#: Searched in this order; a file name in an earlier directory hides the same name in a later one
#: (the override rule of QEMU's firmware specification).
DESCRIPTOR_DIRS = ("/etc/qemu/firmware", "/usr/share/qemu/firmware")


@dataclass(frozen=True)
class FirmwareBuild:
    """One descriptor: the UEFI code image, its NVRAM template and what it can do."""

    path: str
    code: str
    nvram_template: str
    architectures: frozenset[str]
    features: frozenset[str]

    @property
    def secure_boot_enrolled(self) -> bool:
        return {"secure-boot", "enrolled-keys"} <= self.features


def _parse(path: str) -> FirmwareBuild | None:
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
        if "uefi" not in doc.get("interface-types", []):
            return None
        mapping = doc.get("mapping", {})
        return FirmwareBuild(
            path=path,
            code=mapping.get("executable", {}).get("filename", ""),
            nvram_template=mapping.get("nvram-template", {}).get("filename", ""),
            architectures=frozenset(t.get("architecture", "") for t in doc.get("targets", [])),
            features=frozenset(doc.get("features", [])))
    except (OSError, ValueError, AttributeError, TypeError) as exc:
        log.warning("firmware descriptor %s unreadable: %s", path, exc)
        return None


def uefi_builds(dirs: tuple[str, ...] = DESCRIPTOR_DIRS) -> list[FirmwareBuild]:
    """The UEFI descriptors of this host whose code image exists, override rule applied."""
    seen: dict[str, str] = {}
    for d in dirs:
        try:
            names = sorted(os.listdir(d))
        except OSError:
            continue
        for name in names:
            if name.endswith(".json") and name not in seen:
                seen[name] = os.path.join(d, name)
    builds = [b for b in (_parse(p) for _, p in sorted(seen.items())) if b is not None]
    return [b for b in builds if b.code and os.path.exists(b.code)]


def secure_boot_arches(dirs: tuple[str, ...] = DESCRIPTOR_DIRS) -> frozenset[str]:
    """The architectures for which a Secure Boot build with enrolled keys is installed."""
    return frozenset(a for b in uefi_builds(dirs) if b.secure_boot_enrolled for a in b.architectures)
