"""Who QEMU runs as, and the one rule for the directories on its way to what it opens.

Why: under libvirtd/virtqemud QEMU runs as an unprivileged DAC user (``libvirt-qemu`` on Debian,
``qemu`` on openEuler). libvirt relabels the files it hands QEMU (disk images and their backing
chain, kernel/initrd, NVRAM) but never the directories above them, and the agent runs with
UMask=0077, so every directory it makes is closed to QEMU unless it says otherwise: a volume in a
datastore subdirectory failed to start with "Cannot access storage file ... Permission denied".
Every place that makes or checks such a directory (datastore subdirectories, the NVRAM and
runtime directories) goes through this module:

* a directory the agent makes on QEMU's way is ``0711`` (traversable, not listable: what
  ``/var/lib/libvirt/images`` is), made so explicitly since the umask would close it;
* a directory the agent owns that lacks the traverse bit (made by an older agent, or by hand)
  gets it added, and the change is logged;
* a directory above the agent's own (a datastore's root and what holds it, ``/var/lib``) is
  never changed: when QEMU's user cannot pass it, the caller gets FAILED_PRECONDITION naming it.

In embedded mode QEMU runs as the agent's own user (root) and nothing needs opening.
"""

from __future__ import annotations

import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from cna_agent.errors import FailedPrecondition

log = logging.getLogger(__name__)

#: Directories the agent makes on QEMU's way: anyone may traverse, only the owner may list.
TRAVERSE_DIR_MODE = 0o711


@dataclass(frozen=True)
class QemuUser:
    """The DAC identity QEMU runs as (hypervisor facts); uid 0 means embedded/root QEMU."""

    uid: int
    gid: int | None = None

    @property
    def unprivileged(self) -> bool:
        return self.uid != 0


def post_copy_blocker(user: QemuUser | None, proc_root: str = "/proc") -> str:
    """Why QEMU on this host cannot take an incoming post-copy migration, or "" when it can.

    Post-copy needs userfaultfd in the destination's QEMU. Root (embedded driver, or
    user = "root" in qemu.conf) may always use it; an unprivileged QEMU 7.x only when
    vm.unprivileged_userfaultfd is 1 (QEMU 8.1+ can also open /dev/userfaultfd, when libvirt
    hands it to the guest's namespace). QEMU answers the switch itself with only "Postcopy is
    not supported", after the job started; the admin needs the sysctl's name."""
    if user is None or not user.unprivileged:
        return ""
    try:
        value = Path(proc_root, "sys/vm/unprivileged_userfaultfd").read_text().strip()
    except OSError:
        return ""  # older kernels without the knob allow unprivileged userfaultfd
    if value == "1":
        return ""
    return (f"QEMU runs unprivileged (uid {user.uid}) and vm.unprivileged_userfaultfd is {value}: its userfaultfd "
            "for post-copy is refused (set the sysctl to 1 on this host, or migrate without post-copy)")


def can_traverse(st: os.stat_result, user: QemuUser) -> bool:
    """Whether ``user`` may pass through a directory with this stat (owner, group, other)."""
    if st.st_uid == user.uid:
        return bool(st.st_mode & stat.S_IXUSR)
    if user.gid is not None and st.st_gid == user.gid:
        return bool(st.st_mode & stat.S_IXGRP)
    return bool(st.st_mode & stat.S_IXOTH)


def _inside(root: str, path: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def make_dirs(path: str, *, below: str) -> None:
    """``os.makedirs(path)`` where every directory made below ``below`` is TRAVERSE_DIR_MODE
    whatever the umask (``below`` itself must exist; nothing at or above it is made)."""
    path, below = os.path.normpath(path), os.path.normpath(below)
    if not _inside(below, path):
        raise ValueError(f"{path} is not under {below}")
    missing: list[str] = []
    p = path
    while p != below and not os.path.lexists(p):
        missing.append(p)
        p = os.path.dirname(p)
    for p in reversed(missing):
        try:
            os.mkdir(p, TRAVERSE_DIR_MODE)
        except FileExistsError:
            continue
        os.chmod(p, TRAVERSE_DIR_MODE)  # mkdir's mode is masked by the umask


def open_way(path: str, *, owned_below: str, user: QemuUser | None, what: str, field: str, hint: str = "") -> None:
    """Let QEMU's ``user`` reach ``path`` (a file or directory that exists or is about to).

    Directories strictly below ``owned_below`` (the agent's own: a datastore's subdirectories,
    its state directory's children) get the traverse bits added where they lack them;
    ``owned_below`` and every directory above it are only checked. ``what`` names the thing for
    the error ("volume 'ds/a/b.qcow2'"), ``field`` the request field it came from, ``hint`` what
    else the admin can do (e.g. the config keys that move the path).
    """
    if user is None or not user.unprivileged:
        return
    path, owned_below = os.path.normpath(path), os.path.normpath(owned_below)
    d = os.path.dirname(path)
    while True:
        try:
            st = os.stat(d)
        except FileNotFoundError:
            st = None
        if st is not None and not can_traverse(st, user):
            if _inside(owned_below, d) and d != owned_below:
                mode = stat.S_IMODE(st.st_mode)
                log.warning("event=qemu_access.repair path=%s mode=%04o want=%04o", d, mode, mode | 0o111)
                os.chmod(d, mode | 0o111)
            else:
                raise FailedPrecondition(
                    f"QEMU runs as uid {user.uid} and cannot reach {what}: {d} (mode {stat.S_IMODE(st.st_mode):04o}, "
                    f"owner {st.st_uid}:{st.st_gid}) is not traversable by it and is not a directory the agent manages; "
                    f"make it traversable (chmod o+x {d}){hint}", field=field)
        if d == os.sep:
            return
        d = os.path.dirname(d)
