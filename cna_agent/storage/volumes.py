"""Volumes on directory datastores, made and converted with qemu-img.

Rules this module enforces (and why):

- A volume's format is its file name suffix (``.qcow2`` = qcow2, anything else raw) and is
  always passed to qemu-img with ``-f``: probing a raw disk would let a guest that wrote a
  qcow2 header into it point QEMU at a host file as "backing file".
- Nothing partial is ever visible: new files are written under a hidden temporary name in the
  destination directory, flushed to disk and linked into place on success (then the directory
  is flushed), unlinked on any failure.
- Sizes are bounded (> 0, 512-byte multiples, at most MAX_VOLUME_BYTES) and shrinking is
  refused (it silently destroys the end of a guest file system).
- Imports are probed, checked with ``qemu-img check`` (corrupt images refused, findings
  reported) and must not reference other files (backing or external data files).
- Linked clones are qcow2 overlays whose backing file (with its format) is the template; the
  template is made read-only (mode 0444) and cannot be deleted while clones use it.

Every method is synchronous: the service runs it in the storage executor.
"""

from __future__ import annotations

import os
import secrets
import shutil
import stat
import threading
from dataclasses import dataclass, replace
from typing import Callable, Iterator, Mapping

from cna_agent import cancel as cancelling
from cna_agent.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from cna_agent.failpoints import crash_point
from cna_agent.qemu_access import make_dirs
from cna_agent.storage import paths, qemuimg
from cna_agent.storage.runner import CommandError, CommandRunner
from cna_agent.contracts import ImageSource, format_from_name

KiB, MiB, GiB, TiB = 1024, 1024**2, 1024**3, 1024**4
#: Largest volume: 64 TiB (qcow2 with 64 KiB clusters handles far more, but a request beyond
#: any real array's LUN is a unit mistake, e.g. bytes given as KiB).
MAX_VOLUME_BYTES = 64 * TiB
#: Formats a volume on a datastore can have; the others exist only as import/export files.
VOLUME_FORMATS = ("qcow2", "raw")
IMPORT_FORMATS = ("qcow2", "raw", "vmdk", "vpc", "vhdx")
EXPORT_FORMATS = ("qcow2", "raw", "vmdk", "vpc")
TEMPLATE_MODE = 0o444
VOLUME_MODE = 0o600

Progress = Callable[[float], None]


@dataclass(frozen=True)
class VolumeInfo:
    id: str
    datastore: str
    relpath: str
    path: str
    format: str
    virtual_size: int
    actual_size: int
    backing_volume: str = ""
    template: bool = False
    check: qemuimg.CheckReport | None = None
    #: UUIDs of the VMs whose disks use it (filled by StorageService from compute's view).
    used_by: tuple[str, ...] = ()


def format_of(relpath: str) -> str:
    return format_from_name(relpath)


def check_size(size: int, field: str) -> int:
    if size <= 0:
        raise InvalidArgument(field, "must be greater than 0")
    if size > MAX_VOLUME_BYTES:
        raise InvalidArgument(field, f"{size} bytes is larger than the {MAX_VOLUME_BYTES // TiB} TiB maximum")
    if size % 512:
        raise InvalidArgument(field, f"{size} is not a multiple of 512 bytes")
    return size


def check_volume_format(fmt: str, relpath: str, field: str, path_field: str) -> str:
    if fmt not in VOLUME_FORMATS:
        raise InvalidArgument(field, f"{fmt or 'unspecified'!r}: volumes on a datastore are qcow2 or raw")
    if format_of(relpath) != fmt:
        want = "end in .qcow2" if fmt == "qcow2" else "not end in .qcow2 (use .raw or .img)"
        raise InvalidArgument(path_field, f"{relpath!r}: a {fmt} volume's name must {want} (the suffix is its format)")
    return fmt


