"""OVF/OVA import and export: a package becomes a defined VM with its disks converted onto a
datastore, and a stopped VM becomes a package another host (or VMware, VirtualBox, oVirt)
reads back.

Decisions, and why:

* **Everything that can be refused is refused before anything is made**: the package is
  opened and its descriptor read, the VM spec planned (appliance_spec.py), the spec validated
  as CreateVm would, every NIC's port group resolved, the VM name and every target volume
  checked free, and the datastore's room checked against the disks' sizes. The operation then
  checks the manifest digests and each disk image (qemu-img info and check, through storage)
  before the first conversion.
* **Disks are converted straight out of the package** (contracts.ImageSource: an OVA member is
  a byte range of the .ova), one after the other, progress weighted by size; a failure or a
  cancel removes the volumes made so far, so a failed import leaves nothing.
* **The VM is defined by CreateVm's own operation** (lifecycle.create), awaited here: the same
  validation, placement and events as any VM, and the create shows in the operation history.
* **An export is staged** in a hidden directory beside the destination (a TEMP_MARK name,
  swept at start-up like any partial volume) and appears whole at the end: a directory by
  rename(2), an .ova by link(2). The VM is locked for the export's length (it must stay
  stopped: a running guest's disks change under the copy).
* The notes of appliance_spec.py travel with the result and into the ``vm.imported`` event,
  so what was changed or dropped is on record.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any, Callable

from cna_agent import cancel as cancelling
from cna_agent.blocking import BlockingPool
from cna_agent.compute import state as st
from cna_agent.compute.appliance_spec import (DiskPlan, ExportedDisk, ImportPlan, Note, disk_href, envelope_of,
                                              export_notes, export_refusal, plan_import)
from cna_agent.compute.inventory import VmInfo
from cna_agent.compute.lifecycle import VmLifecycle
from cna_agent.compute.spec_validation import validate
from cna_agent.compute.vmops import VmOps
from cna_agent.contracts import ImageSource, ImageStore
from cna_agent.errors import CODES, AgentError, AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, \
    ResourceExhausted, error_for
from cna_agent.failpoints import crash_point
from cna_agent.ovf import descriptor, package, writer
from cna_agent.ovf.descriptor import DescriptorError
from cna_agent.operations import OperationContext, RecoveryHandler
from cna_agent.state.journal import OperationError, OperationRecord

log = logging.getLogger(__name__)

MAX_NETWORK_MAP = 64
#: Room kept free beyond the converted disks (qcow2 metadata, the file system's own).
ROOM_MARGIN = 64 << 20


@dataclass(frozen=True)
class ApplianceImport:
    vm: VmInfo
    notes: tuple[Note, ...]
    #: Files the package's manifest vouched for (0: the package has no manifest).
    manifest_files: int = 0


@dataclass(frozen=True)
class ApplianceExport:
    files: tuple[str, ...]
    bytes: int
    notes: tuple[Note, ...] = ()


@dataclass(frozen=True)
class Inspection:
    plan: ImportPlan
    networks: tuple[str, ...]
    package_kind: str
    manifest: bool
    disk_bytes: tuple[int, ...] = field(default_factory=tuple)


def _descriptor_error(exc: DescriptorError) -> InvalidArgument:
    return InvalidArgument("source", str(exc))


class VmAppliances:
    def __init__(self, ops: VmOps, lifecycle: VmLifecycle, images: ImageStore | None, files: BlockingPool) -> None:
        self.ops = ops
        self.lifecycle = lifecycle
        self.inventory = ops.inventory
        self.images = images
        self.files = files

    def _store(self) -> ImageStore:
        if self.images is None:
            raise FailedPrecondition("OVF import and export need the storage subsystem, which is not running on this "
                                     "agent", field="source")
        return self.images

    # -- reading a package ---------------------------------------------------------------------------

    async def _open(self, source: str) -> tuple[package.Package, descriptor.Envelope]:
        path = self._store().existing_file(source, field="source")

        def read() -> tuple[package.Package, descriptor.Envelope]:
            pkg = package.open_package(path)
            return pkg, descriptor.parse(pkg.read(pkg.descriptor, descriptor.MAX_BYTES))

        try:
            return await self.files.run(read, timeout=60, what=f"reading {source}")
        except DescriptorError as exc:
            raise _descriptor_error(exc) from None

    def _plan(self, env: descriptor.Envelope, *, name: str, datastore: str, folder: str, network_map: dict[str, str],
              fmt: str, keep_macs: bool) -> ImportPlan:
        if len(network_map) > MAX_NETWORK_MAP:
            raise InvalidArgument("network_map", f"{len(network_map)} entries; at most {MAX_NETWORK_MAP}")
        if fmt not in ("qcow2", "raw"):
            raise InvalidArgument("format", f"{fmt!r}: imported disks are qcow2 or raw volumes")
        plan = plan_import(env, name=name, datastore=datastore, folder=folder or name or env.system.name,
                           network_map=network_map, fmt=fmt, keep_macs=keep_macs)
        for d in plan.disks:
            if d.href:
                try:
                    package.check_href(d.href, "file reference")
                except DescriptorError as exc:
                    raise _descriptor_error(exc) from None
        return plan

    async def inspect(self, source: str, *, network_map: dict[str, str] | None = None) -> Inspection:
        """What ImportAppliance would make of the package, changing nothing. Networks left out
        of ``network_map`` are shown unmapped (an empty port group) rather than refused."""
        pkg, env = await self._open(source)
        used = {n.network for n in env.system.nics if n.network}
        networks = sorted(used | set(env.networks))
        given = dict(network_map or {})
        stray = sorted(set(given) - used)
        if stray:
            raise InvalidArgument("network_map", f"{', '.join(map(repr, stray[:5]))}: no NIC of the package is on it (its "
                                                 f"NICs are on: {', '.join(sorted(used)) or 'none'})")
        for net, pg in given.items():
            await self.lifecycle.binder.ports.resolve_port_group(pg, field=f"network_map[{net!r}]")
        mapping = {n: given.get(n, "-") for n in used}
        plan = self._plan(env, name="", datastore="datastore", folder="", network_map=mapping, fmt="qcow2", keep_macs=True)
        for nic in plan.spec.nics:
            if nic.port_group == "-":
                nic.port_group = ""
        sizes = tuple(pkg.member(d.href).size if d.href and pkg.find(d.href) else 0 for d in plan.disks)
        return Inspection(plan=plan, networks=tuple(networks), package_kind=pkg.kind,
                          manifest=pkg.find(pkg.manifest_name) is not None, disk_bytes=sizes)

    # -- import ----------------------------------------------------------------------------------------

    async def import_(self, source: str, *, datastore: str, folder: str = "", name: str = "",
                      network_map: dict[str, str] | None = None, fmt: str = "qcow2", keep_macs: bool = False,
                      start: bool = False, strict: bool = False, request_id: str = "",
                      fingerprint: str = "") -> OperationRecord:
        store = self._store()
        if not datastore:
            raise InvalidArgument("datastore", "the datastore the disks go to is required")
        if folder:
            for part in folder.split("/"):
                if not part or part in (".", ".."):
                    raise InvalidArgument("folder", f"{folder!r} is not a relative directory")
        pkg, env = await self._open(source)
        plan = self._plan(env, name=name, datastore=datastore, folder=folder, network_map=dict(network_map or {}),
                          fmt=fmt or "qcow2", keep_macs=keep_macs)
        spec = plan.spec
        if strict and any(n.action == "dropped" for n in plan.notes):
            dropped = "; ".join(f"{n.item}: {n.detail}" for n in plan.notes if n.action == "dropped")
            raise FailedPrecondition(f"strict import: the package asks for what this host does not give ({dropped})",
                                     field="source")
        free = await store.free_bytes(datastore, field="datastore")  # a dir datastore of this host, first
        try:
            await self.inventory.lookup_uuid(spec.name, require_managed=False)
        except NotFound:
            pass
        else:
            raise AlreadyExists(f"name: a VM named {spec.name!r} already exists on this host", field="name")
        try:
            folder_path = store.new_path(plan.disks[0].volume_id.rsplit("/", 1)[0], field="folder") if plan.disks else ""
        except AlreadyExists:
            folder_path = ""  # an existing directory: kept whatever happens
        for d in plan.disks:
            store.new_path(d.volume_id, field="name")
        validate(spec.copy(), self.lifecycle.validation_context())
        for i, nic in enumerate(spec.nics):
            await self.lifecycle.binder.nic(nic, field=f"network_map[{env.system.nics[i].network!r}]")
        sources: list[ImageSource | None] = []
        need = ROOM_MARGIN
        for d in plan.disks:
            if d.href:
                try:
                    m = pkg.member(d.href)
                except DescriptorError as exc:
                    raise _descriptor_error(exc) from None
                sources.append(ImageSource(m.path, m.offset, m.size) if pkg.kind == "ova" else ImageSource(m.path))
                need += m.size if fmt == "qcow2" else max(m.size, d.capacity)
            else:
                sources.append(None)
                need += 0 if fmt == "qcow2" else d.capacity
        if free < need:
            raise ResourceExhausted(f"datastore: {datastore!r} has {free >> 20} MiB free; the package's disks need about "
                                    f"{need >> 20} MiB", field="datastore")

        async def work(op: OperationContext) -> Any:
            made: list[str] = []
            try:
                await op.progress(1, "checking the manifest")
                try:
                    vouched = await self.files.run(lambda: package.verify_manifest(pkg), timeout=6 * 3600.0,
                                                   what=f"checking {source}'s manifest")
                except DescriptorError as exc:
                    raise _descriptor_error(exc) from None
                notes = list(plan.notes)
                if vouched is None:
                    notes.append(Note("manifest", "ignored", "the package has no manifest (.mf); its files were not "
                                                             "checked against digests"))
                await op.progress(5, "checking the disk images")
                for d, src in zip(plan.disks, sources):
                    if src is not None:
                        await store.probe(src, field="source")
                await self._convert(op, plan.disks, sources, made)
                vm = await self._define(op, spec, start)
            except BaseException:
                await cancelling.detached(self._remove_volumes(made, folder_path))
                raise
            await self.ops.events.publish(
                "vm.imported", resource_kind="vm", resource_id=vm.uuid, resource_name=vm.spec.name, operation_id=op.id,
                severity="warning" if any(n.action == "dropped" for n in notes) else "info",
                message=f"{vm.spec.name} imported from {source}: {len(plan.disks)} disk(s), {len(spec.nics)} NIC(s); "
                        + ("; ".join(f"{n.item} {n.action}" for n in notes) or "nothing changed"),
                attributes={"source": source, "notes": str(len(notes))})
            return ApplianceImport(vm=vm, notes=tuple(notes), manifest_files=vouched or 0)

        return await self.ops.runner.submit("appliance.import", f"{datastore}/{spec.name}", work, request_id=request_id,
                                            fingerprint=fingerprint, lock_key=f"appliance/{spec.name}", wait=5.0,
                                            cancellable=True, metadata={"source": source, "vm_name": spec.name,
                                                                        "folder_path": folder_path})

    async def _convert(self, op: OperationContext, disks: list[DiskPlan], sources: list[ImageSource | None],
                       made: list[str]) -> None:
        store = self._store()
        weights = [max(s.length or os.path.getsize(s.path), 1) if s else 1 for s in sources]
        total, done = sum(weights), 0
        for d, src, w in zip(disks, sources, weights):
            base, span = 10 + 80 * done // total, 80 * w / total
            stage = f"converting {os.path.basename(d.volume_id)}"
            await op.progress(base, stage)
            if src is None:
                await store.blank_volume(d.volume_id, d.capacity, field="source")
            else:
                report = _progress_to(op, base, span, stage)
                await store.import_image(src, d.volume_id, field="source", on_progress=report)
            made.append(d.volume_id)
            await op.note(volumes=",".join(made))  # what recovery removes when the agent stops before the define
            crash_point("appliance.import.converted")
            scope = cancelling.current()
            if scope is not None:
                scope.reopen()  # storage closed it while the volume was put in place; the next disk may be cancelled
            done += w

    async def _define(self, op: OperationContext, spec: Any, start: bool) -> VmInfo:
        await op.progress(92, "defining the VM")
        cancelling.commit(f"vm {spec.name!r} is being defined from the package")
        record = await self.lifecycle.create(spec, start=start, request_id=f"{op.id}/create")
        record = await self.ops.runner.finished(record.id, record)
        if record.error is not None:
            raise error_for(record.error.code, f"the VM was not defined: {record.error.message}")
        uuid = record.target
        return await self.ops.result(uuid, op)

    async def _remove_volumes(self, volumes: list[str], folder_path: str) -> None:
        """A failed import's volumes, and its folder when the import made it (and it is empty)."""
        for vid in volumes:
            try:
                await self.lifecycle.binder.volumes.delete_volume(vid, field="datastore")
            except Exception as exc:  # the import's own error is what the caller gets
                log.warning("event=appliance.cleanup_failed volume=%s error=%r", vid, getattr(exc, "message", str(exc)))
        if folder_path:
            try:
                await self.files.run(lambda: os.rmdir(folder_path) if os.path.isdir(folder_path) else None, timeout=30,
                                     what=f"removing {folder_path}")
            except OSError:
                pass  # not empty (something else was put there meanwhile): kept

    # -- export ----------------------------------------------------------------------------------------

    async def export(self, ref: str, destination: str, *, request_id: str = "", fingerprint: str = "",
                     lock_timeout: float = 0.0) -> OperationRecord:
        store = self._store()
        uuid, name = await self.inventory.lookup_uuid(ref)
        spec = await self.inventory.spec(uuid)
        export_refusal(spec)
        dest = store.new_path(destination, field="destination")
        ova = destination.lower().endswith(".ova")
        staging = store.staging_path(dest)
        notes = export_notes(spec)
        for d in spec.disks:
            if d.volume.startswith("/"):
                raise FailedPrecondition(f"disk {d.target}: {d.volume} is a local image outside the datastores; import it "
                                         "as a volume first", field="vm")

        async def work(op: OperationContext) -> Any:
            if await self.inventory.state(uuid) != st.STOPPED:
                raise FailedPrecondition(f"vm {name!r} is not stopped; shut it down first (a running guest's disks "
                                         "change under the copy)", field="vm")
            await self.files.run(lambda: os.makedirs(staging, mode=0o750), timeout=30, what=f"making {staging}")
            try:
                files = await self._write_package(op, spec, staging)
                await op.progress(95, "putting the package in place")
                cancelling.commit(f"the package {destination} is being put in place")
                names = await self.files.run(lambda: _place(staging, dest, ova, spec.name, files), timeout=6 * 3600.0,
                                             what=f"placing {destination}")
            except BaseException:
                await cancelling.detached(store.remove(staging))
                raise
            if ova:
                await store.remove(staging)
            size = await self.files.run(lambda: _size(dest), timeout=60, what=f"size of {destination}")
            await self.ops.events.publish("vm.exported", resource_kind="vm", resource_id=uuid, resource_name=name,
                                          operation_id=op.id, message=f"{name} exported to {destination} ({size >> 20} MiB)",
                                          attributes={"destination": destination})
            ids = [destination] if ova else [f"{destination}/{n}" for n in names]
            return ApplianceExport(files=tuple(ids), bytes=size, notes=tuple(notes))

        return await self.ops.submit("appliance.export", uuid, work, request_id=request_id, fingerprint=fingerprint,
                                     lock_timeout=lock_timeout, wait=5.0, cancellable=True,
                                     metadata={"destination": destination})

    async def _write_package(self, op: OperationContext, spec: Any, staging: str) -> list[str]:
        """The disks as streamOptimized vmdks (CD-ROM images as they are), then the descriptor and
        the manifest; the file names in package order (descriptor first)."""
        store = self._store()
        volumes = [(i, d) for i, d in enumerate(spec.disks) if d.volume]
        exported: list[ExportedDisk] = []
        for n, (i, d) in enumerate(volumes):
            href = disk_href(spec, i)
            stage = f"writing {href}"
            base, span = 5 + 80 * n // max(len(volumes), 1), 80 / max(len(volumes), 1)
            await op.progress(base, stage)
            target = os.path.join(staging, href)
            fmt, sub = ("raw", "") if d.device == "cdrom" else ("vmdk", "streamOptimized")
            facts = await store.write_image(d.volume, target, fmt=fmt, subformat=sub,
                                            on_progress=_progress_to(op, base, span, stage))
            exported.append(ExportedDisk(index=i, href=href, size=facts.file_size, capacity=facts.virtual_size))
        env = envelope_of(spec, exported)
        ovf_name = f"{spec.name}.ovf"
        mf_name = f"{spec.name}.mf"

        def finish() -> list[str]:
            data = writer.write(env)
            with open(os.path.join(staging, ovf_name), "wb") as f:
                f.write(data)
                os.fsync(f.fileno())
            entries = [(ovf_name, os.path.join(staging, ovf_name))] + \
                [(e.href, os.path.join(staging, e.href)) for e in exported]
            with open(os.path.join(staging, mf_name), "wb") as f:
                f.write(package.manifest_text(entries))
                os.fsync(f.fileno())
            return [ovf_name, mf_name] + [e.href for e in exported]

        await op.progress(88, "writing the descriptor and manifest")
        return await self.files.run(finish, timeout=6 * 3600.0, what="writing the descriptor")

    # -- recovery ------------------------------------------------------------------------------------------

    def handlers(self) -> dict[str, RecoveryHandler]:
        return {"appliance.import": self.recover_import, "appliance.export": self.recover_export}

    async def recover_import(self, record: OperationRecord) -> Any:
        """An import the agent stopped in: done if its VM was defined (CreateVm's own operation
        and its recovery decide that), else the volumes it noted (and its folder) are removed."""
        name = record.metadata.get("vm_name", "")
        try:
            uuid, _ = await self.inventory.lookup_uuid(name)
        except (NotFound, FailedPrecondition, InvalidArgument):
            uuid = ""
        if uuid:
            log.info("event=appliance.import_recovered vm=%s outcome=defined", name)
            return ApplianceImport(vm=await self.inventory.get(uuid), notes=(), manifest_files=0)
        volumes = [v for v in record.metadata.get("volumes", "").split(",") if v]
        await self._remove_volumes(volumes, record.metadata.get("folder_path", ""))
        log.warning("event=appliance.import_recovered vm=%s outcome=removed volumes=%d", name, len(volumes))
        return OperationError(CODES["ABORTED"], f"the agent stopped before {name!r} was defined; the {len(volumes)} "
                                                "volume(s) converted so far were removed; import the package again")

    async def recover_export(self, record: OperationRecord) -> Any:
        """An export the agent stopped in: the package is there whole (it appears by one rename or
        link) or not at all (storage's start-up sweep removed the staging directory)."""
        destination = record.metadata.get("destination", "")
        try:
            self._store().new_path(destination, field="destination")
        except AlreadyExists:
            path = self._store().existing_file(destination, field="destination") if destination.lower().endswith(".ova") \
                else ""
            size = await self.files.run(lambda: _size(path), timeout=60, what="size") if path else 0
            return ApplianceExport(files=(destination,), bytes=size)
        except AgentError:
            pass
        return OperationError(CODES["ABORTED"], f"the agent stopped before {destination} was complete; nothing of it was "
                                                "left (the staging directory is removed at start-up); export again")


def _progress_to(op: OperationContext, base: float, span: float, stage: str) -> Callable[[float], None]:
    """A worker thread's percent of one step, as the operation's overall percent."""
    import asyncio

    loop = asyncio.get_running_loop()
    last = [-1]

    def report(pct: float) -> None:
        p = int(base + span * pct / 100)
        if p == last[0]:
            return
        last[0] = p
        loop.call_soon_threadsafe(lambda: loop.create_task(op.progress(p, stage)))

    return report


def _place(staging: str, dest: str, ova: bool, name: str, files: list[str]) -> list[str]:
    if not ova:
        if os.path.lexists(dest):
            raise AlreadyExists(f"{dest} appeared during the export", field="destination")
        os.rename(staging, dest)
        return files
    tmp = os.path.join(staging, f"{name}.ova")
    with open(tmp, "wb") as out:
        package.write_ova(out, [(n, os.path.join(staging, n)) for n in files])
        out.flush()
        os.fsync(out.fileno())
    try:
        os.link(tmp, dest)
    except FileExistsError:
        raise AlreadyExists(f"{dest} appeared during the export", field="destination") from None
    return [os.path.basename(dest)]


def _size(path: str) -> int:
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))

