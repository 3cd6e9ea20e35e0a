"""contracts.ImageStore: the files an appliance import or export touches on dir datastores.

Why a separate face of storage: an OVF package is neither a volume nor VM state. Its files
(an .ova, an .ovf with its disks, an export's staging directory) live on datastores and are
confined like volumes (paths.resolve: lexical checks, symlinks resolved, the datastore root
never left), but compute reads them byte by byte (descriptor, manifest digests, tar headers)
and has disks converted out of them and into them. Conversions go through VolumeManager, so
the same checks guard every image that enters a datastore: a format qemu-img reads, nothing
outside the image itself (backing files, external data files, vmdk extents naming host files)
and a clean ``qemu-img check``.
"""

from __future__ import annotations

import os
import shutil
from typing import Callable

from cna_agent.contracts import ImageFacts, ImageSource
from cna_agent.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from cna_agent.storage import paths, qemuimg
from cna_agent.storage.executor import StorageExecutor
from cna_agent.storage.model import DatastoreDecl
from cna_agent.storage.monitor import DatastoreMonitor
from cna_agent.storage.transfer import temp_name
from cna_agent.storage.volumes import VolumeManager, check_size, check_volume_format, format_of


class ImageFiles:
    def __init__(self, datastores: dict[str, DatastoreDecl], volumes: VolumeManager, executor: StorageExecutor,
                 monitor: DatastoreMonitor, *, command_timeout: float) -> None:
        self.datastores = datastores
        self.volumes = volumes
        self.executor = executor
        self.monitor = monitor
        self.timeout = command_timeout

    def _ref(self, file_id: str, field: str, *, new: bool) -> paths.VolumeRef:
        ds, rel = paths.split_volume_id(file_id, field)
        d = self.datastores.get(ds)
        if d is None:
            known = ", ".join(sorted(self.datastores)) or "none configured"
            raise InvalidArgument(field, f"datastore {ds!r} is not configured on this host (known: {known})")
        if d.type != "dir":
            raise InvalidArgument(field, f"datastore {ds!r} is a {d.type} SAN datastore; packages live on dir datastores")
        health = self.monitor.get(ds)
        if health.state == "unreachable":
            raise FailedPrecondition(f"{field}: datastore {ds!r} is unreachable ({health.reason})", field=field)
        if new:
            paths.check_new_relpath(rel, field)
        return self.volumes.resolve(file_id, field)

    def existing_file(self, file_id: str, *, field: str) -> str:
        ref = self._ref(file_id, field, new=False)
        if not os.path.isfile(ref.path):
            raise NotFound(f"{field}: {file_id!r} is not a file on its datastore", field=field)
        return ref.path

    def new_path(self, file_id: str, *, field: str) -> str:
        ref = self._ref(file_id, field, new=True)
        if os.path.lexists(ref.path):
            raise AlreadyExists(f"{field}: {file_id!r} already exists", field=field)
        return ref.path

    def staging_path(self, path: str) -> str:
        """A hidden name beside ``path`` (one new_path gave) for work in progress: the name
        storage's start-up sweep removes (transfer.temp_name, paths.TEMP_MARK)."""
        return temp_name(path)

    def _volume_ref(self, volume_id: str, field: str) -> paths.VolumeRef:
        ref = self._ref(volume_id, field, new=True)
        check_volume_format(format_of(ref.relpath), ref.relpath, field, field)
        if os.path.lexists(ref.path):
            raise AlreadyExists(f"{field}: volume {volume_id!r} already exists", field=field)
        return ref

    async def probe(self, source: ImageSource, *, field: str) -> ImageFacts:
        name = os.path.basename(source.path) + (f"@{source.offset}" if source.offset else "")

        def run() -> ImageFacts:
            fmt, report = self.volumes.check_importable(source, "", field, name)
            img = qemuimg.info(self.volumes.runner, source, fmt=fmt, timeout=min(self.timeout, 120))
            return ImageFacts(format=fmt, virtual_size=img.virtual_size, subformat=img.create_type,
                              check=report.summary if report.supported else "not supported")

        return await self.executor.run(run, timeout=self.timeout, what=f"probing {name}")

    async def import_image(self, source: ImageSource, volume_id: str, *, field: str,
                           on_progress: Callable[[float], None]) -> ImageFacts:
        ref = self._volume_ref(volume_id, field)
        name = os.path.basename(source.path) + (f"@{source.offset}" if source.offset else "")
        info = await self.executor.run(lambda: self.volumes.import_source(source, ref, field, name, on_progress),
                                       timeout=self.timeout, what=f"importing {name} into {volume_id}")
        return ImageFacts(format=info.format, virtual_size=info.virtual_size,
                          check=info.check.summary if info.check and info.check.supported else "not supported")

    async def blank_volume(self, volume_id: str, size: int, *, field: str) -> None:
        ref = self._volume_ref(volume_id, field)
        check_size(size, field)
        await self.executor.run(lambda: self.volumes.create(ref, format_of(ref.relpath), size), timeout=120,
                                what=f"creating {volume_id}")

    async def write_image(self, volume_id: str, dest_path: str, *, fmt: str, subformat: str = "",
                          on_progress: Callable[[float], None]) -> ImageFacts:
        src = self.volumes.resolve(volume_id, "volume", must_exist=True)

        def run() -> ImageFacts:
            if os.path.lexists(dest_path):
                raise AlreadyExists(f"{dest_path} already exists", field="path")
            if not os.path.isdir(os.path.dirname(dest_path)):
                raise FailedPrecondition(f"{os.path.dirname(dest_path)} is not a directory", field="path")
            source_fmt = format_of(src.relpath)
            qemuimg.convert(self.volumes.runner, src.path, source_fmt, dest_path, fmt, timeout=self.timeout,
                            on_progress=on_progress, subformat=subformat)
            paths.fsync_path(dest_path)
            img = qemuimg.info(self.volumes.runner, dest_path, fmt=fmt, timeout=60)
            return ImageFacts(format=fmt, virtual_size=img.virtual_size, subformat=img.create_type,
                              file_size=os.path.getsize(dest_path))

        return await self.executor.run(run, timeout=self.timeout, what=f"writing {volume_id} as {fmt}")

    async def free_bytes(self, datastore: str, *, field: str) -> int:
        d = self.datastores.get(datastore)
        if d is None or d.type != "dir":
            raise InvalidArgument(field, f"{datastore!r} is not a dir datastore on this host")

        def run() -> int:
            st = os.statvfs(d.path)
            return st.f_bavail * st.f_frsize

        return await self.executor.run(run, timeout=10, what=f"free space of {datastore}")

    async def remove(self, path: str) -> None:
        roots = [os.path.realpath(r) for r in self.volumes.roots.values()]
        if not any(paths.inside(r, path) and path != r for r in roots):
            raise InvalidArgument("path", f"{path} is not inside a datastore")

        def run() -> None:
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                paths.unlink_if_there(path)

        await self.executor.run(run, timeout=120, what=f"removing {path}")