class VolumeManager:
    def __init__(self, roots: Mapping[str, str], runner: CommandRunner, *, timeout: float) -> None:
        #: datastore name -> root directory (dir datastores only).
        self.roots = dict(roots)
        self.runner = runner
        self.timeout = timeout
        self._info_cache: dict[str, tuple[tuple[int, int, int], qemuimg.ImageInfo]] = {}
        self._cache_lock = threading.Lock()

    # -- lookups ------------------------------------------------------------------------------------

    def resolve(self, volume_id: str, field: str, *, must_exist: bool = False) -> paths.VolumeRef:
        return paths.resolve(self.roots, volume_id, field, must_exist=must_exist)

    def ref(self, datastore: str, relpath: str, field: str, ds_field: str = "datastore") -> paths.VolumeRef:
        """A volume the agent is to create: the path is held to the name policy."""
        if datastore not in self.roots:
            known = ", ".join(sorted(self.roots)) or "none configured"
            raise InvalidArgument(ds_field, f"{datastore!r} is not a directory datastore on this host (known: {known})")
        paths.check_new_relpath(relpath, field)
        return paths.resolve(self.roots, f"{datastore}/{relpath}", field)

    def _image_info(self, path: str, fmt: str) -> qemuimg.ImageInfo:
        st = os.stat(path)
        key = (st.st_ino, st.st_mtime_ns, st.st_size)
        with self._cache_lock:
            hit = self._info_cache.get(path)
        if hit and hit[0] == key:
            return hit[1]
        got = qemuimg.info(self.runner, path, fmt=fmt, timeout=min(self.timeout, 120))
        with self._cache_lock:
            self._info_cache[path] = (key, got)
        return got

    def _volume_id_of(self, abs_path: str) -> str:
        real = os.path.realpath(abs_path)
        for name, root in self.roots.items():
            rroot = os.path.realpath(root)
            if paths.inside(rroot, real) and real != rroot:
                return f"{name}/{os.path.relpath(real, rroot)}"
        return ""

    def info(self, ref: paths.VolumeRef) -> VolumeInfo:
        if not os.path.isfile(ref.path):
            raise NotFound(f"volume {ref.id!r} does not exist", field="id")
        fmt = format_of(ref.relpath)
        try:
            img = self._image_info(ref.path, fmt)
        except CommandError as exc:
            raise FailedPrecondition(f"volume {ref.id!r} is not a readable {fmt} image: {exc.result.stderr.strip()[-300:]}") from None
        backing = self._volume_id_of(img.backing_filename) if img.backing_filename else ""
        if img.backing_filename and not backing:
            backing = img.backing_filename  # outside every datastore: shown as is
        mode = os.stat(ref.path).st_mode
        return VolumeInfo(id=ref.id, datastore=ref.datastore, relpath=ref.relpath, path=ref.path, format=fmt,
                          virtual_size=img.virtual_size, actual_size=img.actual_size, backing_volume=backing,
                          template=not mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))

    def _walk(self, datastore: str) -> Iterator[paths.VolumeRef]:
        root = os.path.realpath(self.roots[datastore])
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and not os.path.islink(os.path.join(dirpath, d)))
            for fn in sorted(filenames):
                if fn.startswith(".") or paths.TEMP_MARK in fn:
                    continue
                full = os.path.join(dirpath, fn)
                if os.path.islink(full) or not os.path.isfile(full):
                    continue
                rel = os.path.relpath(full, root)
                yield paths.VolumeRef(datastore, rel, full)

    def list(self, datastore: str) -> list[VolumeInfo]:
        if datastore not in self.roots:
            raise NotFound(f"datastore {datastore!r} is not a directory datastore on this host", field="datastore")
        out = []
        for ref in self._walk(datastore):
            try:
                out.append(self.info(ref))
            except (FailedPrecondition, NotFound, FileNotFoundError):
                # vanished or not an image (an upload in progress; a volume deleted by another
                # operation between the walk and the read: seen as INTERNAL in the soak)
                continue
        return out

    def dependents(self, ref: paths.VolumeRef) -> list[str]:
        """Volumes (in every dir datastore) whose backing file is ``ref``."""
        found = []
        for ds in self.roots:
            for other in self._walk(ds):
                if format_of(other.relpath) != "qcow2" or other.path == ref.path:
                    continue
                try:
                    img = self._image_info(other.path, "qcow2")
                except (CommandError, OSError):
                    continue
                if img.backing_filename and os.path.realpath(img.backing_filename) == ref.path:
                    found.append(other.id)
        return found

    # -- temp files ---------------------------------------------------------------------------------

    def _temp_for(self, ref: paths.VolumeRef) -> str:
        d, base = os.path.split(ref.path)
        return os.path.join(d, f".{base}{paths.TEMP_MARK}{secrets.token_hex(4)}")

    def _prepare_target(self, ref: paths.VolumeRef, field: str) -> str:
        if os.path.lexists(ref.path):
            raise AlreadyExists(f"{field}: volume {ref.id!r} already exists", field=field)
        parent = os.path.dirname(ref.path)
        make_dirs(parent, below=self.roots[ref.datastore])  # 0711: QEMU's user must pass them (qemu_access)
        # makedirs could have followed a symlink planted meanwhile; re-check the parent.
        if not paths.inside(os.path.realpath(self.roots[ref.datastore]), os.path.realpath(parent)):
            raise InvalidArgument(field, f"{ref.relpath!r} resolves outside its datastore")
        return self._temp_for(ref)

    def _commit(self, tmp: str, ref: paths.VolumeRef, field: str, mode: int = VOLUME_MODE) -> None:
        # The point of no return of a cancellable operation: a cancel that came during the
        # copy stops here (the caller removes the temporary file); a later one is refused.
        cancelling.commit(f"volume {ref.id!r} is being put in place")
        os.chmod(tmp, mode)
        # qemu-img convert's default target cache mode is "unsafe": no flush after its last write
        # (seen with strace, QEMU 7.2), so data and qcow2 tables can still be in the page cache.
        # Flush before the name appears, or a host crash after the operation said "done" leaves
        # a torn volume under its real name.
        paths.fsync_path(tmp)
        # link+unlink instead of rename: fails if someone created the name meanwhile.
        try:
            os.link(tmp, ref.path)
        except FileExistsError:
            raise AlreadyExists(f"{field}: volume {ref.id!r} appeared while it was being created", field=field) from None
        finally:
            paths.unlink_if_there(tmp)
        paths.fsync_path(os.path.dirname(ref.path))  # the new name (and the temp name's removal) survive a crash too

    def _produce(self, ref: paths.VolumeRef, field: str, make: Callable[[str], None]) -> None:
        tmp = self._prepare_target(ref, field)
        try:
            make(tmp)
            self._commit(tmp, ref, field)
        except BaseException:
            paths.unlink_if_there(tmp)
            raise
        crash_point("volume.placed")  # in place, not yet reported: recovery must find it complete

    def sweep_temp_files(self) -> list[str]:
        """Remove in-progress files a crash left behind (called at start, before any work)."""
        removed = []
        for root in self.roots.values():
            for dirpath, dirnames, filenames in os.walk(os.path.realpath(root)):
                for fn in filenames:
                    if paths.TEMP_MARK in fn:
                        paths.unlink_if_there(os.path.join(dirpath, fn))
                        removed.append(os.path.join(dirpath, fn))
                for dn in [d for d in dirnames if paths.TEMP_MARK in d]:  # an export's staging directory
                    shutil.rmtree(os.path.join(dirpath, dn), ignore_errors=True)
                    removed.append(os.path.join(dirpath, dn))
                    dirnames.remove(dn)
        return removed

    def _free_bytes(self, ref: paths.VolumeRef) -> int:
        st = os.statvfs(os.path.dirname(ref.path) if os.path.isdir(os.path.dirname(ref.path)) else self.roots[ref.datastore])
        return st.f_bavail * st.f_frsize

    # -- operations ---------------------------------------------------------------------------------

    def create(self, ref: paths.VolumeRef, fmt: str, size: int, *, preallocate: bool = False) -> VolumeInfo:
        check_volume_format(fmt, ref.relpath, "format", "path")
        check_size(size, "size_bytes")
        if preallocate and fmt == "raw" and size > self._free_bytes(ref):
            raise FailedPrecondition(f"size_bytes: {size} bytes preallocated do not fit in datastore {ref.datastore!r} "
                                     f"({self._free_bytes(ref)} bytes free)", field="size_bytes")
        self._produce(ref, "path", lambda tmp: qemuimg.create(self.runner, tmp, fmt, size, preallocate=preallocate,
                                                               timeout=self.timeout))
        return self.info(ref)

    def resize(self, ref: paths.VolumeRef, new_size: int) -> VolumeInfo:
        check_size(new_size, "new_size_bytes")
        cur = self.info(ref)
        if cur.template:
            raise FailedPrecondition(f"volume {ref.id!r} is a read-only template", field="id")
        if new_size <= cur.virtual_size:
            raise InvalidArgument("new_size_bytes", f"{new_size} is not larger than the current {cur.virtual_size} bytes; "
                                  "shrinking is refused (it would cut off the end of the guest's file system)")
        if cur.format == "raw" and new_size - cur.virtual_size > self._free_bytes(ref) and cur.actual_size >= cur.virtual_size:
            raise FailedPrecondition(f"new_size_bytes: growing by {new_size - cur.virtual_size} bytes does not fit in "
                                     f"datastore {ref.datastore!r}", field="new_size_bytes")
        preallocated = cur.format == "raw" and cur.actual_size >= cur.virtual_size
        qemuimg.resize(self.runner, ref.path, cur.format, new_size, preallocate=preallocated, timeout=self.timeout)
        return self.info(ref)

    def delete(self, ref: paths.VolumeRef, *, in_use_by: tuple[str, ...] = ()) -> None:
        if not os.path.isfile(ref.path):
            raise NotFound(f"volume {ref.id!r} does not exist", field="id")
        if in_use_by:
            raise FailedPrecondition(f"volume {ref.id!r} is attached to VM(s) {', '.join(in_use_by)}; detach it first", field="id")
        deps = self.dependents(ref)
        if deps:
            raise FailedPrecondition(f"volume {ref.id!r} is the template of linked clone(s) {', '.join(deps[:10])}; "
                                     "delete them first", field="id")
        os.unlink(ref.path)
        with self._cache_lock:
            self._info_cache.pop(ref.path, None)

    def protect(self, ref: paths.VolumeRef) -> VolumeInfo:
        """Make the volume a read-only template (the mode linked clones leave their base in)."""
        if not os.path.isfile(ref.path):
            raise NotFound(f"volume {ref.id!r} does not exist", field="id")
        os.chmod(ref.path, TEMPLATE_MODE)
        with self._cache_lock:
            self._info_cache.pop(ref.path, None)
        return self.info(ref)

    def clone(self, src: paths.VolumeRef, dst: paths.VolumeRef, *, linked: bool, fmt: str, on_progress: Progress) -> VolumeInfo:
        source = self.info(src)
        if linked:
            fmt = fmt or "qcow2"
            if fmt != "qcow2":
                raise InvalidArgument("format", "linked clones are qcow2 overlays")
            check_volume_format(fmt, dst.relpath, "format", "path")
            if source.backing_volume and not source.template:
                raise FailedPrecondition(f"source {src.id!r} is itself a linked clone in use; clone a template", field="source")

            def make(tmp: str) -> None:
                qemuimg.create(self.runner, tmp, "qcow2", None, backing=src.path, backing_fmt=source.format, timeout=self.timeout)

            self._produce(dst, "path", make)
            if not source.template:
                os.chmod(src.path, TEMPLATE_MODE)  # the template must never change under its clones
            on_progress(100.0)
            return self.info(dst)
        fmt = fmt or source.format
        check_volume_format(fmt, dst.relpath, "format", "path")
        self._produce(dst, "path", lambda tmp: qemuimg.convert(self.runner, src.path, source.format, tmp, fmt,
                                                                timeout=self.timeout, on_progress=on_progress))
        return self.info(dst)

    def import_(self, src: paths.VolumeRef, src_fmt: str, dst: paths.VolumeRef, fmt: str, on_progress: Progress) -> VolumeInfo:
        if src_fmt and src_fmt not in IMPORT_FORMATS:
            raise InvalidArgument("source_format", f"{src_fmt!r} is not one of {', '.join(IMPORT_FORMATS)}")
        fmt = fmt or "qcow2"
        check_volume_format(fmt, dst.relpath, "format", "path")
        if not os.path.isfile(src.path):
            raise NotFound(f"source: {src.id!r} does not exist", field="source")
        use_fmt, report = self.check_importable(src.path, src_fmt, "source", src.id)
        self._produce(dst, "path", lambda tmp: qemuimg.convert(self.runner, src.path, use_fmt, tmp, fmt,
                                                                timeout=self.timeout, on_progress=on_progress))
        return replace(self.info(dst), check=report)

    def check_importable(self, source: str | ImageSource, src_fmt: str, field: str,
                         name: str) -> tuple[str, qemuimg.CheckReport]:
        """The format to read ``source`` as and its check report, or InvalidArgument naming
        ``field`` when it is not a self-contained, clean image of an importable format."""
        probed = qemuimg.probe_format(self.runner, source, field, timeout=min(self.timeout, 120))
        if probed.format not in IMPORT_FORMATS:
            raise InvalidArgument(field, f"{name!r} is a {probed.format!r} image; importable: {', '.join(IMPORT_FORMATS)}")
        if src_fmt and src_fmt != probed.format and src_fmt != "raw":
            raise InvalidArgument("source_format" if field == "source" else field,
                                  f"{name!r} is a {probed.format} image, not {src_fmt}")
        use_fmt = src_fmt or probed.format
        if use_fmt != "raw":
            if probed.backing_filename:
                raise InvalidArgument(field, f"{name!r} references a backing file ({probed.backing_filename}); "
                                      "imports must be self-contained")
            if probed.data_file:
                raise InvalidArgument(field, f"{name!r} references an external data file; imports must be self-contained")
            if use_fmt == "vmdk" and not probed.self_contained_vmdk:
                raise InvalidArgument(field, f"{name!r} is a {probed.create_type or 'multi-extent'} vmdk whose data is in "
                                      f"other files ({len(probed.extents)} extent(s)); only single-file vmdks "
                                      f"({', '.join(qemuimg.SELF_CONTAINED_VMDK)}) are imported")
            if probed.corrupt:
                raise InvalidArgument(field, f"{name!r} is marked corrupt by qemu")
        report = qemuimg.check(self.runner, source, use_fmt, timeout=self.timeout)
        if not report.clean:
            raise InvalidArgument(field, f"{name!r} failed qemu-img check: {report.summary}; nothing was imported")
        return use_fmt, report

    def import_source(self, source: ImageSource, dst: paths.VolumeRef, field: str, name: str,
                      on_progress: Progress) -> VolumeInfo:
        """An image (possibly inside another file) converted into new volume ``dst``."""
        use_fmt, report = self.check_importable(source, "", field, name)
        self._produce(dst, field, lambda tmp: qemuimg.convert(self.runner, source, use_fmt, tmp, format_of(dst.relpath),
                                                               timeout=self.timeout, on_progress=on_progress))
        return replace(self.info(dst), check=report)

    def export(self, src: paths.VolumeRef, dst: paths.VolumeRef, fmt: str, on_progress: Progress) -> VolumeInfo:
        source = self.info(src)
        fmt = fmt or source.format
        if fmt not in EXPORT_FORMATS:
            raise InvalidArgument("format", f"{fmt!r} is not one of {', '.join(EXPORT_FORMATS)}")
        if os.path.lexists(dst.path):
            raise AlreadyExists(f"path: {dst.id!r} already exists", field="path")
        self._produce(dst, "path", lambda tmp: qemuimg.convert(self.runner, src.path, source.format, tmp, fmt,
                                                                timeout=self.timeout, on_progress=on_progress))
        img = qemuimg.info(self.runner, dst.path, fmt=fmt, timeout=60)
        return VolumeInfo(id=dst.id, datastore=dst.datastore, relpath=dst.relpath, path=dst.path, format=fmt,
                          virtual_size=img.virtual_size, actual_size=img.actual_size)


