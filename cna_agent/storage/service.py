"""StorageService: datastores, volumes and LUNs; compute's DiskResolver.

What it owns: the configured datastores (cna_agent.storage.model), the volume manager for
directory datastores, the SAN back-ends (libiscsi, kernel iSCSI, FC), the datastore monitor
and the storage executor. Every blocking step (qemu-img, iscsi-ls, sysfs scans) runs in the
storage executor with a deadline, so a hung array never stalls VM calls. Long work (create,
clone, import, export, resize, delete, rescan) runs as journalled operations with progress;
a repeated request id returns the first operation.

Services never import grpc: results are turned into protobuf messages by factories the
component passes in (``to_volume``/``to_datastore``), as compute does.

Kernel iSCSI / FC LUNs are host state: resolve_lun logs in, scans and builds the multipath
map; release_lun (called by compute after a VM is undefined or a LUN disk detached) removes
them again once no defined VM uses the LUN, so deleted VMs do not leave SCSI devices, maps
and sessions behind (os-brick's classic leak) and a LUN number reused for another tenant
never meets a stale map. Attach, release and rescan of one datastore take turns (a thread
lock, as os-brick's connector lock), so a release never deletes a device an attach has just
found. A release that fails or runs past its deadline is reported (``lun.release_failed``)
and owed: retried after the datastore's rescan, when its health returns to ok, and at start
(the owed set is rebuilt from those events, so it survives an agent restart).
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Mapping, TypeVar

from cna_agent.contracts import DiskSourceBinding, LunRelease
from cna_agent.errors import AgentError, DeadlineExceeded, FailedPrecondition, InvalidArgument, NotFound
from cna_agent.operations import OperationContext, OperationRunner
from cna_agent.state.eventlog import EventHub
from cna_agent.state.journal import OperationRecord
from cna_agent.storage import libiscsi, paths
from cna_agent.storage.executor import StorageExecutor
from cna_agent.storage.model import DatastoreDecl, check_secret_file
from cna_agent.storage.monitor import DatastoreMonitor, Health, Probe, dir_probe
from cna_agent.storage.runner import CommandRunner
from cna_agent.storage.volumes import VolumeInfo, VolumeManager, check_size, format_of

log = logging.getLogger(__name__)
T = TypeVar("T")

#: How long a quick operation is awaited before the caller gets it back still running.
QUICK_WAIT_S = 5.0
#: Deadline of one LUN release (map flush, path deletes, logout); past it the caller moves on
#: and the release is owed (a hung SAN must not hold a VM deletion).
LUN_RELEASE_TIMEOUT_S = 120.0
#: A LUN that resolve_lun attached less than this ago is not released: a VM being created or
#: hot-plugged on it is not in any domain definition yet (compute resolves, then defines).
#: Longer than a create's resolve-to-define window; the release is retried when it ends.
LUN_ATTACH_GRACE_S = 300.0
#: The event types that make the durable record of owed releases (see _load_owed_releases).
OWED_EVENTS = ("lun.release_failed", "lun.release_deferred", "lun.released")


@dataclass(frozen=True)
class LunInfo:
    id: str
    size_bytes: int
    vendor: str = ""
    product: str = ""
    device: str = ""
    paths: int = 0
    used_by: tuple[str, ...] = ()


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


@dataclass
class ResultFactories:
    volume: Callable[[VolumeInfo, tuple[str, ...]], Any] = lambda v, used: None
    datastore: Callable[[DatastoreStatus], Any] = lambda d: None


class SecretStore:
    """Protocol-ish: defines the libvirt secret for a datastore's CHAP password."""

    async def ensure(self, usage: str, value: bytes) -> str:  # pragma: no cover - interface
        raise NotImplementedError


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
        initiator_iqn: str = "",
        secrets: SecretStore | None = None,
        san_backends: Mapping[str, Any] | None = None,
        components: dict[str, Any] | None = None,
        results: ResultFactories | None = None,
        lun_release_timeout: float = LUN_RELEASE_TIMEOUT_S,
        attach_grace_s: float = LUN_ATTACH_GRACE_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.datastores = {d.name: d for d in datastores}
        self.runner = runner
        self.executor = executor
        self.ops = ops
        self.events = events
        self.command_timeout = command_timeout
        self.initiator_iqn = initiator_iqn
        self.secrets = secrets
        #: datastore name -> kernel iSCSI / FC back-end (cna_agent.storage.san).
        self.san = dict(san_backends or {})
        self._components = components if components is not None else {}
        self.results = results or ResultFactories()
        roots = {d.name: d.path for d in datastores if d.type == "dir"}
        self.volumes = VolumeManager(roots, runner, timeout=command_timeout)
        self._secret_uuids: dict[str, str] = {}
        probes: dict[str, Probe] = {}
        for d in datastores:
            if d.type == "dir":
                probes[d.name] = dir_probe(d.path)
            elif d.type == "iscsi" and d.initiator == "libiscsi":
                probes[d.name] = self._libiscsi_probe(d, probe_timeout)
            elif d.name in self.san:
                probes[d.name] = self.san[d.name].probe
        self.monitor = DatastoreMonitor(probes, interval=probe_interval, timeout=probe_timeout, on_change=self._health_changed)
        self.lun_release_timeout = lun_release_timeout
        self.attach_grace_s = attach_grace_s
        self.clock = clock
        #: One lock per SAN datastore: attach, release and rescan take turns (held in the
        #: executor thread for as long as the host work runs, even past a caller's deadline).
        self._san_locks = {name: threading.Lock() for name in self.san}
        #: (datastore, WWN) -> clock() when resolve_lun last attached it (see LUN_ATTACH_GRACE_S).
        self._attached_at: dict[tuple[str, str], float] = {}
        #: (datastore, WWN, or the lun_id as given when the WWN was not learnt) -> why its
        #: release is still owed. A record that turns out in use or absent is simply dropped.
        self.pending_releases: dict[tuple[str, str], str] = {}
        self._background: set[asyncio.Task[Any]] = set()
        self._timers: list[asyncio.TimerHandle] = []
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
        if self.san:
            # In the background: a SAN that does not answer must not hold the agent's start.
            self._spawn(self._retry_owed_at_start(), "lun-release-retry")

    async def stop(self) -> None:
        for handle in self._timers:
            handle.cancel()
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
        if new.state == "ok" and self._owed(name):
            self._spawn(self.retry_releases(name), f"lun-release-retry-{name}")  # the SAN answers again
        await self.events.publish("datastore.health", severity=severity, resource_kind="datastore", resource_id=name,
                                  resource_name=name, message=f"datastore {name} is {new.state}" + (f": {new.reason}" if new.reason else ""),
                                  attributes={"health": new.state, "previous": old.state if old else "", "latency_ms": f"{new.latency_ms:.1f}"})

    def _libiscsi_probe(self, d: DatastoreDecl, timeout: float) -> Probe:
        def probe() -> tuple[bool, str]:
            return libiscsi.probe(self.runner, d, initiator_iqn=self.initiator_iqn, secret=self._secret(d), timeout=timeout)
        return probe

    def _secret(self, d: DatastoreDecl) -> str:
        return check_secret_file(d.chap_secret_file, f"storage.datastores.{d.name}.chap_secret_file") if d.chap_user else ""

    # -- lookups --------------------------------------------------------------------------------------

    def _datastore(self, name: str, field: str) -> DatastoreDecl:
        d = self.datastores.get(name)
        if d is None:
            known = ", ".join(sorted(self.datastores)) or "none configured"
            raise NotFound(f"{field}: datastore {name!r} is not configured on this host (known: {known})", field=field)
        return d

    async def _vms(self, *, strict: bool) -> list[Any]:
        """Compute's defined VMs with their specs. Lenient callers (listings) get [] when
        compute cannot answer; strict ones (releases) an error, since "nobody uses it" must
        never be concluded from "nobody could be asked"."""
        compute = self._components.get("compute")
        svc = getattr(compute, "service", None)
        if svc is None:
            if strict:
                raise FailedPrecondition("compute is not running on this agent, so which VMs use the LUN cannot be told")
            return []
        try:
            return await asyncio.wait_for(svc.list(), 10)
        except Exception as exc:
            if strict:
                raise FailedPrecondition(f"listing the VMs failed ({getattr(exc, 'message', None) or exc!r})") from None
            return []

    async def _lun_users(self, datastore: str) -> list[tuple[str, str]]:
        """(VM uuid, lun_id as its spec spells it) of every defined VM disk on ``datastore``."""
        return [(vm.uuid, disk.lun.lun_id) for vm in await self._vms(strict=True)
                for disk in getattr(vm.spec, "disks", None) or () if disk.lun is not None and disk.lun.datastore == datastore]

    async def _users(self) -> dict[str, list[str]]:
        """volume id / "ds:lun" -> UUIDs of VMs using it (from compute, when it runs)."""
        vms = await self._vms(strict=False)
        users: dict[str, list[str]] = {}
        for vm in vms:
            for disk in getattr(vm.spec, "disks", None) or ():
                key = disk.volume or (f"{disk.lun.datastore}:{disk.lun.lun_id}" if disk.lun else "")
                if key:
                    users.setdefault(key, []).append(vm.uuid)
        return users

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
        d = self._datastore(name, "datastore")
        users = await self._users()
        if d.type == "iscsi" and d.initiator == "libiscsi":
            found = await self.executor.run(
                lambda: libiscsi.list_luns(self.runner, d, initiator_iqn=self.initiator_iqn, secret=self._secret(d),
                                           timeout=d.scan_timeout_s),
                timeout=d.scan_timeout_s * 4, what=f"LUN listing of {name}")
            return [LunInfo(id=lun.id, size_bytes=lun.size_bytes, used_by=tuple(users.get(f"{name}:{lun.id}", ()) + tuple(users.get(f"{name}:{lun.lun}", ()))))
                    for lun in found]
        backend = self.san.get(name)
        if backend is None:
            raise FailedPrecondition(f"datastore {name!r} ({d.type}) has no SAN back-end on this host", field="datastore")
        found = await self.executor.run(backend.list_luns, timeout=d.scan_timeout_s * 4, what=f"LUN listing of {name}")
        return [LunInfo(id=lun.wwn, size_bytes=lun.size_bytes, vendor=lun.vendor, product=lun.product, device=lun.device,
                        paths=lun.paths, used_by=tuple(users.get(f"{name}:{lun.wwn}", ()))) for lun in found]

    async def list_volumes(self, datastore: str) -> list[tuple[VolumeInfo, tuple[str, ...]]]:
        d = self._datastore(datastore, "datastore")
        if d.type != "dir":
            raise FailedPrecondition(f"datastore {datastore!r} is a {d.type} SAN datastore: it holds LUNs, not volumes "
                                     "(see GetDatastore)", field="datastore")
        vols = await self.executor.run(lambda: self.volumes.list(datastore), what=f"volume listing of {datastore}")
        users = await self._users()
        return [(v, tuple(users.get(v.id, ()))) for v in vols]

    async def get_volume(self, volume_id: str, field: str = "id") -> tuple[VolumeInfo, tuple[str, ...]]:
        ref = self._volume_ref(volume_id, field, must_exist=True)
        info = await self.executor.run(lambda: self.volumes.info(ref), timeout=120, what=f"info of {volume_id}")
        return info, tuple((await self._users()).get(ref.id, ()))

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

    # -- DiskResolver (compute's seam) ----------------------------------------------------------------

    async def resolve_volume(self, volume_id: str, *, field: str) -> DiskSourceBinding:
        ref = self._volume_ref(volume_id, field, must_exist=True)
        health = self.monitor.get(ref.datastore)
        if health.state == "unreachable":
            raise FailedPrecondition(f"{field}: datastore {ref.datastore!r} is unreachable ({health.reason})", field=field)
        return DiskSourceBinding(kind="file", path=ref.path, format=format_of(ref.relpath),
                                 supports_direct_io=health.direct_io, datastore=ref.datastore, volume_id=ref.id)

    async def resolve_lun(self, datastore: str, lun_id: str, *, field: str) -> DiskSourceBinding:
        d = self._datastore(datastore, f"{field}.datastore")
        if d.type == "dir":
            raise InvalidArgument(f"{field}.datastore", f"datastore {datastore!r} is a directory datastore; use a volume source")
        if d.type == "iscsi" and d.initiator == "libiscsi":
            lun = libiscsi.parse_lun_id(d, lun_id, f"{field}.lun_id")
            size = await self.executor.run(
                lambda: libiscsi.lun_size(self.runner, d, lun, secret=self._secret(d), timeout=d.scan_timeout_s),
                timeout=d.scan_timeout_s + 5, what=f"opening LUN {lun} of {datastore}")
            if size <= 0:
                raise NotFound(f"{field}.lun_id: LUN {lun} of {d.target_iqn} has no capacity", field=f"{field}.lun_id")
            user = secret_uuid = ""
            if d.chap_user:
                if self.secrets is None:
                    raise FailedPrecondition(f"{field}: datastore {datastore!r} uses CHAP but no libvirt secret store is available")
                secret_uuid = await self.secrets.ensure(f"cna-datastore-{d.name}", self._secret(d).encode())
                user = d.chap_user
            return DiskSourceBinding(kind="network", protocol="iscsi", hosts=d.portal_hosts(), name=f"{d.target_iqn}/{lun}",
                                     format="raw", auth_username=user, auth_secret_uuid=secret_uuid,
                                     datastore=datastore, volume_id=f"{d.target_iqn}/{lun}")
        backend = self.san.get(datastore)
        if backend is None:
            raise FailedPrecondition(f"{field}: datastore {datastore!r} ({d.type}) has no SAN back-end on this host", field=field)
        timeout = d.scan_timeout_s * 4

        def attach() -> Any:
            lun = backend.attach(lun_id, f"{field}.lun_id")
            # Stamped under the datastore lock: a release that runs after this sees it and keeps
            # the LUN for the VM about to be defined on it.
            self._attached_at[(datastore, lun.wwn)] = self.clock()
            self.pending_releases.pop((datastore, lun.wwn), None)
            return lun

        lun = await self.executor.run(lambda: self._exclusive(datastore, attach, timeout), timeout=timeout,
                                      what=f"attaching LUN {lun_id} of {datastore}")
        return DiskSourceBinding(kind="block", path=lun.device, format="raw", datastore=datastore, volume_id=lun.wwn)

    def _exclusive(self, datastore: str, fn: Callable[[], T], wait: float) -> T:
        """Run ``fn`` (in an executor thread) holding the datastore's SAN lock."""
        lock = self._san_locks[datastore]
        if not lock.acquire(timeout=max(wait, 0.001)):
            raise DeadlineExceeded(f"another attach, release or rescan of datastore {datastore!r} was still running after {wait:g}s")
        try:
            return fn()
        finally:
            lock.release()

    async def release_lun(self, datastore: str, lun_id: str, *, field: str, vm: str = "") -> LunRelease:
        """Remove a kernel iSCSI / FC LUN from this host once no defined VM uses it (see the
        module docstring). Raises only for bad input; SAN trouble is reported and owed."""
        d = self._datastore(datastore, f"{field}.datastore")
        if d.type == "dir":
            raise InvalidArgument(f"{field}.datastore", f"datastore {datastore!r} is a directory datastore; it has no LUNs")
        if d.type == "iscsi" and d.initiator == "libiscsi":
            return "not-needed"  # QEMU's own initiator: its session ended with the QEMU process
        backend = self.san.get(datastore)
        if backend is None:
            raise FailedPrecondition(f"{field}: datastore {datastore!r} ({d.type}) has no SAN back-end on this host", field=field)
        key = (datastore, lun_id)
        try:
            users = await self._lun_users(datastore)
            outcome, wwn, detail = await self.executor.run(
                lambda: self._exclusive(datastore, lambda: self._release_locked(backend, datastore, lun_id, users, field),
                                        self.lun_release_timeout),
                timeout=self.lun_release_timeout, what=f"releasing LUN {lun_id} of datastore {datastore}")
        except InvalidArgument:
            raise
        except AgentError as exc:
            return await self._release_failed(datastore, lun_id, key, vm, exc.message)
        key = (datastore, wwn) if wwn else key
        attrs = {"datastore": datastore, "lun": key[1], "lun_id": lun_id, "vm": vm}
        if outcome == "deferred":
            why = f"attached {detail}s ago for a VM being defined; retried when that window ends"
            self.pending_releases[key] = why
            log.info("event=lun.release_deferred datastore=%s lun=%s vm=%s reason=%r", datastore, key[1], vm, why)
            await self._publish("lun.release_deferred", key, f"LUN {key[1]} of datastore {datastore} kept for now: {why}", attrs)
            self._retry_later(datastore, self.attach_grace_s - float(detail) + 1.0)
            return outcome
        self._forget_owed(datastore, lun_id, wwn)
        if outcome == "released":
            forced = f" (forced: {detail})" if detail else ""
            log.info("event=lun.released datastore=%s lun=%s vm=%s forced=%r", datastore, key[1], vm, detail)
            await self._publish("lun.released", key, f"LUN {key[1]} of datastore {datastore} removed from this host{forced}",
                                {**attrs, "forced": detail}, severity="warning" if detail else "info")
        else:
            log.info("event=lun.release_skipped datastore=%s lun=%s vm=%s outcome=%s detail=%r", datastore, key[1], vm, outcome, detail)
        return outcome  # type: ignore[return-value]

    def _release_locked(self, backend: Any, datastore: str, lun_id: str, users: list[tuple[str, str]],
                        field: str) -> tuple[str, str, str]:
        """(outcome, WWN, detail); runs in an executor thread holding the datastore lock."""
        wwn = backend.wwn_of(lun_id, f"{field}.lun_id")
        if not wwn:
            # Its devices are gone (an earlier release got that far); what may be left is the
            # target's session, logged out here when no LUN of the target is mapped any more.
            return ("released", "", "") if backend.close_idle() else ("absent", "", "")
        for user, other in users:
            try:
                if backend.wwn_of(other, "lun_id") == wwn:  # the same LUN, however that VM spells it
                    return "in-use", wwn, f"used by vm {user}"
            except InvalidArgument:
                continue  # a spelling this datastore cannot serve is not this LUN
        since = self._attached_at.get((datastore, wwn))
        if since is not None and self.clock() - since < self.attach_grace_s:
            return "deferred", wwn, f"{self.clock() - since:.0f}"
        forced = backend.detach(wwn)
        self._attached_at.pop((datastore, wwn), None)
        return "released", wwn, ", ".join(forced)

    def _forget_owed(self, datastore: str, lun_id: str, wwn: str) -> None:
        self.pending_releases.pop((datastore, lun_id), None)
        if wwn:
            self.pending_releases.pop((datastore, wwn), None)

    async def _release_failed(self, datastore: str, lun_id: str, key: tuple[str, str], vm: str, reason: str) -> LunRelease:
        self.pending_releases[key] = reason
        log.warning("event=lun.release_failed datastore=%s lun=%s vm=%s error=%r; owed, retried later", datastore, key[1], vm, reason)
        await self._publish("lun.release_failed", key,
                            f"LUN {key[1]} of datastore {datastore} could not be removed from this host: {reason} "
                            "(retried after a rescan, when the datastore is healthy again, and at agent start)",
                            {"datastore": datastore, "lun": key[1], "lun_id": lun_id, "vm": vm, "reason": reason},
                            severity="error")
        return "failed"

    async def _publish(self, type_: str, key: tuple[str, str], message: str, attributes: Mapping[str, str], *,
                       severity: str = "info") -> None:
        if self.events is None:
            return
        try:
            await self.events.publish(type_, severity=severity, resource_kind="lun", resource_id=f"{key[0]}:{key[1]}",
                                      resource_name=key[1], message=message, attributes=dict(attributes))
        except Exception:
            log.exception("event=lun.event_publish_failed type=%s", type_)

    def _owed(self, datastore: str | None = None) -> list[tuple[str, str]]:
        return [k for k in list(self.pending_releases) if datastore is None or k[0] == datastore]

    def _retry_later(self, datastore: str, delay: float) -> None:
        loop = asyncio.get_running_loop()
        self._timers = [t for t in self._timers if not t.cancelled() and t.when() > loop.time()]
        self._timers.append(loop.call_later(max(delay, 1.0), lambda: self._spawn(self.retry_releases(datastore),
                                                                                   f"lun-release-retry-{datastore}")))

    async def retry_releases(self, datastore: str | None = None) -> dict[tuple[str, str], LunRelease]:
        """Try every owed release again (of one datastore, or all); never raises."""
        done: dict[tuple[str, str], LunRelease] = {}
        for key in self._owed(datastore):
            ds, lun = key
            if ds not in self.san:
                self.pending_releases.pop(key, None)  # no longer a kernel SAN datastore here
                continue
            try:
                done[key] = await self.release_lun(ds, lun, field="pending_release")
            except AgentError as exc:
                self.pending_releases.pop(key, None)  # bad input does not get better by retrying
                log.warning("event=lun.release_dropped datastore=%s lun=%s error=%r", ds, lun, exc.message)
        return done

    async def _load_owed_releases(self) -> None:
        """Rebuild the owed releases from the event log, the durable record: a LUN whose last
        release event is "failed" or "deferred" is still owed after an agent restart."""
        if self.events is None:
            return
        owed: dict[tuple[str, str], str] = {}
        after = 0
        while True:
            batch = await self.events.list(after, types=OWED_EVENTS, limit=1000)
            if not batch:
                break
            for e in batch:
                ds, lun, given = e.attributes.get("datastore", ""), e.attributes.get("lun", ""), e.attributes.get("lun_id", "")
                if e.type == "lun.released":
                    owed.pop((ds, lun), None)
                    owed.pop((ds, given), None)
                elif ds and lun:
                    owed[(ds, lun)] = e.message
            after = batch[-1].sequence
        for key, why in owed.items():
            if key[0] in self.san:
                self.pending_releases.setdefault(key, why)

    async def _retry_owed_at_start(self) -> None:
        try:
            await self._load_owed_releases()
        except Exception:
            log.exception("event=lun.owed_releases_unreadable")
        if self.pending_releases:
            log.info("event=lun.release_retry owed=%d", len(self.pending_releases))
            await self.retry_releases()

    def resolve_boot_file(self, path: str, *, field: str) -> str:
        """A direct-boot kernel/initrd named "datastore/rel/path"."""
        return self._volume_ref(path, field, must_exist=True).path

    async def delete_volume(self, volume_id: str, *, field: str) -> None:
        ref = self._volume_ref(volume_id, field)
        if not os.path.exists(ref.path):
            return
        await self.executor.run(lambda: self.volumes.delete(ref), what=f"deleting {volume_id}")
        await self.events.publish("volume.deleted", resource_kind="volume", resource_id=ref.id, resource_name=ref.id,
                                  message=f"volume {ref.id} deleted")

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
                      fingerprint: str, wait: float = QUICK_WAIT_S) -> OperationRecord:
        return await self.ops.submit(kind, target, work, request_id=request_id, fingerprint=fingerprint,
                                     lock_key=f"volume/{target}", wait=wait)

    async def _volume_result(self, info: VolumeInfo) -> Any:
        return self.results.volume(info, tuple((await self._users()).get(info.id, ())))

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

        return await self._submit("volume.resize", ref.id, work, request_id=request_id, fingerprint=fingerprint)

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
            info = await self.executor.run(lambda: self.volumes.clone(src, dst, linked=linked, fmt=fmt, on_progress=report),
                                           timeout=self.command_timeout, what=f"cloning {src.id}")
            await self.events.publish("volume.created", resource_kind="volume", resource_id=dst.id, resource_name=dst.id,
                                      message=f"volume {dst.id} {'linked-cloned' if linked else 'copied'} from {src.id}",
                                      attributes={"source": src.id, "linked": str(linked).lower()}, operation_id=op.id)
            return await self._volume_result(info)

        return await self._submit("volume.clone", dst.id, work, request_id=request_id, fingerprint=fingerprint)

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
            return self.results.volume(info, ())

        return await self._submit("volume.export", dst.id, work, request_id=request_id, fingerprint=fingerprint)

    async def rescan_datastore(self, name: str, *, request_id: str = "", fingerprint: str = "") -> OperationRecord:
        self._datastore(name, "name")

        async def work(op: OperationContext) -> Any:
            backend = self.san.get(name)
            if backend is not None and hasattr(backend, "rescan"):
                timeout = self.datastores[name].scan_timeout_s * 4
                try:
                    await self.executor.run(lambda: self._exclusive(name, backend.rescan, timeout), timeout=timeout,
                                            what=f"rescan of {name}")
                finally:
                    # Owed releases of LUNs no VM uses are retried here, after the scan (which
                    # maps the target's LUNs), so the listing below shows what really stays.
                    await self.retry_releases(name)
            await self.monitor.probe(name)
            return self.results.datastore(await self.get_datastore(name))

        return await self.ops.submit("datastore.rescan", name, work, request_id=request_id, fingerprint=fingerprint,
                                     lock_key=f"datastore/{name}", wait=QUICK_WAIT_S)


def _statvfs(path: str) -> tuple[int, int]:
    st = os.statvfs(path)
    return st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize
