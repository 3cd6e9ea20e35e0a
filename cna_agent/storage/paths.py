"""Confine caller paths to datastores (CVE-2015-5313: a volume path must never leave its store).

A volume id is "datastore/relative/path". The relative part is checked lexically first (no
empty, "." or ".." components, no absolute path, no NUL or control characters, bounded
length), then resolved with symlinks followed and compared against the datastore's resolved
root, so a symlink planted inside the datastore that points outside is refused too. Every
error is InvalidArgument naming the caller's field, raised before anything is touched.

Remaining window: a symlink swapped in between this check and qemu-img opening the file. The
datastore directories are written only by the agent (guests see block devices, never the
directory), which is why the check-then-use here is acceptable.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping

import re

from cna_agent.errors import InvalidArgument, NotFound

#: Linux NAME_MAX / PATH_MAX budget for the relative part.
COMPONENT_MAX = 255
RELPATH_MAX = 1024
#: Suffix of in-progress files (never reported as volumes, removed on failure).
TEMP_MARK = ".cna-tmp-"
#: The name policy for every file the agent creates on a datastore (volumes, clones, imports,
#: export targets, the directories on their way): each component as strict as a VM name
#: (ASCII letters, digits, '.', '_', '-', not starting with '.' or '-'), so nothing an admin's
#: shell script meets in a datastore needs quoting (no spaces, '$', '`', ';', '<', '&', quotes,
#: and no Unicode look-alikes or direction overrides).
COMPONENT_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class VolumeRef:
    datastore: str
    relpath: str
    #: Absolute, symlink-resolved path inside the datastore root.
    path: str

    @property
    def id(self) -> str:
        return f"{self.datastore}/{self.relpath}"


def check_relpath(rel: str, field: str) -> str:
    """Lexical checks on a datastore-relative path; returns it normalised ("a//b" refused)."""
    if not rel:
        raise InvalidArgument(field, "a path inside the datastore is required")
    if len(rel) > RELPATH_MAX:
        raise InvalidArgument(field, f"longer than {RELPATH_MAX} characters")
    if any(ord(c) < 32 or ord(c) == 127 for c in rel):
        raise InvalidArgument(field, "must not contain NUL or control characters")
    if rel.startswith("/"):
        raise InvalidArgument(field, f"{rel!r} must be relative to the datastore, not absolute")
    for part in rel.split("/"):
        if part in ("", ".", ".."):
            raise InvalidArgument(field, f"{rel!r}: empty, '.' or '..' components are not allowed")
        if len(part.encode()) > COMPONENT_MAX:
            raise InvalidArgument(field, f"component {part[:20]!r}... is longer than {COMPONENT_MAX} bytes")
        if part.startswith("-"):
            raise InvalidArgument(field, f"component {part!r} must not start with '-'")
        if TEMP_MARK in part:
            raise InvalidArgument(field, f"{part!r} is a reserved in-progress file name")
    return rel


def check_new_relpath(rel: str, field: str) -> str:
    """check_relpath plus the name policy (COMPONENT_RE), for a path the agent is to create.
    Existing files are still referenced by check_relpath alone (an image an admin copied in
    may be named otherwise; it can be imported to a well-named volume)."""
    check_relpath(rel, field)
    for part in rel.split("/"):
        if not COMPONENT_RE.match(part):
            raise InvalidArgument(field, f"{rel!r}: {part!r} must be ASCII letters, digits, '.', '_' or '-' and must not "
                                         "start with '.' or '-' (names of new files follow the VM name policy)")
    return rel


def inside(root: str, path: str) -> bool:
    root = root.rstrip("/") or "/"
    return path == root or path.startswith(root + "/")


def confine(root: str, rel: str, field: str) -> str:
    """Absolute path of ``rel`` under ``root``, symlinks resolved, refused if it escapes."""
    check_relpath(rel, field)
    real_root = os.path.realpath(root)
    real = os.path.realpath(os.path.join(real_root, rel))
    if not inside(real_root, real) or real == real_root:
        raise InvalidArgument(field, f"{rel!r} resolves outside its datastore (a symlink leaving {root})")
    return real


def split_volume_id(volume_id: str, field: str) -> tuple[str, str]:
    if not volume_id or "/" not in volume_id:
        raise InvalidArgument(field, f"{volume_id!r} is not 'datastore/relative/path'")
    ds, rel = volume_id.split("/", 1)
    if not ds:
        raise InvalidArgument(field, f"{volume_id!r}: the datastore name is missing (ids are 'datastore/relative/path', never absolute)")
    return ds, rel


def resolve(roots: Mapping[str, str], volume_id: str, field: str, *, must_exist: bool = False) -> VolumeRef:
    """Resolve "datastore/rel/path" against the directory datastores' roots."""
    ds, rel = split_volume_id(volume_id, field)
    if ds not in roots:
        known = ", ".join(sorted(roots)) or "none configured"
        raise InvalidArgument(field, f"datastore {ds!r} is not a directory datastore on this host (known: {known})")
    path = confine(roots[ds], rel, field)
    if must_exist and not os.path.exists(path):
        raise NotFound(f"{field}: volume {volume_id!r} does not exist", field=field)
    return VolumeRef(ds, rel, path)


def fsync_path(path: str) -> None:
    """fsync a file or directory by path (O_RDONLY is enough for both on Linux): a rename or a
    new file is durable only once its directory is synced too."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def unlink_if_there(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
