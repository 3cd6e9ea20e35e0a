"""SAN LUNs on this host: binding them for VMs, listing them, and removing them once no VM
needs them.

Kernel iSCSI / FC LUNs are host state: ``resolve_lun`` logs in, scans and builds the multipath
map; ``release_lun`` (called by compute after a VM is undefined, a LUN disk detached, or a
define bound for a VM failed) removes them again once no VM uses the LUN, so deleted VMs do not
leave SCSI devices, maps and sessions behind (os-brick's classic leak) and a LUN number reused
for another tenant never meets a stale map (OSSA-2023-003).

Who uses a LUN is known two ways, both told by compute: the defined VMs' disks (the VmDisks
view, handed in by the wiring) and the claims compute makes when it binds a LUN for a VM
(``resolve_lun(vm=...)``), which cover the moment between binding and defining, when the VM is
not in any domain definition yet. A claim ends with that VM's ``release_lun``.

Attach, release and rescan of one datastore take turns (a thread lock, as os-brick's connector
lock), so a release never deletes a device an attach has just found. A release that fails or
runs past its deadline is reported (``lun.release_failed``) and owed: retried after the
datastore's rescan, when its health returns to ok, and at start (the owed set is rebuilt from
those events, so it survives an agent restart).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Protocol, TypeVar

from cna_agent.contracts import DiskSourceBinding, LunRelease, VmDisks
from cna_agent.errors import AgentError, DeadlineExceeded, FailedPrecondition, InvalidArgument, NotFound
from cna_agent.state.eventlog import EventHub
from cna_agent.storage import libiscsi
from cna_agent.storage.executor import StorageExecutor
from cna_agent.storage.model import DatastoreDecl, check_secret_file
from cna_agent.storage.runner import CommandRunner

log = logging.getLogger(__name__)
T = TypeVar("T")

#: Deadline of one LUN release (map flush, path deletes, logout); past it the caller moves on
#: and the release is owed (a hung SAN must not hold a VM deletion).
LUN_RELEASE_TIMEOUT_S = 120.0
#: The event types that make the durable record of owed releases (see _load_owed_releases).
OWED_EVENTS = ("lun.release_failed", "lun.released")


@dataclass(frozen=True)
class LunInfo:
    id: str
    size_bytes: int
    vendor: str = ""
    product: str = ""
    device: str = ""
    paths: int = 0
    used_by: tuple[str, ...] = ()


class SecretStore(Protocol):
    """Defines the libvirt secret for a datastore's CHAP password (storage/secrets.py)."""

    async def ensure(self, usage: str, value: bytes) -> str: ...


