"""VM templates: ConvertVmToTemplate and DeployVm.

Why a template is a VM and not only a volume: what a deploy copies is the whole machine (CPU,
memory, firmware, NICs' port groups, disks), so the template keeps its spec in its definition and
only gains a mark (template_mark.py) that refuses starts and changes. Its volumes become
read-only bases (the mode linked clones already leave their base in), so no VM, deploy or admin
writes them by mistake, and linked clones of them are safe.

Why DeployVm runs one CreateVm per VM: each new VM is an ordinary create (its own operation,
journal entry, recovery, first-boot customization and events), made after its volumes were cloned
inside the deploy's operation. A VM that cannot be made (its name taken meanwhile, a full
datastore) is reported with its cloned volumes removed, and the rest go on: a manager deploying
ten VMs wants the nine, and which one failed and why. The deploy holds the template's VM lock,
so the template is not deleted or converted back under it, and two deploys of one template run
one after the other.
"""

from __future__ import annotations

import logging
import os
import time
import uuid as uuidlib
from dataclasses import dataclass, field
from typing import Any, Sequence

import libvirt

from cna_agent.compute import snapshots as snaps
from cna_agent.compute import state as st
from cna_agent.compute.customization import GuestCustomization
from cna_agent.compute.customization_mark import PENDING as CUSTOMIZATION_PENDING
from cna_agent.compute.inventory import VmInfo, presence
from cna_agent.compute.lifecycle import REQUEST_NS, VmLifecycle
from cna_agent.compute.spec import VmSpec
from cna_agent.compute.spec_validation import validate, validate_name
from cna_agent.compute.template_mark import TemplateMark, clear_mark, write_mark
from cna_agent.compute.vmops import VmOps
from cna_agent.contracts import DiskProvider
from cna_agent.errors import CODES, AgentError, AlreadyExists, FailedPrecondition, InvalidArgument, error_for, make_error
from cna_agent.operations import OperationContext
from cna_agent.state.journal import OperationError, OperationRecord

log = logging.getLogger(__name__)

#: How many VMs one DeployVm makes at most (a manager deploys more in several calls).
MAX_DEPLOY = 50


@dataclass
class DeployFailure:
    name: str
    code: str
    message: str


@dataclass
class DeployResult:
    """DeployVm's answer: the VMs made, in the request's order, and those that were not."""

    vms: list[VmInfo] = field(default_factory=list)
    failures: list[DeployFailure] = field(default_factory=list)


def clone_volume_id(template_volume: str, vm_name: str, datastore: str, linked: bool) -> str:
    """``<datastore>/<vm name>/<template file name>``; a linked clone is a qcow2 overlay, so a
    raw template volume's clone gets the .qcow2 suffix."""
    ds, _, rel = template_volume.partition("/")
    base = os.path.basename(rel)
    if linked and not base.endswith(".qcow2"):
        base = os.path.splitext(base)[0] + ".qcow2"
    return f"{datastore or ds}/{vm_name}/{base}"


