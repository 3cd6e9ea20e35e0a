"""Cold migration, the source's side: a shut-off VM's definition, and the volumes the
destination cannot already see, move to another agent's host as one ``vm.migrate_cold``
operation (its own journal kind: recovery after a restart must not mistake it for a live job,
which libvirt would still know about; nothing here is resumed after a restart, the operation is
closed as failed and the destination's preparation expires).

The VRM calls the same MigrateVm for running and stopped VMs (it need not know the state);
VmMigrations.migrate hands a shut-off VM here. Why this order (nova's cold migrate/resize,
VDSM's disk move), each step undone by the destination's AbortColdIncoming while the source
still holds the only definition:

1. The destination prepares first: validates the spec, refuses a name/uuid it already has,
   claims placement, LUNs and port groups, and says per disk whether it already sees the very
   same file (a shared datastore: not copied) or where the copy goes (same datastore name and
   relative path under its own root), refusing one without room.
2. Each volume to copy is streamed (storage/transfer.py: zero blocks skipped, a content digest
   checked against the destination's disk before the file gets its name), with bytes
   done/total on this operation.
3. The destination defines the VM from its own rendering of the spec (its paths, its pins);
   only when that succeeded is the VM undefined here (never defined on neither host), its
   claims released, and the copied source volumes deleted: a moved VM whose disks stay behind
   is a space leak nobody owns (VDSM's move deletes the source after success; nova deletes the
   source's copy at confirm). ``keep_source_volumes`` keeps them (a copy instead of a move of
   the data, e.g. for a later rollback by hand).

Failure or cancel before step 3 completed: the destination is told to abort (its partial and
finished copies are removed, its claims released); nothing here changed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import libvirt

from cna_agent import cancel as cancelling
from cna_agent.compute.binder import Binder
from cna_agent.compute.rundirs import QemuRunDirs
from cna_agent.compute.spec import VmSpec
from cna_agent.compute.vmops import VmOps
from cna_agent.contracts import ColdMigrationPeer, FileIdentity, ReceivePlan, VolumeTransfer
from cna_agent.compute import state as st
from cna_agent.compute.inventory import VmInfo, presence
from cna_agent.failpoints import crash_point
from cna_agent.errors import CODES, FailedPrecondition, NotFound, ResourceBusy, Unavailable
from cna_agent.operations import OperationContext
from cna_agent.state.journal import OperationError, OperationRecord

log = logging.getLogger(__name__)

#: Progress is written at most this often while bytes stream (each write is a journal update).
PROGRESS_INTERVAL_S = 0.5


def copy_candidates(spec: VmSpec) -> list[int]:
    """Indexes of the disks backed by a file (a datastore volume or a host path): those the
    destination must see or receive. SAN LUNs are reached from every host and are not listed."""
    return [i for i, d in enumerate(spec.disks) if d.volume]


def deletable_after_move(spec: VmSpec, i: int) -> bool:
    """A copied source volume is deleted after the move only when it is the VM's own: not a
    shareable or read-only disk and not a CD-ROM (an ISO other VMs may use)."""
    d = spec.disks[i]
    return bool(d.volume) and not d.volume.startswith("/") and not (d.shareable or d.readonly or d.device == "cdrom")


class ColdMigrations:
    """``vm.migrate_cold`` on the source. Collaborators: the VM operations (lock, journal,
    events), the binder (disk paths here; claims to release after the move), the run
    directories, the peer (contracts.MigrationPeer's cold calls) and storage's VolumeTransfer
    (None on an agent without datastores: only disks the destination already sees can move)."""

    def __init__(self, ops: VmOps, binder: Binder, run_dirs: QemuRunDirs, peer: ColdMigrationPeer, transfer: VolumeTransfer | None, *,
                 host_uuid: str = "") -> None:
        self.ops = ops
        self.hv = ops.hv
        self.binder = binder
        self.run_dirs = run_dirs
        self.peer = peer
        self.transfer = transfer
        self.host_uuid = host_uuid

    async def migrate(self, uuid: str, spec: VmSpec, destination: str, outgoing: set[str], max_outgoing: int, *,
                      keep_source_volumes: bool = False, bandwidth_mib_s: int = 0, request_id: str = "",
                      fingerprint: str = "") -> OperationRecord:
        """``outgoing``/``max_outgoing``: the host's limit shared with live migrations;
        ``bandwidth_mib_s``: the policy's bandwidth cap, applied to the volume copies (0 = none),
        so a move does not saturate the storage network the running VMs share."""
        if len(outgoing) >= max_outgoing and uuid not in outgoing:
            raise ResourceBusy(f"{len(outgoing)} outgoing migrations already run on this host (limit {max_outgoing}); "
                               "retry when one has finished", field="vm")

        async def work(op: OperationContext) -> Any:
            outgoing.add(uuid)
            try:
                return await self._run(op, uuid, destination, keep_source_volumes, bandwidth_mib_s)
            finally:
                outgoing.discard(uuid)

        return await self.ops.submit("vm.migrate_cold", uuid, work, request_id=request_id, fingerprint=fingerprint,
                                     cancellable=True, metadata={"destination": destination, "name": spec.name,
                                                                 "keep_source_volumes": str(keep_source_volumes).lower()})

    async def _run(self, op: OperationContext, uuid: str, destination: str, keep: bool, bandwidth_mib_s: int) -> Any:
        # Read under the VM lock: a disk attached since the request was checked counts.
        spec = await self.ops.inventory.spec(uuid)
        if await self.ops.inventory.running(uuid):
            raise FailedPrecondition(f"vm {spec.name!r} was started before its cold migration began", field="vm")
        snaps = await self.hv.call(lambda c: c.lookupByUUIDString(uuid).snapshotNum(0), timeout=15)
        if snaps:
            raise FailedPrecondition(f"vm {spec.name!r} has {snaps} snapshot(s), whose metadata would not move; delete "
                                     "or revert them first", field="vm")
        if self.transfer is None:
            raise FailedPrecondition("cold migration needs the storage subsystem (it reads and copies the volumes), "
                                     "which is not running on this agent", field="vm")
        transfer = self.transfer
        await op.progress(2, "preparing the destination")
        files: dict[int, str] = {}
        idents: dict[int, FileIdentity] = {}
        for i in copy_candidates(spec):
            binding = await self.binder.disk(spec, i, field=f"spec.disks[{i}]")
            files[i] = binding.path
            idents[i] = await transfer.identify(binding.path)
        try:
            plans: dict[int, ReceivePlan] = await self.peer.prepare_cold(destination, op.id, spec, idents, self.host_uuid)
        except Unavailable:
            # It may have prepared and lost the answer: have it drop that now (it also lapses by itself).
            await self._tell_abort(uuid, destination, op.id, "its preparation got no answer")
            raise
        copies = [i for i in files if plans[i].copy]
        # What recovery may delete here once the VM is known to be on the destination.
        await op.note(own_copies=",".join(spec.disks[i].volume for i in copies if deletable_after_move(spec, i)))
        await self.ops.events.publish("vm.migration_started", resource_kind="vm", resource_id=uuid, resource_name=spec.name,
                                      message=f"{spec.name} (shut off) moving to {destination}", operation_id=op.id,
                                      attributes={"destination": destination, "cold": "true",
                                                  "disks_copied": str(len(copies)), "disks_shared": str(len(files) - len(copies))})
        try:
            copied = await self._copy(op, transfer, spec, destination, files, idents, copies, bandwidth_mib_s)
            if await self.ops.inventory.running(uuid):  # started behind the agent's back (virsh): it stays here
                raise FailedPrecondition(f"vm {spec.name!r} was started outside the agent during its cold migration",
                                         field="vm")
            # The destination defines the VM now: from here it is there, whatever a cancel says.
            cancelling.commit(f"{spec.name} is being defined on {destination}")
            await op.progress(97, "defining on the destination")
            vm = await self.peer.finish_cold(destination, op.id)
            await op.note(defined_on_destination="true")
            crash_point("vm.migrate_cold.defined")  # defined on both hosts: recovery completes the move
        except BaseException as exc:
            reason = "cancelled" if isinstance(exc, asyncio.CancelledError) else str(exc)
            await self._tell_abort(uuid, destination, op.id, reason)
            await self.ops.events.publish("vm.migration_failed", severity="warning", resource_kind="vm", resource_id=uuid,
                                          resource_name=spec.name, message=f"{spec.name} stays on this host: {reason}",
                                          operation_id=op.id, attributes={"destination": destination, "cold": "true"})
            raise
        await op.progress(99, "removing the source's definition")
        try:
            await self._leave(uuid, spec)
        except Exception as exc:
            # Defined on both hosts (both stopped): never lost, but the VRM must pick one.
            await self.ops.events.publish("vm.migration_cleanup_failed", severity="error", resource_kind="vm",
                                          resource_id=uuid, resource_name=spec.name, operation_id=op.id,
                                          message=f"{spec.name} is defined on {destination} now, but its definition here "
                                                  f"could not be removed: {exc}", attributes={"destination": destination})
            raise FailedPrecondition(f"vm {spec.name!r} was defined on {destination}, but undefining it here failed ({exc}); "
                                     "it is defined, shut off, on both hosts: delete it here", field="vm") from None
        removed = 0 if keep else await self._delete_copied(spec, copies)
        await self.ops.events.publish("vm.migrated", resource_kind="vm", resource_id=uuid, resource_name=spec.name,
                                      message=f"{spec.name} moved to {destination} (cold)", operation_id=op.id,
                                      attributes={"destination": destination, "cold": "true", "bytes_copied": str(copied),
                                                  "disks_copied": str(len(copies)), "source_volumes_removed": str(removed)})
        return vm

    # -- after a crash -------------------------------------------------------------------------

    async def recover(self, record: OperationRecord) -> Any:
        """A cold migration the previous agent process left open. Nothing is copied again; what
        this host's libvirt shows, with the two marks the flow writes (the source volumes it
        copied, and that the destination defined the VM), decides:

        * still defined here, not yet defined there: it did not move. ABORTED; the destination
          is told (in the background) to drop what it received (its preparation lapses anyway).
        * defined there (the mark) and still here, shut off: the commit point had passed, so
          the move is completed: undefined here, claims released, copied volumes deleted.
        * gone from here: it moved (the source is undefined only after the destination
          defined it); copied volumes left behind are deleted, as the flow would have.
        """
        uuid, meta = record.target, record.metadata
        destination, name = meta.get("destination", "?"), meta.get("name", uuid)
        on_destination = meta.get("defined_on_destination") == "true"

        here, running = await self.hv.call(lambda conn: presence(conn, uuid), timeout=15)
        if here and not on_destination:
            asyncio.ensure_future(self._tell_abort(uuid, destination, record.id, "the source agent restarted"))
            return OperationError(CODES["ABORTED"], f"the agent stopped during the cold migration of {name!r} to "
                                                    f"{destination} before it was defined there; it is still defined here "
                                                    "(the destination was told to drop what it received; nothing was redone)")
        if here and running:
            return OperationError(CODES["FAILED_PRECONDITION"], f"the agent stopped after {name!r} was defined on "
                                                                f"{destination}; it is still defined here too, and runs here "
                                                                "now: delete one of the two")
        if here:
            try:
                await self._leave(uuid, await self.ops.inventory.spec(uuid))
            except Exception as exc:
                return OperationError(CODES["FAILED_PRECONDITION"], f"{name!r} was defined on {destination}, but "
                                                                    f"undefining it here failed ({exc}): delete it here")
        removed = 0
        if meta.get("keep_source_volumes") != "true":
            removed = await self._delete_leftovers(uuid, name, [v for v in meta.get("own_copies", "").split(",") if v])
        await self.ops.events.publish("vm.migrated", resource_kind="vm", resource_id=uuid, resource_name=name,
                                      message=f"{name} moved to {destination} (cold; completed after the agent restarted)",
                                      operation_id=record.id, attributes={"destination": destination, "cold": "true",
                                                                          "source_volumes_removed": str(removed)})
        return VmInfo(uuid, name, True, None, state=st.STOPPED, reason=f"moved to {destination}")

    async def _delete_leftovers(self, uuid: str, name: str, volumes: list[str]) -> int:
        """The copied source volumes still here (the agent died before deleting them)."""
        used = {u.volume for u in await self.ops.inventory.disk_users()}
        removed = 0
        for vol in volumes:
            if vol in used:
                continue
            try:
                await self.binder.volumes.delete_volume(vol, field="volume")
                removed += 1
            except NotFound:
                pass  # deleted before the agent stopped
            except Exception as exc:
                await self.ops.events.publish("vm.migration_cleanup_failed", severity="warning", resource_kind="vm",
                                              resource_id=uuid, resource_name=name,
                                              message=f"the source copy of {vol} was not removed: {exc}",
                                              attributes={"volume": vol})
        return removed

    async def _tell_abort(self, uuid: str, destination: str, migration_id: str, reason: str) -> None:
        try:
            await asyncio.shield(self.peer.abort_cold(destination, migration_id, reason))
        except Exception as exc:  # the destination aborts itself when its preparation expires
            log.warning("event=migration.abort_unreached vm=%s destination=%s error=%r", uuid, destination, str(exc))

    async def _copy(self, op: OperationContext, transfer: VolumeTransfer, spec: VmSpec, destination: str,
                    files: dict[int, str], idents: dict[int, FileIdentity], copies: list[int], bandwidth_mib_s: int) -> int:
        """Stream each volume to copy; returns the bytes sent. Progress: 5..95 % over the files'
        sizes (holes count as done when passed), bytes done/total on the operation."""
        total = sum(idents[i].size for i in copies) or 1
        done = 0
        sent_bytes = 0
        last = 0.0
        started = time.monotonic()
        rate = bandwidth_mib_s * (1 << 20)
        for n, i in enumerate(copies):
            src = files[i]
            flat = await transfer.flatten(src) if idents[i].has_backing else ""
            try:
                stream = transfer.send(flat or src)
                stage = f"copying disk {n + 1}/{len(copies)} ({spec.disks[i].target or i})"

                async def chunks() -> Any:
                    nonlocal last, sent_bytes
                    async for chunk in stream:
                        sent_bytes += len(chunk.data)
                        if rate:  # hold the average at the cap: wait until these bytes are "due"
                            ahead = started + sent_bytes / rate - time.monotonic()
                            if ahead > 0:
                                await asyncio.sleep(ahead)
                        now = time.monotonic()
                        if now - last >= PROGRESS_INTERVAL_S:
                            last = now
                            at = done + min(stream.sent, idents[i].size)
                            await op.progress(5 + int(90 * at / total), stage, bytes_done=at, bytes_total=total)
                        yield chunk

                await self.peer.push_volume(destination, op.id, i, stream.size, chunks())
            finally:
                if flat:
                    await transfer.remove(flat)
            done += idents[i].size
            await op.progress(5 + int(90 * done / total), f"copied disk {n + 1}/{len(copies)}", bytes_done=done, bytes_total=total)
        return sent_bytes

    async def _leave(self, uuid: str, spec: VmSpec) -> None:
        """The destination holds the persistent definition now: undefine here and free what
        this host held for the VM."""

        def undefine(conn: libvirt.virConnect) -> None:
            dom = conn.lookupByUUIDString(uuid)
            dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_NVRAM | libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
                              | libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA)

        await self.hv.call(undefine, timeout=30)
        self.ops.inventory.forget(uuid)
        self.run_dirs.remove(uuid)
        await self.binder.release_placement(uuid)
        await self.binder.release_lun_disks(spec, list(range(len(spec.disks))))

    async def _delete_copied(self, spec: VmSpec, copies: list[int]) -> int:
        """Delete the source volumes that were copied, unless another VM here still uses one.
        Never fails the move (the VM is on the destination): a failure is an event."""
        try:
            used = {u.volume for u in await self.ops.inventory.disk_users()}
        except Exception as exc:
            log.warning("event=migration.source_volumes_kept vm=%s error=%r", spec.uuid, str(exc))
            return 0
        removed = 0
        for i in copies:
            vol = spec.disks[i].volume
            if not deletable_after_move(spec, i) or vol in used:
                continue
            try:
                await self.binder.volumes.delete_volume(vol, field=f"spec.disks[{i}].volume")
                removed += 1
            except Exception as exc:
                await self.ops.events.publish("vm.migration_cleanup_failed", severity="warning", resource_kind="vm",
                                              resource_id=spec.uuid, resource_name=spec.name,
                                              message=f"the source copy of {vol} was not removed: {exc}",
                                              attributes={"volume": vol})
        return removed
