"""StorageService: datastores and volumes, and compute's DiskProvider.

What it owns: the configured datastores (cna_agent.storage.model), the volume manager for
directory datastores, the SAN LUNs (luns.py: libiscsi, kernel iSCSI, FC), the datastore
monitor and the storage executor. Every blocking step (qemu-img, iscsi-ls, sysfs scans) runs in
the storage executor with a deadline, so a hung array never stalls VM calls. Long work
(create, clone, import, export, resize, delete, rescan) runs as journalled operations with
progress; a repeated request id returns the first operation. Results are plain dataclasses
(VolumeInfo with its users, DatastoreStatus); the api layer makes protobuf of them.

Which VMs use a volume or LUN comes from compute (the VmDisks view handed in by the wiring),
never from reading libvirt here.
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass, replace
from typing import Any, Awaitable, Callable, Mapping

from cna_agent.contracts import DiskSourceBinding, LunRelease, VmDisks
from cna_agent.errors import AlreadyExists, FailedPrecondition, InvalidArgument, ResourceExhausted
from cna_agent.operations import OperationContext, OperationRunner
from cna_agent.qemu_access import QemuUser, open_way
from cna_agent.state.eventlog import EventHub
from cna_agent.state.journal import OperationRecord
from cna_agent.storage import libiscsi, paths, qcow2hdr
from cna_agent.storage.executor import StorageExecutor
from cna_agent.storage.images import ImageFiles
from cna_agent.storage.luns import LUN_RELEASE_TIMEOUT_S, LunInfo, LunManager, SecretStore
from cna_agent.storage.model import DatastoreDecl
from cna_agent.storage.monitor import DatastoreMonitor, Health, Probe, dir_probe
from cna_agent.storage.runner import CommandRunner
from cna_agent.storage.volumes import VolumeInfo, VolumeManager, check_size, format_of

log = logging.getLogger(__name__)

#: How long a quick operation is awaited before the caller gets it back still running.
QUICK_WAIT_S = 5.0
#: Under a dir datastore's root: what compute keeps there that is not a volume (DiskProvider.state_area).
STATE_AREA = ".cna-state"


#: Operation kinds that produce a new volume through a temporary file (cancellable until it is
#: put in place).
MAKES_A_VOLUME = frozenset({"volume.create", "volume.clone", "volume.import", "volume.export"})


@dataclass(frozen=True)
class DatastoreStatus:
    name: str
    type: str
    location: str
    initiator: str
    health: Health
    capacity_bytes: int = 0
    free_bytes: int = 0
    allocated_bytes: int = 0
    luns: tuple[LunInfo, ...] = ()


class StorageService:
    def __init__(
        self,
        datastores: tuple[DatastoreDecl, ...],
        runner: CommandRunner,
        executor: StorageExecutor,
        ops: OperationRunner,
        events: EventHub,
        *,
        command_timeout: float,
        probe_interval: float,
        probe_timeout: float,
        users: VmDisks | None = None,
        initiator_iqn: str = "",
        secrets: SecretStore | None = None,
        san_backends: Mapping[str, Any] | None = None,
        lun_release_timeout: float = LUN_RELEASE_TIMEOUT_S,
        qemu_user: Callable[[], QemuUser | None] = lambda: None,
    ) -> None:
        """``qemu_user``: who QEMU runs as (the hypervisor's answer, asked when a VM needs a
        volume), so the directories on the way to its disks can be opened for it."""
        self.datastores = {d.name: d for d in datastores}
        self._qemu_user = qemu_user
        self.runner = runner
        self.executor = executor
        self.ops = ops
        self.events = events
        self.command_timeout = command_timeout
        self.initiator_iqn = initiator_iqn
        #: The defined VMs' disks (compute's inventory), for in-use checks and used_by.
        self.users = users
        self.luns = LunManager(self.datastores, san_backends or {}, runner, executor, events, users,
                               initiator_iqn=initiator_iqn, secrets=secrets, release_timeout=lun_release_timeout)
        roots = {d.name: d.path for d in datastores if d.type == "dir"}
        self.volumes = VolumeManager(roots, runner, timeout=command_timeout)
        probes: dict[str, Probe] = {}
        for d in datastores:
            if d.type == "dir":
                probes[d.name] = dir_probe(d.path)
            elif d.type == "iscsi" and d.initiator == "libiscsi":
                probes[d.name] = self._libiscsi_probe(d, probe_timeout)
            elif d.name in self.luns.san:
                probes[d.name] = self.luns.san[d.name].probe
        self.monitor = DatastoreMonitor(probes, interval=probe_interval, timeout=probe_timeout, on_change=self._health_changed)
        #: compute's ImageStore: the files of OVF packages (images.py).
        self.images = ImageFiles(self.datastores, self.volumes, executor, self.monitor, command_timeout=command_timeout)
        self._background: set[asyncio.Task[Any]] = set()
        self.probe_timeout = probe_timeout
        #: The last LUN listing per SAN datastore, reported while a fresh one is slow.
        self._last_luns: dict[str, tuple[LunInfo, ...]] = {}

    # -- lifecycle ------------------------------------------------------------------------------------

    async def start(self) -> None:
        removed = await self.executor.run(self.volumes.sweep_temp_files, timeout=60, what="temp file sweep")
        for path in removed:
            log.warning("event=storage.partial_removed path=%s", path)
        await self.monitor.probe_all()
        self.monitor.start()
        if self.luns.san:
            # In the background: a SAN that does not answer must not hold the agent's start.
            self._spawn(self.luns.retry_owed_at_start(), "lun-release-retry")

    async def stop(self) -> None:
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        await self.monitor.stop()
        self.executor.shutdown()

    def _spawn(self, coro: Awaitable[Any], name: str) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=name)  # type: ignore[arg-type]
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _health_changed(self, name: str, new: Health, old: Health | None) -> None:
        severity = {"ok": "info", "slow": "warning"}.get(new.state, "error")
        if old is None and new.state == "ok":
            return  # first probe fine: nothing to tell
        if new.state == "ok" and self.luns.owed(name):
            self._spawn(self.luns.retry_releases(name), f"lun-release-retry-{name}")  # the SAN answers again
        await self.events.publish("datastore.health", severity=severity, resource_kind="datastore", resource_id=name,
                                  resource_name=name, message=f"datastore {name} is {new.state}" + (f": {new.reason}" if new.reason else ""),
                                  attributes={"health": new.state, "previous": old.state if old else "", "latency_ms": f"{new.latency_ms:.1f}"})

    def _libiscsi_probe(self, d: DatastoreDecl, timeout: float) -> Probe:
        def probe() -> tuple[bool, str]:
            return libiscsi.probe(self.runner, d, initiator_iqn=self.initiator_iqn, secret=self.luns.secret(d), timeout=timeout)
        return probe

    # -- lookups --------------------------------------------------------------------------------------

    def _datastore(self, name: str, field: str) -> DatastoreDecl:
        return self.luns.datastore(name, field)

    async def _users(self) -> dict[str, list[str]]:
        """volume id -> UUIDs of VMs using it ({} when compute cannot answer: listings only)."""
        if self.users is None:
            return {}
        try:
            uses = await asyncio.wait_for(self.users.disk_users(), 10)
        except Exception:
            return {}
        users: dict[str, list[str]] = {}
        for use in uses:
            if use.volume:
                users.setdefault(use.volume, []).append(use.vm_uuid)
        return users

    def _with_users(self, info: VolumeInfo, users: dict[str, list[str]]) -> VolumeInfo:
        return replace(info, used_by=tuple(users.get(info.id, ())))

    async def list_datastores(self, *, with_luns: bool = False) -> list[DatastoreStatus]:
        return [await self.get_datastore(n, with_luns=with_luns) for n in self.datastores]

    async def get_datastore(self, name: str, *, with_luns: bool = True, field: str = "name") -> DatastoreStatus:
        d = self._datastore(name, field)
        health = self.monitor.get(name)
        cap = free = alloc = 0
        luns: tuple[LunInfo, ...] = ()
        location = ""
        if d.type == "dir":
            location = d.path
            if health.state in ("ok", "slow"):
                try:
                    cap, free = await self.executor.run(lambda: _statvfs(d.path), timeout=5, what=f"statvfs {d.path}")
                except Exception as exc:
                    log.warning("event=datastore.statvfs_failed datastore=%s error=%s", name, exc)
        else:
            if d.type == "iscsi":
                location = ",".join(f"iscsi://{libiscsi.portal_url(h, p)}/{d.target_iqn}" for h, p in d.portal_hosts())
            else:
                location = ",".join(d.target_wwpns) or ",".join(d.lun_wwns)
            if with_luns and health.state != "unreachable":
                # A hung array must not hang GetDatastore: the listing gets the probe's deadline
                # and the last known LUNs are reported meanwhile (it keeps running in the storage
                # executor and refreshes the cache if it ever returns).
                listing = asyncio.ensure_future(self.list_luns(name))
                listing.add_done_callback(lambda t: t.cancelled() or t.exception() is not None
                                          or self._last_luns.__setitem__(name, tuple(t.result())))
                try:
                    luns = tuple(await asyncio.wait_for(asyncio.shield(listing), timeout=self.probe_timeout))
                except asyncio.TimeoutError:
                    luns = self._last_luns.get(name, ())
                    log.warning("event=datastore.lun_list_slow datastore=%s timeout_s=%s", name, self.probe_timeout)
                except Exception as exc:
                    log.warning("event=datastore.lun_list_failed datastore=%s error=%s", name, exc)
            cap = sum(lun.size_bytes for lun in luns)
            alloc = sum(lun.size_bytes for lun in luns if lun.used_by)
            free = cap - alloc
        return DatastoreStatus(name=name, type=d.type, location=location, initiator=d.initiator if d.type == "iscsi" else "",
                               health=health, capacity_bytes=cap, free_bytes=free, allocated_bytes=alloc, luns=luns)

    async def list_luns(self, name: str) -> list[LunInfo]:
        return await self.luns.list_luns(name)

    async def list_volumes(self, datastore: str) -> list[VolumeInfo]:
        d = self._datastore(datastore, "datastore")
        if d.type != "dir":
            raise FailedPrecondition(f"datastore {datastore!r} is a {d.type} SAN datastore: it holds LUNs, not volumes "
                                     "(see GetDatastore)", field="datastore")
        vols = await self.executor.run(lambda: self.volumes.list(datastore), what=f"volume listing of {datastore}")
        users = await self._users()
        return [self._with_users(v, users) for v in vols]

    async def get_volume(self, volume_id: str, field: str = "id") -> VolumeInfo:
        ref = self._volume_ref(volume_id, field, must_exist=True)
        info = await self.executor.run(lambda: self.volumes.info(ref), timeout=120, what=f"info of {volume_id}")
        return self._with_users(info, await self._users())

    def _volume_ref(self, volume_id: str, field: str, *, must_exist: bool = False) -> paths.VolumeRef:
        ds, _ = paths.split_volume_id(volume_id, field)
        d = self._datastore(ds, field)
        if d.type != "dir":
            raise InvalidArgument(field, f"datastore {ds!r} is a {d.type} SAN datastore; attach its LUNs with a lun source")
        return self.volumes.resolve(volume_id, field, must_exist=must_exist)

    def _new_ref(self, datastore: str, path: str, ds_field: str = "datastore", path_field: str = "path") -> paths.VolumeRef:
        d = self._datastore(datastore, ds_field)
        if d.type != "dir":
            raise InvalidArgument(ds_field, f"datastore {datastore!r} is a {d.type} SAN datastore; volumes live on dir datastores")
        return self.volumes.ref(datastore, path, path_field, ds_field)

    # -- DiskProvider (compute's seam, contracts.py) ----------------------------------------------------

    async def resolve_volume(self, volume_id: str, *, field: str) -> DiskSourceBinding:
        ref = self._volume_ref(volume_id, field, must_exist=True)
        health = self.monitor.get(ref.datastore)
        if health.state == "unreachable":
            raise FailedPrecondition(f"{field}: datastore {ref.datastore!r} is unreachable ({health.reason})", field=field)
        user = self._qemu_user()
        if user is not None and user.unprivileged:
            await self.executor.run(lambda: self._open_way(ref, user, field), what=f"opening the way to {volume_id}")
        return DiskSourceBinding(kind="file", path=ref.path, format=format_of(ref.relpath),
                                 supports_direct_io=health.direct_io, datastore=ref.datastore, volume_id=ref.id)

    def _open_way(self, ref: paths.VolumeRef, user: QemuUser, field: str) -> None:
        """QEMU's user must reach the volume and every image of its backing chain (libvirt
        relabels the files, never the directories): the datastore's own subdirectories on the
        way are opened, its root and what is above it only checked (qemu_access)."""
        for path in [ref.path, *qcow2hdr.backing_chain(ref.path)]:
            real = os.path.realpath(path)
            for name, root in self.volumes.roots.items():
                if paths.inside(os.path.realpath(root), real):
                    open_way(real, owned_below=os.path.realpath(root), user=user, field=field,
                             what=f"volume {ref.id!r}" if path == ref.path else f"the backing file {real} of volume {ref.id!r}")
                    break

    async def resolve_lun(self, datastore: str, lun_id: str, *, field: str, vm: str) -> DiskSourceBinding:
        return await self.luns.resolve_lun(datastore, lun_id, field=field, vm=vm)

    async def release_lun(self, datastore: str, lun_id: str, *, field: str, vm: str) -> LunRelease:
        return await self.luns.release_lun(datastore, lun_id, field=field, vm=vm)

    def resolve_boot_file(self, path: str, *, field: str) -> str:
        """A direct-boot kernel/initrd named "datastore/rel/path"."""
        return self._volume_ref(path, field, must_exist=True).path

    async def new_volume(self, volume_id: str, size: int, *, room: int, field: str) -> DiskSourceBinding:
        """DiskProvider: an empty volume of ``size`` bytes (format by its name) that a VM's disk
        is about to be copied into, refused before anything is made when the datastore has less
        than ``room`` bytes free (ResourceExhausted) or the name is taken (AlreadyExists)."""
        ds, rel = paths.split_volume_id(volume_id, field)
        ref = self._new_ref(ds, rel, ds_field=field, path_field=field)
        if os.path.lexists(ref.path):
            raise AlreadyExists(f"{field}: volume {ref.id!r} already exists", field=field)
        health = self.monitor.get(ds)
        if health.state == "unreachable":
            raise FailedPrecondition(f"{field}: datastore {ds!r} is unreachable ({health.reason})", field=field)
        free = await self.executor.run(lambda: self.volumes._free_bytes(ref), timeout=10, what=f"free space of {ds}")
        if free < room:
            raise ResourceExhausted(f"{field}: datastore {ds!r} has {free >> 20} MiB free; the copy needs {room >> 20} MiB",
                                    field=field)
        await self.executor.run(lambda: self.volumes.create(ref, format_of(ref.relpath), size), timeout=120,
                                what=f"creating {ref.id}")
        return await self.resolve_volume(ref.id, field=field)

    async def clone_for_vm(self, source_id: str, volume_id: str, *, linked: bool, field: str) -> DiskSourceBinding:
        """DiskProvider: a deployed VM's volume, cloned inside the deploy's own operation."""
        src = self._volume_ref(source_id, field, must_exist=True)
        ds, rel = paths.split_volume_id(volume_id, field)
        dst = self._new_ref(ds, rel, ds_field=field, path_field=field)
        if os.path.lexists(dst.path):
            raise AlreadyExists(f"{field}: volume {dst.id!r} already exists", field=field)
        await self._clone(src, dst, linked=linked, fmt="qcow2" if linked else "", on_progress=lambda _: None)
        return await self.resolve_volume(dst.id, field=field)

    async def protect_template(self, volume_id: str, *, field: str) -> None:
        """DiskProvider: the volume read-only, as a linked clone would leave it."""
        ref = self._volume_ref(volume_id, field, must_exist=True)
        await self.executor.run(lambda: self.volumes.protect(ref), timeout=30, what=f"protecting {ref.id}")

    async def state_area(self, datastore: str, *, field: str) -> str:
        """DiskProvider: ``<root>/.cna-state`` of a dir datastore (a dot directory: never
        listed as volumes, and no volume path may name it, paths.check_new_relpath)."""
        d = self._datastore(datastore, field)
        if d.type != "dir":
            raise FailedPrecondition(f"{field}: datastore {datastore!r} is a {d.type} SAN datastore; VM state is kept on "
                                     "dir datastores", field=field)
        health = self.monitor.get(datastore)
        if health.state == "unreachable":
            raise FailedPrecondition(f"{field}: datastore {datastore!r} is unreachable ({health.reason})", field=field)
        return os.path.join(os.path.realpath(d.path), STATE_AREA)

    async def delete_volume(self, volume_id: str, *, field: str) -> None:
        """DiskProvider: a VM's volume, with the overlays its external snapshots made on it.

        A live snapshot puts a qcow2 overlay named ``<disk>.<snapshot>.qcow2`` on each disk
        (compute/snapshots.py) that the VM's spec does not list; left in place it made the disk
        a "template" that could not be deleted (seen in the soak: DeleteVm with delete_disks
        failed after the VM was undefined). Those overlays go first, top of the chain first; a
        linked clone of another name is someone else's and still refuses the delete."""
        ref = self._volume_ref(volume_id, field)
        if not os.path.exists(ref.path):
            return
        stem = os.path.splitext(ref.path)[0] + "."
        children = await self.executor.run(lambda: self.volumes.dependents(ref), what=f"overlays of {volume_id}")
        for child in children:
            if self._volume_ref(child, field).path.startswith(stem):
                await self.delete_volume(child, field=field)
        await self.executor.run(lambda: self.volumes.delete(ref), what=f"deleting {volume_id}")
        await self.events.publish("volume.deleted", resource_kind="volume", resource_id=ref.id, resource_name=ref.id,
                                  message=f"volume {ref.id} deleted")

    async def check_deletable(self, volume_id: str, *, field: str) -> None:
        """DiskProvider: what delete_volume would refuse, found before anything is deleted:
        a dependent anywhere under the volume that is not one of its own snapshot overlays."""
        ref = self._volume_ref(volume_id, field)
        if not os.path.exists(ref.path):
            return
        stem = os.path.splitext(ref.path)[0] + "."
        children = await self.executor.run(lambda: self.volumes.dependents(ref), what=f"overlays of {volume_id}")
        foreign = [c for c in children if not self._volume_ref(c, field).path.startswith(stem)]
        if foreign:
            raise FailedPrecondition(f"{field}: volume {ref.id!r} is the template of linked clone(s) {', '.join(foreign[:10])}; "
                                     "delete them first, or delete the VM without delete_disks", field=field)
        for child in children:
            await self.check_deletable(child, field=field)

    # -- operations -----------------------------------------------------------------------------------

    def _progress(self, op: OperationContext, stage: str, total: int) -> Callable[[float], None]:
        loop = asyncio.get_running_loop()
        last = [-1]

        def report(pct: float) -> None:
            p = int(pct)
            if p == last[0]:
                return
            last[0] = p
            coro = op.progress(p, stage, bytes_done=total * p // 100 if total else None, bytes_total=total or None)
            loop.call_soon_threadsafe(lambda: loop.create_task(coro))

        return report

    async def _submit(self, kind: str, target: str, work: Callable[[OperationContext], Awaitable[Any]], *, request_id: str,
                      fingerprint: str, wait: float = QUICK_WAIT_S, metadata: dict[str, str] | None = None) -> OperationRecord:
        # The kinds that make a new volume take a cancel: qemu-img is killed and the temporary
        # file removed, up to the moment the volume is put in place (VolumeStore._commit).
        return await self.ops.submit(kind, target, work, request_id=request_id, fingerprint=fingerprint,
                                     lock_key=f"volume/{target}", wait=wait, cancellable=kind in MAKES_A_VOLUME,
                                     metadata=metadata)

    async def _volume_result(self, info: VolumeInfo) -> VolumeInfo:
        return self._with_users(info, await self._users())

    async def create_volume(self, datastore: str, path: str, fmt: str, size: int, *, preallocate: bool = False,
                            request_id: str = "", fingerprint: str = "") -> OperationRecord:
        ref = self._new_ref(datastore, path)
        from cna_agent.storage.volumes import check_volume_format

        check_volume_format(fmt, ref.relpath, "format", "path")
        check_size(size, "size_bytes")

        async def work(op: OperationContext) -> Any:
            await op.progress(0, "creating")
            info = await self.executor.run(lambda: self.volumes.create(ref, fmt, size, preallocate=preallocate),
                                           timeout=self.command_timeout, what=f"creating {ref.id}")
            await self.events.publish("volume.created", resource_kind="volume", resource_id=ref.id, resource_name=ref.id,
                                      message=f"volume {ref.id} created ({fmt}, {size} bytes)", operation_id=op.id)
            return await self._volume_result(info)

        return await self._submit("volume.create", ref.id, work, request_id=request_id, fingerprint=fingerprint)

    async def resize_volume(self, volume_id: str, new_size: int, *, request_id: str = "", fingerprint: str = "") -> OperationRecord:
        ref = self._volume_ref(volume_id, "id", must_exist=True)
        check_size(new_size, "new_size_bytes")
        if (await self._users()).get(ref.id):
            raise FailedPrecondition(f"volume {ref.id!r} is attached to a VM; grow it with ResizeDisk (blockResize) instead",
                                     field="id")

        async def work(op: OperationContext) -> Any:
            info = await self.executor.run(lambda: self.volumes.resize(ref, new_size), timeout=self.command_timeout,
                                           what=f"resizing {ref.id}")
            return await self._volume_result(info)

        return await self._submit("volume.resize", ref.id, work, request_id=request_id, fingerprint=fingerprint,
                                  metadata={"new_size_bytes": str(new_size)})

    async def delete_volume_op(self, volume_id: str, *, request_id: str = "", fingerprint: str = "") -> OperationRecord:
        ref = self._volume_ref(volume_id, "id", must_exist=True)

        async def work(op: OperationContext) -> Any:
            users = tuple((await self._users()).get(ref.id, ()))
            await self.executor.run(lambda: self.volumes.delete(ref, in_use_by=users), what=f"deleting {ref.id}")
            await self.events.publish("volume.deleted", resource_kind="volume", resource_id=ref.id, resource_name=ref.id,
                                      message=f"volume {ref.id} deleted", operation_id=op.id)
            return None

        return await self._submit("volume.delete", ref.id, work, request_id=request_id, fingerprint=fingerprint)

    async def clone_volume(self, source: str, datastore: str, path: str, *, linked: bool, fmt: str = "",
                           request_id: str = "", fingerprint: str = "") -> OperationRecord:
        src = self._volume_ref(source, "source", must_exist=True)
        dst = self._new_ref(datastore, path)

        async def work(op: OperationContext) -> Any:
            src_info = await self.executor.run(lambda: self.volumes.info(src), timeout=120, what=f"info of {src.id}")
            if not linked and (await self._users()).get(src.id):
                log.info("event=volume.clone_in_use source=%s", src.id)  # qemu-img -U copies a crash-consistent view
            report = self._progress(op, "linking" if linked else "copying", src_info.virtual_size)
            return await self._volume_result(await self._clone(src, dst, linked=linked, fmt=fmt, on_progress=report,
                                                               operation_id=op.id))

        return await self._submit("volume.clone", dst.id, work, request_id=request_id, fingerprint=fingerprint)

    async def _clone(self, src: paths.VolumeRef, dst: paths.VolumeRef, *, linked: bool, fmt: str,
                     on_progress: Callable[[float], None], operation_id: str = "") -> VolumeInfo:
        """The one clone path (CloneVolume, and a deploy's clones): the copy or overlay, then
        the volume.created event."""
        info = await self.executor.run(lambda: self.volumes.clone(src, dst, linked=linked, fmt=fmt, on_progress=on_progress),
                                       timeout=self.command_timeout, what=f"cloning {src.id}")
        await self.events.publish("volume.created", resource_kind="volume", resource_id=dst.id, resource_name=dst.id,
                                  message=f"volume {dst.id} {'linked-cloned' if linked else 'copied'} from {src.id}",
                                  attributes={"source": src.id, "linked": str(linked).lower()}, operation_id=operation_id)
        return info

    async def import_volume(self, source: str, source_format: str, datastore: str, path: str, fmt: str = "", *,
                            request_id: str = "", fingerprint: str = "") -> OperationRecord:
        src = self._volume_ref(source, "source", must_exist=True)
        dst = self._new_ref(datastore, path)

        async def work(op: OperationContext) -> Any:
            await op.progress(0, "checking source")
            size = os.path.getsize(src.path)
            report = self._progress(op, "converting", size)
            info = await self.executor.run(lambda: self.volumes.import_(src, source_format, dst, fmt, on_progress=report),
                                           timeout=self.command_timeout, what=f"importing {src.id}")
            check = info.check
            await self.events.publish(
                "volume.imported", severity="warning" if check and check.leaks else "info", resource_kind="volume",
                resource_id=dst.id, resource_name=dst.id, operation_id=op.id,
                message=f"volume {dst.id} imported from {src.id}; qemu-img check: {check.summary if check else 'not run'}",
                attributes={"source": src.id, "check": check.summary if check else "",
                            "leaks": str(check.leaks if check else 0)})
            return await self._volume_result(info)

        return await self._submit("volume.import", dst.id, work, request_id=request_id, fingerprint=fingerprint)

    async def export_volume(self, volume_id: str, datastore: str, path: str, fmt: str = "", *,
                            request_id: str = "", fingerprint: str = "") -> OperationRecord:
        src = self._volume_ref(volume_id, "id", must_exist=True)
        dst = self._new_ref(datastore, path)

        async def work(op: OperationContext) -> Any:
            src_info = await self.executor.run(lambda: self.volumes.info(src), timeout=120, what=f"info of {src.id}")
            report = self._progress(op, "exporting", src_info.virtual_size)
            info = await self.executor.run(lambda: self.volumes.export(src, dst, fmt, on_progress=report),
                                           timeout=self.command_timeout, what=f"exporting {src.id}")
            return info

        return await self._submit("volume.export", dst.id, work, request_id=request_id, fingerprint=fingerprint)

    async def rescan_datastore(self, name: str, *, request_id: str = "", fingerprint: str = "") -> OperationRecord:
        self._datastore(name, "name")

        async def work(op: OperationContext) -> Any:
            await self.luns.rescan(name)
            await self.monitor.probe(name)
            return await self.get_datastore(name)

        return await self.ops.submit("datastore.rescan", name, work, request_id=request_id, fingerprint=fingerprint,
                                     lock_key=f"datastore/{name}", wait=QUICK_WAIT_S)


def _statvfs(path: str) -> tuple[int, int]:
    st = os.statvfs(path)
    return st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize
