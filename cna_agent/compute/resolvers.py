"""The stand-ins the wiring passes when an agent runs without a storage or network subsystem.

Local files: a disk ``volume`` or a direct-boot kernel/initrd given as an absolute path is
accepted only when it resolves (symlinks followed) inside one of ``[compute] image_dirs``
(CVE-2015-5313: caller paths stay confined). The format is never probed from the file
(guest-writable data): it is what the spec says, else decided by the name (bindings.format_from_name).

NICs need the network subsystem: without it a NIC is refused with FAILED_PRECONDITION.
"""

from __future__ import annotations

import os
from typing import Sequence

from cna_agent.contracts import DiskSourceBinding, LunRelease, NicBinding, VmNic
from cna_agent.errors import FailedPrecondition, InvalidArgument, NotFound
from cna_agent.contracts import format_from_name


def parse_image_dirs(value: str) -> tuple[str, ...]:
    return tuple(os.path.realpath(d.strip()) for d in value.split(",") if d.strip())


class LocalFileResolver:
    """Absolute paths under the configured image directories."""

    def __init__(self, image_dirs: Sequence[str]) -> None:
        self.image_dirs = tuple(image_dirs)

    def confine(self, path: str, *, field: str) -> str:
        if not path.startswith("/"):
            raise InvalidArgument(field, f"{path!r}: without a storage subsystem only absolute paths under [compute] image_dirs are accepted")
        if "\x00" in path or ".." in path.split("/"):
            raise InvalidArgument(field, "must not contain '..' components or NUL")
        real = os.path.realpath(path)
        if not any(real == d or real.startswith(d.rstrip("/") + "/") for d in self.image_dirs):
            where = ", ".join(self.image_dirs) or "none configured"
            raise InvalidArgument(field, f"{path!r} is outside the allowed image directories ({where})")
        if not os.path.isfile(real) and not os.path.exists(real):
            raise NotFound(f"{field}: {path!r} does not exist", field=field)
        return real

    async def resolve_volume(self, volume_id: str, *, field: str) -> DiskSourceBinding:
        real = self.confine(volume_id, field=field)
        return DiskSourceBinding(kind="file", path=real, format=format_from_name(real), supports_direct_io=_direct_io_ok(real), volume_id=volume_id)

    async def resolve_lun(self, datastore: str, lun_id: str, *, field: str, vm: str = "") -> DiskSourceBinding:
        raise FailedPrecondition(f"{field}: SAN LUNs need the storage subsystem, which is not running on this agent", field=field)

    async def release_lun(self, datastore: str, lun_id: str, *, field: str, vm: str = "") -> LunRelease:
        # A LUN disk was bound by a storage subsystem in an earlier run; without it nobody here
        # knows the LUN's host devices, so say so instead of pretending it was released.
        raise FailedPrecondition(f"{field}: releasing SAN LUN {lun_id!r} of datastore {datastore!r} needs the storage "
                                 "subsystem, which is not running on this agent", field=field)

    async def new_volume(self, volume_id: str, size: int, *, room: int, field: str) -> DiskSourceBinding:
        raise FailedPrecondition(f"{field}: new volumes need the storage subsystem, which is not running on this agent",
                                 field=field)

    async def state_area(self, datastore: str, *, field: str) -> str:
        raise FailedPrecondition(f"{field}: datastore {datastore!r} cannot hold VM state: the storage subsystem is not "
                                 "running on this agent", field=field)


class NoNetworkResolver:
    """The PortProvider of an agent without networking: every NIC is refused, naming the field."""

    async def resolve_port_group(self, port_group: str, *, field: str) -> NicBinding:
        raise FailedPrecondition(f"{field}: port group {port_group!r} cannot be bound: the network subsystem is not running on this agent", field=field)

    async def port_plugged(self, binding: NicBinding, nic: VmNic) -> None:
        return None  # never reached: no NIC is ever bound

    async def port_unplugged(self, nic: VmNic) -> None:
        return None


def _direct_io_ok(path: str) -> bool:
    """Whether O_DIRECT opens work on the file's filesystem (tmpfs, some FUSE do not)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECT", 0))
    except OSError:
        return False
    os.close(fd)
    return True