class LunManager:
    def __init__(self, datastores: Mapping[str, DatastoreDecl], san_backends: Mapping[str, Any], runner: CommandRunner,
                 executor: StorageExecutor, events: EventHub | None, users: VmDisks | None, *, initiator_iqn: str = "",
                 secrets: SecretStore | None = None, release_timeout: float = LUN_RELEASE_TIMEOUT_S) -> None:
        self.datastores = datastores
        #: datastore name -> kernel iSCSI / FC back-end (cna_agent.storage.san).
        self.san = dict(san_backends)
        self.runner = runner
        self.executor = executor
        self.events = events
        #: The defined VMs' disks (compute's inventory); None on an agent without compute.
        self.users = users
        self.initiator_iqn = initiator_iqn
        self.secrets = secrets
        self.release_timeout = release_timeout
        self._warn_unusable_chap()
        #: One lock per SAN datastore: attach, release and rescan take turns (held in the
        #: executor thread for as long as the host work runs, even past a caller's deadline).
        self._locks = {name: threading.Lock() for name in self.san}
        #: (datastore, WWN) -> UUIDs of VMs that bound the LUN and have not released it.
        self.claims: dict[tuple[str, str], set[str]] = {}
        #: (datastore, WWN, or the lun_id as given when the WWN was not learnt) -> why its
        #: release is still owed. A record that turns out in use or absent is simply dropped.
        self.pending_releases: dict[tuple[str, str], str] = {}

    def _warn_unusable_chap(self) -> None:
        """Say at start-up, not only at the first VM, when a CHAP datastore for QEMU's initiator
        cannot work on this hypervisor connection (the embedded driver: storage/secrets.py)."""
        check = getattr(self.secrets, "check", None)
        for d in self.datastores.values():
            if d.type == "iscsi" and d.initiator == "libiscsi" and d.chap_user and check is not None:
                try:
                    check()
                except FailedPrecondition as exc:
                    log.warning("event=datastore.chap_unusable datastore=%s reason=%r", d.name, exc.message)

    def datastore(self, name: str, field: str) -> DatastoreDecl:
        """The configured datastore ``name``; NotFound naming ``field`` and the known ones."""
        d = self.datastores.get(name)
        if d is None:
            known = ", ".join(sorted(self.datastores)) or "none configured"
            raise NotFound(f"{field}: datastore {name!r} is not configured on this host (known: {known})", field=field)
        return d

    def secret(self, d: DatastoreDecl) -> str:
        return check_secret_file(d.chap_secret_file, f"storage.datastores.{d.name}.chap_secret_file") if d.chap_user else ""

    def exclusive(self, datastore: str, fn: Callable[[], T], wait: float) -> T:
        """Run ``fn`` (in an executor thread) holding the datastore's SAN lock."""
        lock = self._locks[datastore]
        if not lock.acquire(timeout=max(wait, 0.001)):
            raise DeadlineExceeded(f"another attach, release or rescan of datastore {datastore!r} was still running after {wait:g}s")
        try:
            return fn()
        finally:
            lock.release()

    # -- who uses what ---------------------------------------------------------------------------

    async def _defined_users(self, *, strict: bool) -> list[Any]:
        """The defined VMs' disks. Lenient callers (listings) get [] when compute cannot answer;
        strict ones (releases) an error, since "nobody uses it" must never be concluded from
        "nobody could be asked"."""
        if self.users is None:
            if strict:
                raise FailedPrecondition("compute is not running on this agent, so which VMs use the LUN cannot be told")
            return []
        try:
            return await self.users.disk_users()
        except Exception as exc:
            if strict:
                raise FailedPrecondition(f"listing the VMs failed ({getattr(exc, 'message', None) or exc!r})") from None
            return []

    async def lun_users(self, name: str) -> dict[str, list[str]]:
        """"ds:lun_id" -> UUIDs of the defined VMs using it, for listings."""
        out: dict[str, list[str]] = {}
        for use in await self._defined_users(strict=False):
            if use.lun_datastore == name:
                out.setdefault(f"{name}:{use.lun_id}", []).append(use.vm_uuid)
        return out

    # -- binding -------------------------------------------------------------------------------------

    async def resolve_lun(self, datastore: str, lun_id: str, *, field: str, vm: str) -> DiskSourceBinding:
        d = self.datastore(datastore, f"{field}.datastore")
        if d.type == "dir":
            raise InvalidArgument(f"{field}.datastore", f"datastore {datastore!r} is a directory datastore; use a volume source")
        if d.type == "iscsi" and d.initiator == "libiscsi":
            return await self._resolve_libiscsi(d, lun_id, field)
        backend = self.san.get(datastore)
        if backend is None:
            raise FailedPrecondition(f"{field}: datastore {datastore!r} ({d.type}) has no SAN back-end on this host", field=field)
        timeout = d.scan_timeout_s * 4

        def attach() -> Any:
            lun = backend.attach(lun_id, f"{field}.lun_id")
            # Claimed under the datastore lock: a release that runs after this sees the claim
            # and keeps the LUN for the VM about to be defined on it.
            if vm:
                self.claims.setdefault((datastore, lun.wwn), set()).add(vm)
            self.pending_releases.pop((datastore, lun.wwn), None)
            return lun

        lun = await self.executor.run(lambda: self.exclusive(datastore, attach, timeout), timeout=timeout,
                                      what=f"attaching LUN {lun_id} of {datastore}")
        return DiskSourceBinding(kind="block", path=lun.device, format="raw", datastore=datastore, volume_id=lun.wwn)

    async def _resolve_libiscsi(self, d: DatastoreDecl, lun_id: str, field: str) -> DiskSourceBinding:
        """QEMU's own initiator opens the LUN: only its existence and capacity are checked here."""
        lun = libiscsi.parse_lun_id(d, lun_id, f"{field}.lun_id")
        size = await self.executor.run(
            lambda: libiscsi.lun_size(self.runner, d, lun, secret=self.secret(d), timeout=d.scan_timeout_s, field=field),
            timeout=d.scan_timeout_s + 5, what=f"opening LUN {lun} of {d.name}")
        if size <= 0:
            raise NotFound(f"{field}.lun_id: LUN {lun} of {d.target_iqn} has no capacity", field=f"{field}.lun_id")
        user = secret_uuid = ""
        if d.chap_user:
            if self.secrets is None:
                raise FailedPrecondition(f"{field}: datastore {d.name!r} uses CHAP but no libvirt secret store is available")
            try:
                secret_uuid = await self.secrets.ensure(f"cna-datastore-{d.name}", self.secret(d).encode())
            except FailedPrecondition as exc:  # e.g. the embedded driver (storage/secrets.py)
                raise FailedPrecondition(f"{field}: datastore {d.name!r} uses CHAP (storage.datastores.{d.name}.chap_user) "
                                         f"with QEMU's initiator, but {exc.message}", field=field) from None
            user = d.chap_user
        return DiskSourceBinding(kind="network", protocol="iscsi", hosts=d.portal_hosts(), name=f"{d.target_iqn}/{lun}",
                                 format="raw", auth_username=user, auth_secret_uuid=secret_uuid,
                                 datastore=d.name, volume_id=f"{d.target_iqn}/{lun}")

    # -- listing ---------------------------------------------------------------------------------------

    async def list_luns(self, name: str) -> list[LunInfo]:
        d = self.datastore(name, "datastore")
        users = await self.lun_users(name)
        if d.type == "iscsi" and d.initiator == "libiscsi":
            found = await self.executor.run(
                lambda: libiscsi.list_luns(self.runner, d, initiator_iqn=self.initiator_iqn, secret=self.secret(d),
                                           timeout=d.scan_timeout_s),
                timeout=d.scan_timeout_s * 4, what=f"LUN listing of {name}")
            return [LunInfo(id=lun.id, size_bytes=lun.size_bytes,
                            used_by=tuple(users.get(f"{name}:{lun.id}", ()) + tuple(users.get(f"{name}:{lun.lun}", ()))))
                    for lun in found]
        backend = self.san.get(name)
        if backend is None:
            raise FailedPrecondition(f"datastore {name!r} ({d.type}) has no SAN back-end on this host", field="datastore")
        found = await self.executor.run(backend.list_luns, timeout=d.scan_timeout_s * 4, what=f"LUN listing of {name}")
        return [LunInfo(id=lun.wwn, size_bytes=lun.size_bytes, vendor=lun.vendor, product=lun.product, device=lun.device,
                        paths=lun.paths, used_by=tuple(users.get(f"{name}:{lun.wwn}", ()))) for lun in found]

    async def rescan(self, name: str) -> None:
        """Rescan a kernel SAN datastore's target, then retry its owed releases (the scan maps the
        target's LUNs, so what stays afterwards is what really stays)."""
        backend = self.san.get(name)
        if backend is None or not hasattr(backend, "rescan"):
            return
        timeout = self.datastores[name].scan_timeout_s * 4
        try:
            await self.executor.run(lambda: self.exclusive(name, backend.rescan, timeout), timeout=timeout,
                                    what=f"rescan of {name}")
        finally:
            await self.retry_releases(name)

    # -- releasing ---------------------------------------------------------------------------------------

    async def release_lun(self, datastore: str, lun_id: str, *, field: str, vm: str) -> LunRelease:
        """Drop ``vm``'s claim and remove a kernel iSCSI / FC LUN from this host once no VM
        claims or uses it (module docstring). Raises only for bad input; SAN trouble is
        reported and owed."""
        d = self.datastore(datastore, f"{field}.datastore")
        if d.type == "dir":
            raise InvalidArgument(f"{field}.datastore", f"datastore {datastore!r} is a directory datastore; it has no LUNs")
        if d.type == "iscsi" and d.initiator == "libiscsi":
            return "not-needed"  # QEMU's own initiator: its session ended with the QEMU process
        backend = self.san.get(datastore)
        if backend is None:
            raise FailedPrecondition(f"{field}: datastore {datastore!r} ({d.type}) has no SAN back-end on this host", field=field)
        key = (datastore, lun_id)
        try:
            users = [(u.vm_uuid, u.lun_id) for u in await self._defined_users(strict=True) if u.lun_datastore == datastore]
            outcome, wwn, detail = await self.executor.run(
                lambda: self.exclusive(datastore, lambda: self._release_locked(backend, datastore, lun_id, vm, users, field),
                                       self.release_timeout),
                timeout=self.release_timeout, what=f"releasing LUN {lun_id} of datastore {datastore}")
        except InvalidArgument:
            raise
        except AgentError as exc:
            return await self._release_failed(datastore, lun_id, key, vm, exc.message)
        key = (datastore, wwn) if wwn else key
        attrs = {"datastore": datastore, "lun": key[1], "lun_id": lun_id, "vm": vm}
        self._forget_owed(datastore, lun_id, wwn)
        if outcome == "released":
            forced = f" (forced: {detail})" if detail else ""
            log.info("event=lun.released datastore=%s lun=%s vm=%s forced=%r", datastore, key[1], vm, detail)
            await self._publish("lun.released", key, f"LUN {key[1]} of datastore {datastore} removed from this host{forced}",
                                {**attrs, "forced": detail}, severity="warning" if detail else "info")
        else:
            log.info("event=lun.release_skipped datastore=%s lun=%s vm=%s outcome=%s detail=%r", datastore, key[1], vm, outcome, detail)
        return outcome  # type: ignore[return-value]

    def _release_locked(self, backend: Any, datastore: str, lun_id: str, vm: str, users: list[tuple[str, str]],
                        field: str) -> tuple[str, str, str]:
        """(outcome, WWN, detail); runs in an executor thread holding the datastore lock."""
        wwn = backend.wwn_of(lun_id, f"{field}.lun_id")
        if not wwn:
            # Its devices are gone (an earlier release got that far); what may be left is the
            # target's session, logged out here when no LUN of the target is mapped any more.
            return ("released", "", "") if backend.close_idle() else ("absent", "", "")
        claimants = self.claims.get((datastore, wwn), set())
        claimants.discard(vm)
        if not claimants:
            self.claims.pop((datastore, wwn), None)
        for user, other in users:
            try:
                if backend.wwn_of(other, "lun_id") == wwn:  # the same LUN, however that VM spells it
                    return "in-use", wwn, f"used by vm {user}"
            except InvalidArgument:
                continue  # a spelling this datastore cannot serve is not this LUN
        if claimants:
            return "claimed", wwn, f"bound for vm {', '.join(sorted(claimants))}, not defined yet"
        forced = backend.detach(wwn)
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

    def owed(self, datastore: str | None = None) -> list[tuple[str, str]]:
        return [k for k in list(self.pending_releases) if datastore is None or k[0] == datastore]

    async def retry_releases(self, datastore: str | None = None) -> dict[tuple[str, str], LunRelease]:
        """Try every owed release again (of one datastore, or all); never raises."""
        done: dict[tuple[str, str], LunRelease] = {}
        for key in self.owed(datastore):
            ds, lun = key
            if ds not in self.san:
                self.pending_releases.pop(key, None)  # no longer a kernel SAN datastore here
                continue
            try:
                done[key] = await self.release_lun(ds, lun, field="pending_release", vm="")
            except AgentError as exc:
                self.pending_releases.pop(key, None)  # bad input does not get better by retrying
                log.warning("event=lun.release_dropped datastore=%s lun=%s error=%r", ds, lun, exc.message)
        return done

    async def _load_owed_releases(self) -> None:
        """Rebuild the owed releases from the event log, the durable record: a LUN whose last
        release event is "failed" is still owed after an agent restart."""
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

    async def retry_owed_at_start(self) -> None:
        try:
            await self._load_owed_releases()
        except Exception:
            log.exception("event=lun.owed_releases_unreadable")
        if self.pending_releases:
            log.info("event=lun.release_retry owed=%d", len(self.pending_releases))
            await self.retry_releases()
