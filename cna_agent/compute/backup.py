"""Pull-mode backups of running VMs: checkpoints, and an NBD export per disk for the caller.

VDSM's and Proxmox's incremental backups, on libvirt 9.0's backup API: StartBackup calls
virDomainBackupBegin with a pull-mode ``<domainbackup>`` (QEMU serves each disk's point-in-time
view over NBD while the guest runs on; a scratch qcow2 per disk keeps the blocks the guest
overwrites meanwhile) and, in the same call, a ``<domaincheckpoint>`` at that very point (a
persistent dirty bitmap in each qcow2 disk, so the next backup can be incremental from it). An
incremental backup names an earlier checkpoint; its exports then carry the meta context
``qemu:dirty-bitmap:<name>`` marking what changed since. The caller reads the exports
(cna_agent/nbd_client.py; ``cna-ctl vm backup`` writes a qcow2 chain) and ends the job with
StopBackup, which always removes the scratch files and the socket, also when the job already
ended (the VM stopped, the agent restarted).

Where things are: the NBD socket beside the VM's side-channel monitor socket (a directory only
QEMU's user and root can enter; libvirt has QEMU listen on it; never TCP, so no TLS is needed),
the scratch files under ``<state_dir>/backup/<uuid>/`` (on disk, not the /run tmpfs: a busy
guest can overwrite a whole disk during a long backup).

Only qcow2 file disks take part (a raw image has nowhere to keep a bitmap): a request naming
another disk is refused, naming it.
"""

from __future__ import annotations

import calendar
import logging
import os
import re
import secrets
import shutil
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Sequence
from xml.etree import ElementTree as ET

import libvirt

from cna_agent.compute import state as st
from cna_agent.compute.render import qmp_socket_path
from cna_agent.compute.vmops import VmOps
from cna_agent.contracts import format_from_name
from cna_agent.errors import CODES, FailedPrecondition, InvalidArgument, NotFound
from cna_agent.operations import OperationContext, RecoveryHandler
from cna_agent.qemu_access import open_way
from cna_agent.state.journal import OperationError, OperationRecord

if TYPE_CHECKING:
    from cna_agent.compute.lifecycle import DomainRenderer

log = logging.getLogger(__name__)

CHECKPOINT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
TARGET_RE = re.compile(r"^(vd|sd|hd|xvd)[a-z]{1,3}$")
#: How long StopBackup waits for libvirt to end an aborted job.
STOP_WAIT_S = 30.0


@dataclass(frozen=True)
class BackupDisk:
    target: str
    export_name: str
    url: str
    dirty_bitmap: str
    size_bytes: int


@dataclass(frozen=True)
class BackupInfo:
    vm_uuid: str
    checkpoint: str
    incremental_from: str
    socket: str
    disks: tuple[BackupDisk, ...]
    start_time: float


@dataclass(frozen=True)
class CheckpointInfo:
    name: str
    parent: str
    creation_time: float
    disks: tuple[str, ...] = field(default_factory=tuple)


def new_checkpoint_name(now: float | None = None) -> str:
    return time.strftime("cna-%Y%m%dT%H%M%S", time.gmtime(now or time.time())) + f"-{secrets.token_hex(2)}"


def checkpoint_time(name: str) -> float:
    """When a checkpoint was made: from its name when the agent named it, else now."""
    try:
        return calendar.timegm(time.strptime(name[4:19], "%Y%m%dT%H%M%S")) if name.startswith("cna-") else time.time()
    except ValueError:
        return time.time()


def backup_xml(socket_path: str, disks: Sequence[str], others: Sequence[str], scratch_dir: str, incremental_from: str) -> str:
    root = ET.Element("domainbackup", mode="pull")
    if incremental_from:
        ET.SubElement(root, "incremental").text = incremental_from
    ET.SubElement(root, "server", transport="unix", socket=socket_path)
    els = ET.SubElement(root, "disks")
    for target in disks:
        d = ET.SubElement(els, "disk", name=target, backup="yes", type="file", exportname=target)
        ET.SubElement(d, "scratch", file=os.path.join(scratch_dir, f"scratch-{target}.qcow2"))
    for target in others:
        ET.SubElement(els, "disk", name=target, backup="no")
    return ET.tostring(root, encoding="unicode")


