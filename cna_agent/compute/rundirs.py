"""The directories the agent creates for its guests' QEMU processes, with the owner and modes
QEMU needs.

Under libvirtd/virtqemud QEMU runs as an unprivileged DAC user (``libvirt-qemu`` on Debian,
``qemu`` on openEuler) and itself creates the agent's side-channel monitor socket (qmp.py), so
it must be able to walk to the socket's directory and write in it. The agent owns three kinds of
directory on that walk and keeps each right every time a VM is defined or started (``/run`` is
a tmpfs: after a host reboot, or when an admin removed one, they are simply made again):

* the roots: ``[state] run_dir`` and the short-socket root (``[state] qmp_fallback_dir``,
  ``/run/cna-qmp`` by default, used when run_dir is too deep for a unix socket path). They are
  made ``0711`` root:root: QEMU can traverse them but not list them. A root that exists with
  the wrong owner or without the traverse bits is repaired; one that is a symlink or not a
  directory is refused (someone else put it there).
* the socket directory (``<run_dir>/qmp`` or ``<fallback>/<hash of run_dir>``): QEMU's own user
  and group, ``0700``, so no other local user can reach the sockets (the monitor is root-equivalent
  for the guest).

Directories above a root are not the agent's: when QEMU's user cannot traverse one, the agent
refuses with an error naming it, instead of changing a system directory's mode.

In embedded mode (QEMU runs as the agent's own user, root) nothing needs opening up.
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
from pathlib import Path

from cna_agent.compute.render import RenderContext, qmp_socket_path, vm_run_dir
from cna_agent.errors import FailedPrecondition
from cna_agent.qemu_access import TRAVERSE_DIR_MODE, QemuUser, make_dirs, open_way

log = logging.getLogger(__name__)

#: Roots: traversable by anyone, listable by root only.
ROOT_MODE = TRAVERSE_DIR_MODE
#: The socket directory: QEMU's user only.
SOCKET_DIR_MODE = 0o700


class QemuRunDirs:
    """Creates, repairs and removes the per-VM runtime directories (see the module docstring)."""

    def __init__(self, ctx: RenderContext) -> None:
        # The paths themselves are the domain builder's (render.py): one place decides them.
        self.ctx = ctx
        self.run_dir = os.path.normpath(ctx.run_dir)
        self.fallback_root = os.path.normpath(ctx.qmp_fallback_dir)

    def _root_of(self, socket_dir: str) -> str:
        """The agent-owned root a socket directory hangs from."""
        for root in (self.run_dir, self.fallback_root):
            if socket_dir == root or socket_dir.startswith(root.rstrip(os.sep) + os.sep):
                return root
        raise AssertionError(f"{socket_dir} is under neither {self.run_dir} nor {self.fallback_root}")

    # -- preparing ---------------------------------------------------------------------------------

    def prepare(self, uuid: str, qemu: QemuUser | None) -> None:
        """Make (or repair) every directory the VM's QEMU and the agent need before a define/start.

        Raises FailedPrecondition (field ``vm``) when QEMU's user cannot reach the socket
        directory through a directory the agent does not own; that check runs first, so a
        refused VM changes nothing on disk.
        """
        unprivileged = qemu is not None and qemu.unprivileged
        socket_dir = os.path.dirname(qmp_socket_path(self.ctx, uuid)) if self.ctx.qmp_side_channel else ""
        root = self._root_of(socket_dir) if socket_dir else ""
        if unprivileged and root:
            self._check_above(root, socket_dir, qemu)
        self._ensure_root(self.run_dir)
        os.makedirs(vm_run_dir(self.ctx, uuid), mode=0o700, exist_ok=True)
        if not socket_dir:
            return
        if root != self.run_dir:
            self._ensure_root(root)
        self._ensure_socket_dir(socket_dir, qemu)

    def _ensure_root(self, root: str) -> None:
        """The root exists as a real directory, owned by the agent's user (root), with at least the
        traverse bits. Missing directories above it are made traversable too (they are the agent's
        now, and under UMask=0077 a plain mkdir would leave them closed)."""
        make_dirs(root, below=os.sep)  # 0711 each (ROOT_MODE); one made concurrently is checked below
        st = os.lstat(root)
        if not stat.S_ISDIR(st.st_mode):
            what = "a symlink" if stat.S_ISLNK(st.st_mode) else "not a directory"
            raise FailedPrecondition(
                f"{root} is {what}; the agent creates this directory for QEMU itself and will not use one "
                "it did not make (remove it, or set [state] run_dir / qmp_fallback_dir elsewhere)", field="vm")
        me = (os.geteuid(), os.getegid())
        if (st.st_uid, st.st_gid) != me:
            log.warning("event=rundir.repair path=%s owner=%d:%d want=%d:%d", root, st.st_uid, st.st_gid, *me)
            os.chown(root, *me)
        mode = stat.S_IMODE(st.st_mode)
        # The admin may have opened a configured run_dir further (e.g. 0755); only the traverse
        # bits QEMU needs are added, and group/other write is never left on a root.
        want = (mode | 0o111) & ~0o022
        if root == self.fallback_root:
            want = ROOT_MODE  # entirely the agent's: exactly traversable, not listable
        if mode != want:
            log.warning("event=rundir.repair path=%s mode=%04o want=%04o", root, mode, want)
            os.chmod(root, want)

    def _check_above(self, root: str, socket_dir: str, qemu: QemuUser) -> None:
        """Every existing directory above ``root`` must already let QEMU's user through: those are
        not the agent's to change (missing ones the agent makes traversable itself)."""
        open_way(root, owned_below=root, user=qemu, what=socket_dir, field="vm",
                 hint=" or set [state] run_dir / qmp_fallback_dir under a directory QEMU can reach")

    def _ensure_socket_dir(self, socket_dir: str, qemu: QemuUser | None) -> None:
        """QEMU's own directory for its sockets: its user and group, 0700."""
        try:
            os.mkdir(socket_dir, SOCKET_DIR_MODE)
        except FileExistsError:
            pass
        st = os.lstat(socket_dir)
        if not stat.S_ISDIR(st.st_mode):
            raise FailedPrecondition(f"{socket_dir} is not a directory; the agent keeps QEMU's monitor sockets there "
                                     "and will not follow a symlink or replace a file", field="vm")
        if qemu is not None:
            gid = qemu.gid if qemu.gid is not None else st.st_gid
            if (st.st_uid, st.st_gid) != (qemu.uid, gid):
                log.info("event=rundir.chown path=%s owner=%d:%d want=%d:%d", socket_dir, st.st_uid, st.st_gid, qemu.uid, gid)
                os.chown(socket_dir, qemu.uid, gid)
        if stat.S_IMODE(st.st_mode) != SOCKET_DIR_MODE:
            os.chmod(socket_dir, SOCKET_DIR_MODE)

    # -- removing ----------------------------------------------------------------------------------

    def remove(self, uuid: str) -> None:
        """Forget a deleted VM's runtime files (its socket goes with its QEMU; the file may stay)."""
        shutil.rmtree(vm_run_dir(self.ctx, uuid), ignore_errors=True)
        Path(qmp_socket_path(self.ctx, uuid)).unlink(missing_ok=True)