class VmTemplates:
    def __init__(self, ops: VmOps, lifecycle: VmLifecycle, disks: DiskProvider | None) -> None:
        self.ops = ops
        self.lifecycle = lifecycle
        self.disks = disks

    def _storage(self, field_name: str) -> DiskProvider:
        if self.disks is None:
            raise FailedPrecondition("templates need the storage subsystem, which is not running on this agent",
                                     field=field_name)
        return self.disks

    # -- ConvertVmToTemplate -------------------------------------------------------------------

    async def convert(self, ref: str, *, request_id: str = "", fingerprint: str = "",
                      lock_timeout: float = 0.0) -> OperationRecord:
        inventory = self.ops.inventory
        uuid, name = await inventory.lookup_uuid(ref)  # a template already is refused, naming it
        spec = await inventory.spec(uuid)
        disks = self._storage("vm")
        for i, d in enumerate(spec.disks):
            if not d.volume and d.device != "cdrom":
                raise FailedPrecondition(f"disk {i} of vm {name!r} is not a datastore volume (a SAN LUN or a host file); "
                                         "a template's disks must be volumes its clones can stand on", field=f"spec.disks[{i}]")
        volumes = [d.volume for d in spec.disks if d.volume and not d.shareable and d.device != "cdrom"]

        async def work(op: OperationContext) -> Any:
            if await inventory.state(uuid) != st.STOPPED:
                raise FailedPrecondition(f"vm {name!r} is not stopped; shut it down before making it a template", field="vm")
            definition = await inventory.definition(uuid)
            if definition.customization is not None and definition.customization.state == CUSTOMIZATION_PENDING:
                raise FailedPrecondition(f"vm {name!r} has not finished its first-boot customization", field="vm")
            tree = await self.ops.hv.call(lambda c: snaps.list_tree(c.lookupByUUIDString(uuid)), timeout=30)
            external = [x.name for x in tree if x.kind == "external"]
            if external:
                # its disks' current data is in the snapshots' overlays, not in the volumes a deploy clones
                raise FailedPrecondition(f"vm {name!r} has external snapshots ({', '.join(external)}); delete them "
                                         "before making it a template", field="vm")
            # The mark first: a crash after it is finished by recover_convert (the volumes made
            # read-only again is harmless); a crash before it changed nothing.
            await self.ops.hv.call(lambda c: _mark(c.lookupByUUIDString(uuid)), timeout=30)
            inventory.forget(uuid)
            try:
                await self._protect(disks, volumes)
            except AgentError:
                await self.ops.hv.call(lambda c: clear_mark(c.lookupByUUIDString(uuid)), timeout=30)
                inventory.forget(uuid)
                raise
            await self.ops.events.publish("vm.template", resource_kind="vm", resource_id=uuid, resource_name=name,
                                          message=f"{name} is a template now ({len(volumes)} read-only volume(s))",
                                          attributes={"volumes": ",".join(volumes)}, operation_id=op.id)
            return await self.ops.result(uuid, op)

        return await self.ops.submit("vm.template", uuid, work, request_id=request_id, fingerprint=fingerprint,
                                     lock_timeout=lock_timeout, metadata={"volumes": ",".join(volumes)})

    @staticmethod
    async def _protect(disks: DiskProvider, volumes: list[str]) -> None:
        for i, volume in enumerate(volumes):
            await disks.protect_template(volume, field=f"spec.disks[{i}].volume")

    # -- after a crash ---------------------------------------------------------------------------

    def handlers(self) -> dict[str, Any]:
        return {"vm.template": self.recover_convert, "vm.deploy": self.recover_deploy}

    async def recover_convert(self, record: OperationRecord) -> Any:
        """Done iff the definition carries the mark (then its volumes are made read-only, as the
        request would have finished); without it nothing was changed."""
        uuid = record.target
        self.ops.inventory.forget(uuid)
        try:
            definition = await self.ops.inventory.definition(uuid)
        except AgentError:
            return OperationError(CODES["ABORTED"], "the agent stopped while making the template, and the VM is gone")
        if definition.template is None:
            return OperationError(CODES["ABORTED"], "the agent stopped before the VM was made a template; nothing changed "
                                                    "(repeat ConvertVmToTemplate)")
        volumes = [v for v in record.metadata.get("volumes", "").split(",") if v]
        if self.disks is not None:
            await self._protect(self.disks, volumes)
        return await self.ops.inventory.get(uuid)

    async def recover_deploy(self, record: OperationRecord) -> Any:
        """Each VM's own create has its own record and recovery; the deploy says which exist."""
        names = [n for n in record.metadata.get("names", "").split(",") if n]
        made = await self.ops.hv.call(lambda c: [n for n in names if _defined(c, n)], timeout=30)
        missing = [n for n in names if n not in made]
        return OperationError(CODES["ABORTED"], f"the agent stopped during the deploy; made: {', '.join(made) or 'none'}; "
                                                f"not made: {', '.join(missing) or 'none'} (a VM not made may have left "
                                                "cloned volumes under <datastore>/<name>/; repeat DeployVm for those names)")

    # -- DeployVm ------------------------------------------------------------------------------

    async def deploy(self, ref: str, names: Sequence[str], *, linked: bool, datastore: str = "", start: bool = False,
                     customizations: Sequence[GuestCustomization | None] = (), request_id: str = "",
                     fingerprint: str = "") -> OperationRecord:
        inventory = self.ops.inventory
        earlier = await self.ops.earlier(request_id, ("vm.deploy",), fingerprint)
        if earlier is not None:
            return earlier
        if not ref:
            raise InvalidArgument("template", "name the template VM (name or UUID)")
        try:
            uuid, tname = await inventory.lookup_uuid(ref, allow_template=True)
        except AgentError as exc:
            if exc.field != "vm":
                raise
            raise renamed(exc, "vm", "template") from None
        if (await inventory.definition(uuid)).template is None:
            raise FailedPrecondition(f"vm {tname!r} is not a template; ConvertVmToTemplate makes it one", field="template")
        template = await inventory.spec(uuid)
        disks = self._storage("template")
        specs = self._specs(template, names, linked, datastore, customizations, request_id)
        if datastore:
            await disks.state_area(datastore, field="datastore")  # a dir datastore this host has and reaches
        taken = await self.ops.hv.call(lambda c: {n for n in names if _defined(c, n)}, timeout=30)
        if taken:
            raise AlreadyExists(f"names: VM name(s) {', '.join(sorted(taken))} already in use on this host", field="names")

        async def work(op: OperationContext) -> Any:
            result = DeployResult()
            for i, spec in enumerate(specs):
                await op.progress(int(100 * i / len(specs)), f"deploying {spec.name} ({i + 1} of {len(specs)})")
                try:
                    result.vms.append(await self._deploy_one(disks, template, spec, linked, start,
                                                             customizations[i] if customizations else None,
                                                             f"{request_id}/{i}" if request_id else ""))
                except AgentError as exc:
                    log.warning("event=vm.deploy_failed template=%s name=%s code=%s error=%r", tname, spec.name, exc.code,
                                exc.message)
                    result.failures.append(DeployFailure(spec.name, exc.code, exc.message))
            if not result.vms:
                first = result.failures[0]
                raise error_for(first.code, f"no VM deployed from {tname!r}: " + "; ".join(
                    f"{f.name}: {f.message}" for f in result.failures))
            await self.ops.events.publish(
                "vm.deployed", resource_kind="vm", resource_id=uuid, resource_name=tname, operation_id=op.id,
                severity="warning" if result.failures else "info",
                message=f"{len(result.vms)} of {len(specs)} VM(s) deployed from {tname}",
                attributes={"vms": ",".join(v.name for v in result.vms), "failed": ",".join(f.name for f in result.failures)})
            return result

        return await self.ops.submit("vm.deploy", uuid, work, request_id=request_id, fingerprint=fingerprint,
                                     metadata={"names": ",".join(names), "linked": str(linked).lower()})

    def _specs(self, template: VmSpec, names: Sequence[str], linked: bool, datastore: str,
               customizations: Sequence[GuestCustomization | None], request_id: str) -> list[VmSpec]:
        """Each new VM's spec, checked before anything is made: the template's with its own
        name, uuid, MACs (chosen at create) and cloned volumes."""
        if not names:
            raise InvalidArgument("names", "name at least one VM to deploy")
        if len(names) > MAX_DEPLOY:
            raise InvalidArgument("names", f"{len(names)} VMs in one deploy; at most {MAX_DEPLOY}")
        if len(set(names)) != len(names):
            raise InvalidArgument("names", "each name once")
        if customizations and len(customizations) != len(names):
            raise InvalidArgument("customizations", f"{len(customizations)} customizations for {len(names)} names; "
                                                    "give none, or one per name")
        if datastore:
            validate_name(datastore, "datastore")
        out = []
        for i, name in enumerate(names):
            validate_name(name, f"names[{i}]")
            spec = template.copy()
            spec.name = name
            spec.uuid = str(uuidlib.uuid5(REQUEST_NS, f"{request_id}/{i}")) if request_id else ""
            for nic in spec.nics:
                nic.mac = ""
            for disk in spec.disks:
                if disk.volume and not disk.shareable and disk.device != "cdrom":
                    disk.volume = clone_volume_id(disk.volume, name, datastore, linked)
            validate(spec, self.lifecycle.validation_context())
            if customizations and customizations[i] is not None:
                if self.lifecycle.first_boot is None:
                    raise FailedPrecondition("this agent does not customize guests", field="customizations")
                try:
                    self.lifecycle.first_boot.check(customizations[i], spec)
                except AgentError as exc:
                    # customization.<x> as CreateVm names it; spec.<x> is the new VM's spec
                    old = exc.field
                    new = old.replace("customization", f"customizations[{i}]", 1) if old.startswith("customization") \
                        else f"customizations[{i}]: {old}" if old else f"customizations[{i}]"
                    raise renamed(exc, old, new) from None
            out.append(spec)
        return out

    async def _deploy_one(self, disks: DiskProvider, template: VmSpec, spec: VmSpec, linked: bool, start: bool,
                          customization: GuestCustomization | None, request_id: str) -> VmInfo:
        cloned: list[str] = []
        made = ""  # the uuid of the VM this deploy's create was for, once it answered
        try:
            for j, (src, disk) in enumerate(zip(template.disks, spec.disks)):
                if disk.volume != src.volume:
                    await disks.clone_for_vm(src.volume, disk.volume, linked=linked, field=f"spec.disks[{j}].volume")
                    cloned.append(disk.volume)
            record = await self.lifecycle.create(spec, start=start, customization=customization, request_id=request_id)
            made = record.target
            record = await self.ops.runner.finished(record.id, record)
            if record.error is not None:
                raise error_for(record.error.code, record.error.message)
            return await self.ops.inventory.get(record.target)
        except AgentError:
            await self._undo(disks, made, cloned)
            raise

    async def _undo(self, disks: DiskProvider, uuid: str, cloned: list[str]) -> None:
        """Nothing of a VM that failed stays: a create that failed after its define (QEMU did not
        start) left the VM, which is deleted with its disks; otherwise only the clones are. By
        uuid, never by name: a name taken meanwhile is someone else's VM."""
        try:
            if uuid and (await self.ops.hv.call(lambda c: presence(c, uuid), timeout=30))[0]:
                record = await self.lifecycle.delete(uuid, delete_disks=True, force=True)
                record = await self.ops.runner.finished(record.id, record)
                if record.error is None:
                    return
                log.warning("event=vm.deploy_undo_failed vm=%s error=%r", uuid, record.error.message)
        except AgentError as exc:
            log.warning("event=vm.deploy_undo_failed vm=%s error=%r", uuid, exc.message)
        for volume in reversed(cloned):
            try:
                await disks.delete_volume(volume, field="names")
            except AgentError as exc:
                log.warning("event=vm.deploy_undo_failed volume=%s error=%r", volume, exc.message)


def _mark(dom: libvirt.virDomain) -> None:
    """The template mark, and libvirt's autostart off: libvirt would otherwise start the
    template at the host's next boot (the spec keeps autostart as the deployed VMs' default)."""
    write_mark(dom, TemplateMark(time.time()))
    dom.setAutostart(0)


def _defined(conn: libvirt.virConnect, name: str) -> bool:
    try:
        conn.lookupByName(name)
        return True
    except libvirt.libvirtError:
        return False


def renamed(exc: AgentError, old: str, new: str) -> AgentError:
    """``exc`` naming field ``new`` where it named ``old`` (the field's path in this request):
    the same class and message, the field in the message too."""
    message = exc.message.replace(f"{old}: ", f"{new}: ", 1) if old and f"{old}: " in exc.message else f"{new}: {exc.message}"
    fields = tuple((new if f == old else f, m) for f, m in exc.fields) or ((new, message),)
    return make_error(type(exc), message, fields)