def checkpoint_xml(name: str, disks: Sequence[str], others: Sequence[str]) -> str:
    root = ET.Element("domaincheckpoint")
    ET.SubElement(root, "name").text = name
    els = ET.SubElement(root, "disks")
    for target in disks:
        ET.SubElement(els, "disk", name=target, checkpoint="bitmap")
    for target in others:
        ET.SubElement(els, "disk", name=target, checkpoint="no")
    return ET.tostring(root, encoding="unicode")


def parse_backup(uuid: str, xml: str, sizes: dict[str, int], checkpoint: str, started: float) -> BackupInfo:
    """BackupInfo from libvirt's backupGetXMLDesc (export names and bitmaps as QEMU serves them)."""
    root = ET.fromstring(xml)
    server = root.find("server")
    sock = server.get("socket", "") if server is not None else ""
    inc = (root.findtext("incremental") or "").strip()
    disks = []
    for d in root.findall("disks/disk"):
        if d.get("backup") != "yes":
            continue
        target = d.get("name", "")
        export = d.get("exportname") or target
        disks.append(BackupDisk(target, export, f"nbd+unix:///{export}?socket={sock}", d.get("exportbitmap", "") if inc else "",
                                sizes.get(target, 0)))
    return BackupInfo(uuid, checkpoint, inc, sock, tuple(disks), started)


def _checkpoints(dom: libvirt.virDomain) -> list[CheckpointInfo]:
    out = []
    for cp in dom.listAllCheckpoints(0):
        root = ET.fromstring(cp.getXMLDesc(libvirt.VIR_DOMAIN_CHECKPOINT_XML_NO_DOMAIN))
        out.append(CheckpointInfo(cp.getName(), (root.findtext("parent/name") or "").strip(),
                                  float(root.findtext("creationTime") or 0),
                                  tuple(d.get("name", "") for d in root.findall("disks/disk") if d.get("checkpoint") == "bitmap")))
    return sorted(out, key=lambda c: (c.creation_time, c.name))


def _thaw(dom: libvirt.virDomain, uuid: str) -> None:
    """Thaw right after the point is taken; retried, since a guest left frozen hangs its writers."""
    for attempt in range(3):
        try:
            dom.fsThaw(None, 0)
            return
        except libvirt.libvirtError as exc:
            log.warning("event=vm.backup_thaw_failed vm=%s attempt=%d error=%r", uuid, attempt + 1, exc.get_error_message())
            time.sleep(1.0)


def _job_active(dom: libvirt.virDomain) -> bool:
    try:
        dom.backupGetXMLDesc(0)
        return True
    except libvirt.libvirtError:
        return False


class VmBackups:
    """StartBackup / StopBackup / GetBackup / ListCheckpoints for this host's VMs."""

    def __init__(self, ops: VmOps, renderer: "DomainRenderer",
                 bitmaps: Callable[[str], Awaitable[dict[str, set[str]]]] | None = None) -> None:
        self.ops = ops
        #: Image file -> the persistent bitmaps QEMU holds on it (the side channel's query):
        #: what a checkpoint whose libvirt metadata was lost is redefined from.
        self.bitmaps = bitmaps
        self.hv = ops.hv
        self.inventory = ops.inventory
        self.renderer = renderer
        #: uuid -> (checkpoint created, when started) of the backups this agent started.
        self._started: dict[str, tuple[str, float]] = {}

    def socket_path(self, uuid: str) -> str:
        return os.path.join(os.path.dirname(qmp_socket_path(self.renderer.ctx, uuid)), f"{uuid}.nbd")

    def scratch_dir(self, uuid: str) -> str:
        return os.path.join(self.renderer.ctx.state_dir, "backup", uuid)

    async def start(self, ref: str, *, incremental_from: str = "", disks: Sequence[str] = (), quiesce: bool = False,
                    request_id: str = "", fingerprint: str = "", lock_timeout: float = 0.0) -> OperationRecord:
        if incremental_from and not CHECKPOINT_RE.match(incremental_from):
            raise InvalidArgument("incremental_from", f"{incremental_from!r} is not a checkpoint name")
        for i, t in enumerate(disks):
            if not TARGET_RE.match(t):
                raise InvalidArgument(f"disks[{i}]", f"{t!r} is not a disk target like 'vda'")
        uuid, name = await self.inventory.lookup_uuid(ref)
        spec = await self.inventory.spec(uuid)
        targets = {d.target: (i, d) for i, d in enumerate(spec.disks) if d.target}
        for i, t in enumerate(disks):
            if t not in targets:
                raise InvalidArgument(f"disks[{i}]", f"vm {name!r} has no disk {t!r} (it has {', '.join(sorted(targets))})")
        chosen: list[str] = []
        for t, (i, d) in targets.items():
            if disks and t not in disks:
                continue
            usable = d.volume and d.device != "cdrom" and not d.shareable and (d.format or format_from_name(d.volume)) == "qcow2"
            if usable:
                chosen.append(t)
            elif disks:
                raise FailedPrecondition(f"disks: {t} (spec.disks[{i}]) is not a writable qcow2 file disk; only those keep "
                                         "the dirty bitmaps a backup needs", field="disks")
        if not chosen:
            raise FailedPrecondition(f"vm {name!r} has no writable qcow2 disk to back up", field="vm")
        if quiesce and not spec.guest_agent:
            raise FailedPrecondition(f"quiesce: vm {name!r} has no guest agent channel (spec.guest_agent), so its file "
                                     "systems cannot be frozen", field="quiesce")
        others = [t for t in targets if t not in chosen]

        async def work(op: OperationContext) -> Any:
            if await self.inventory.state(uuid) not in (st.RUNNING, st.PAUSED):
                raise FailedPrecondition(f"vm {name!r} is not running; a pull backup reads a running VM's disks "
                                         "(a stopped VM's volumes can be copied as they are)", field="vm")
            sock, scratch = self.socket_path(uuid), self.scratch_dir(uuid)
            checkpoint = new_checkpoint_name()
            qemu, state_root = self.hv.qemu_user(), os.path.dirname(os.path.normpath(self.renderer.ctx.state_dir))

            if incremental_from:
                await self._ensure_checkpoint(uuid, name, incremental_from, chosen)

            def begin(conn: libvirt.virConnect) -> str:
                dom = conn.lookupByUUIDString(uuid)
                if _job_active(dom):
                    raise FailedPrecondition(f"a backup of vm {name!r} is already running; StopBackup ends it", field="vm")
                shutil.rmtree(scratch, ignore_errors=True)  # a job that ended without StopBackup
                os.makedirs(scratch, mode=0o700, exist_ok=True)
                for target in chosen:  # libvirt makes the scratch files; QEMU's user must reach them
                    open_way(os.path.join(scratch, f"scratch-{target}.qcow2"), owned_below=state_root, user=qemu,
                             what="the backup's scratch files", field="vm")
                if os.path.lexists(sock):
                    os.unlink(sock)
                if quiesce:
                    try:
                        dom.fsFreeze(None, 0)
                    except libvirt.libvirtError as exc:
                        raise FailedPrecondition(f"quiesce: the guest agent of vm {name!r} did not freeze its file systems "
                                                 f"({exc.get_error_message()})", field="quiesce") from None
                try:
                    dom.backupBegin(backup_xml(sock, chosen, others, scratch, incremental_from),
                                    checkpoint_xml(checkpoint, chosen, others), 0)
                except libvirt.libvirtError as exc:
                    shutil.rmtree(scratch, ignore_errors=True)
                    raise FailedPrecondition(f"libvirt did not start the backup of vm {name!r}: {exc.get_error_message()}",
                                             field="vm") from None
                finally:
                    if quiesce:
                        _thaw(dom, uuid)
                return dom.backupGetXMLDesc(0)

            await op.note(checkpoint=checkpoint)
            xml = await self.hv.call(begin, timeout=120)
            started = time.time()
            self._started[uuid] = (checkpoint, started)
            info = await self._info(uuid, xml)
            log.info("event=vm.backup_started vm=%s checkpoint=%s incremental_from=%s disks=%s", uuid, checkpoint,
                     incremental_from or "-", ",".join(chosen))
            await self.ops.events.publish("vm.backup_started", resource_kind="vm", resource_id=uuid, resource_name=name,
                                          message=f"{'incremental' if incremental_from else 'full'} backup of {name} started "
                                                  f"({', '.join(chosen)})",
                                          attributes={"checkpoint": checkpoint, "incremental_from": incremental_from},
                                          operation_id=op.id)
            return info

        return await self.ops.submit("vm.backup.start", uuid, work, request_id=request_id, fingerprint=fingerprint,
                                     lock_timeout=lock_timeout, wait=30.0)

    async def _ensure_checkpoint(self, uuid: str, name: str, checkpoint: str, disks: Sequence[str]) -> None:
        """The checkpoint an incremental backup starts from, redefined in libvirt when its
        metadata is gone (libvirt does not carry checkpoints along a migration, and a lost
        libvirt state directory loses them) while QEMU still holds its bitmap on every disk."""

        def look(conn: libvirt.virConnect) -> dict[str, str] | None:
            dom = conn.lookupByUUIDString(uuid)
            try:
                dom.checkpointLookupByName(checkpoint)
                return None
            except libvirt.libvirtError:
                pass
            sources = {}
            for d in ET.fromstring(dom.XMLDesc(0)).findall("devices/disk"):
                target, source = d.find("target"), d.find("source")
                if target is not None and source is not None and target.get("dev") in disks:
                    sources[target.get("dev", "")] = source.get("file", "")
            return sources

        sources = await self.hv.call(look, timeout=30)
        if sources is None:
            return
        missing = FailedPrecondition(f"incremental_from: vm {name!r} has no checkpoint {checkpoint!r} (ListCheckpoints; a "
                                     "full backup makes one)", field="incremental_from")
        if self.bitmaps is None:
            raise missing
        try:
            held = await self.bitmaps(uuid)
        except Exception as exc:  # no side channel: the checkpoint cannot be vouched for
            log.warning("event=vm.checkpoint_probe_failed vm=%s error=%r", uuid, getattr(exc, "message", None) or str(exc))
            raise missing from None
        if not sources or any(checkpoint not in held.get(path, set()) for path in sources.values()):
            raise missing
        root = ET.Element("domaincheckpoint")
        ET.SubElement(root, "name").text = checkpoint
        ET.SubElement(root, "creationTime").text = str(int(checkpoint_time(checkpoint)))
        els = ET.SubElement(root, "disks")
        for target in disks:
            ET.SubElement(els, "disk", name=target, checkpoint="bitmap", bitmap=checkpoint)
        xml = ET.tostring(root, encoding="unicode")

        def redefine(conn: libvirt.virConnect) -> None:
            try:
                conn.lookupByUUIDString(uuid).checkpointCreateXML(xml, libvirt.VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE)
            except libvirt.libvirtError as exc:
                raise FailedPrecondition(f"incremental_from: checkpoint {checkpoint!r} of vm {name!r} is gone from libvirt "
                                         f"and could not be redefined ({exc.get_error_message()}); a full backup starts a "
                                         "new chain", field="incremental_from") from None

        await self.hv.call(redefine, timeout=30)
        log.warning("event=vm.checkpoint_redefined vm=%s checkpoint=%s disks=%s", uuid, checkpoint, ",".join(disks))

    async def _info(self, uuid: str, xml: str) -> BackupInfo:
        def sizes(conn: libvirt.virConnect) -> dict[str, int]:
            dom = conn.lookupByUUIDString(uuid)
            root = ET.fromstring(dom.XMLDesc(0))
            out = {}
            for d in root.findall("devices/disk"):
                target = d.find("target")
                if target is not None:
                    try:
                        out[target.get("dev", "")] = int(dom.blockInfo(target.get("dev", ""))[0])
                    except libvirt.libvirtError:
                        continue
            return out

        checkpoint, started = self._started.get(uuid, ("", 0.0))
        return parse_backup(uuid, xml, await self.hv.call(sizes, timeout=30), checkpoint, started)

    async def get(self, ref: str) -> BackupInfo:
        uuid, name = await self.inventory.lookup_uuid(ref)

        def read(conn: libvirt.virConnect) -> str | None:
            try:
                return conn.lookupByUUIDString(uuid).backupGetXMLDesc(0)
            except libvirt.libvirtError:
                return None

        xml = await self.hv.call(read, timeout=30)
        if xml is None:
            raise NotFound(f"no backup of vm {name!r} is running", field="vm")
        return await self._info(uuid, xml)

    async def stop(self, ref: str, *, request_id: str = "", fingerprint: str = "") -> OperationRecord:
        uuid, name = await self.inventory.lookup_uuid(ref)

        async def work(op: OperationContext) -> Any:
            ended = await self.end(uuid)
            await self.ops.events.publish("vm.backup_stopped", resource_kind="vm", resource_id=uuid, resource_name=name,
                                          message=f"backup of {name} ended" + ("" if ended else " (no job was running)"),
                                          operation_id=op.id)
            return None

        return await self.ops.submit("vm.backup.stop", uuid, work, request_id=request_id, fingerprint=fingerprint,
                                     lock_timeout=30.0, wait=30.0)

    async def end(self, uuid: str) -> bool:
        """Abort the VM's backup job (if one runs) and wait for it; remove its socket and
        scratch files whatever happened. Whether a job was running."""

        def abort(conn: libvirt.virConnect) -> bool:
            try:
                dom = conn.lookupByUUIDString(uuid)
            except libvirt.libvirtError:
                return False
            if not _job_active(dom):
                return False
            try:
                dom.abortJob()
            except libvirt.libvirtError:
                if _job_active(dom):
                    raise
            deadline = time.monotonic() + STOP_WAIT_S
            while _job_active(dom) and time.monotonic() < deadline:
                time.sleep(0.1)
            return True

        running = await self.hv.call(abort, timeout=STOP_WAIT_S + 15)
        sock, scratch = self.socket_path(uuid), self.scratch_dir(uuid)
        shutil.rmtree(scratch, ignore_errors=True)
        if os.path.lexists(sock):
            os.unlink(sock)
        self._started.pop(uuid, None)
        log.info("event=vm.backup_stopped vm=%s was_running=%s", uuid, running)
        return running

    async def checkpoints(self, ref: str) -> list[CheckpointInfo]:
        uuid, _ = await self.inventory.lookup_uuid(ref)
        return await self.hv.call(lambda c: _checkpoints(c.lookupByUUIDString(uuid)), timeout=30)

    # -- recovery ----------------------------------------------------------------------------------

    def handlers(self) -> dict[str, RecoveryHandler]:
        return {"vm.backup.start": self.recover_start, "vm.backup.stop": self.recover_stop}

    async def recover_start(self, record: OperationRecord) -> Any:
        """The caller never got the exports: a job it cannot know of is ended, not left running."""
        await self.end(record.target)
        return OperationError(CODES["ABORTED"], "the agent stopped while starting the backup; the job (if any) was ended "
                                                "and its scratch files removed: start it again")

    async def recover_stop(self, record: OperationRecord) -> Any:
        await self.end(record.target)
        return None
