"""VM lifecycle on libvirt: create, start, shutdown, reboot, pause, resume, delete.

Each call checks what it can before it submits (VmOps: validated input, resolved bindings),
then runs as one journalled operation holding the VM's lock. Safe stop is ACPI with a
deadline, then a graceful destroy (QEMU gets SIGTERM and can flush), then a forced one
(DESIGN.md "Stop gracefully first").
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import time
import uuid as uuidlib
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Awaitable, Callable

import libvirt

from cna_agent import __version__
from cna_agent import cancel as cancelling
from cna_agent.compute import domxml as dx
from cna_agent.compute import snapshots as snaps
from cna_agent.compute import state as st
from cna_agent.compute.binder import Binder
from cna_agent.compute.events import DomainEventMonitor
from cna_agent.firmware_descriptors import secure_boot_arches
from cna_agent.compute.render import Bindings, RenderContext, assign_disk_targets, build_domain, nvram_path, resolve_defaults
from cna_agent.compute.reservations import ReservationAdmission
from cna_agent.compute.recycle import RecycleBin, check_hold, in_bin_message, read_mark
from cna_agent.compute.rundirs import QemuRunDirs
from cna_agent.compute.shutdown import graceful_stop
from cna_agent.compute.spec import VmSpec, new_uuid
from cna_agent.compute.spec_validation import ValidationContext, validate
from cna_agent.compute.vmops import QUICK_WAIT_S, VmOps
from cna_agent.contracts import HostAdmission
from cna_agent.errors import AgentError, AlreadyExists, DeadlineExceeded, FailedPrecondition, Internal, NotFound
from cna_agent.operations import OperationContext
from cna_agent.qemu_access import QemuUser, make_dirs, open_way
from cna_agent.state.journal import OperationRecord

if TYPE_CHECKING:
    from cna_agent.compute.customization import GuestCustomization
    from cna_agent.compute.first_boot import FirstBoot
    from cna_agent.compute.hibernate import VmHibernation

log = logging.getLogger(__name__)

REQUEST_NS = uuidlib.UUID("0b6f3f0e-4a51-4c7e-9a53-6b1f1c2d3e4f")
#: How often a graceful shutdown presses the power button again while it waits.
DEFAULT_SHUTDOWN_TIMEOUT_S = 120.0


def _start_hint(message: str) -> str:
    """What an admin can do about a start failure libvirt words for its own developers."""
    if "Unable to enter mount namespace" in message:
        return ("; libvirt's per-guest mount namespace cannot be used from this process (a forked child has"
                " threads: cna_agent/host/forkprobe.py): set 'namespaces = []' in the embedded root's"
                " etc/qemu.conf and restart the agent")
    return ""


class DomainRenderer:
    """The domain builder with this host's facts, and the directories a definition needs."""

    def __init__(self, ctx: RenderContext, run_dirs: QemuRunDirs, *, virt_type: str, host_cpus: int) -> None:
        self.ctx = ctx
        self.run_dirs = run_dirs
        self.virt_type = virt_type
        self.host_cpus = host_cpus
        #: libvirt starts swtpm (and swtpm_setup on a first start) for a VM with spec.tpm.
        self.tpm_emulator = all(shutil.which(tool) for tool in ("swtpm", "swtpm_setup"))
        #: libvirt picks a Secure Boot VM's firmware from QEMU's descriptors; read once, as swtpm is.
        self.secure_boot_arches = secure_boot_arches()

    def validation(self, have_placer: bool) -> ValidationContext:
        return ValidationContext(host_arch=self.ctx.host_arch, virt_type=self.virt_type, host_cpus=self.host_cpus,
                                 have_placer=have_placer, tpm_emulator=self.tpm_emulator,
                                 secure_boot_arches=self.secure_boot_arches)

    def build(self, spec: VmSpec, bindings: Bindings) -> "dx.Domain":
        """The typed domain for this host (render() is its XML)."""
        ctx = replace(self.ctx, agent_version=__version__, created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        return build_domain(spec, bindings, ctx)

    def render(self, spec: VmSpec, bindings: Bindings) -> str:
        return self.build(spec, bindings).to_xml()

    def prepare_dirs(self, spec: VmSpec, qemu: QemuUser | None) -> None:
        self.run_dirs.prepare(spec.uuid, qemu)
        state = os.path.normpath(self.ctx.state_dir)
        os.makedirs(state, mode=0o700, exist_ok=True)  # the agent's own (the daemon makes it; embedders may not)
        make_dirs(os.path.join(state, "nvram"), below=state)
        if resolve_defaults(spec, self.ctx).firmware == "uefi":
            # libvirt copies the NVRAM template there and relabels the copy; QEMU opens it by path.
            open_way(nvram_path(self.ctx, spec.uuid), owned_below=os.path.dirname(state), user=qemu,
                     what="the VM's UEFI variable store", field="vm")


def left_stopped(name: str) -> str:
    """What a create-and-start whose start failed tells the manager about the VM it made."""
    return f"vm {name!r} was defined and is left stopped (StartVm starts it, DeleteVm removes it)"


class VmLifecycle:
    def __init__(self, ops: VmOps, binder: Binder, renderer: DomainRenderer, monitor: DomainEventMonitor, *,
                 admission: HostAdmission | None = None, reservations: ReservationAdmission | None = None) -> None:
        #: CPU and memory reservations checked against the host before each power-on.
        self.reservations = reservations
        self.ops = ops
        #: Asked before a VM begins to use this host (a new one, or a stopped one started):
        #: a host in maintenance refuses both.
        self.admission = admission
        self.hv = ops.hv
        self.inventory = ops.inventory
        self.binder = binder
        self.renderer = renderer
        self.monitor = monitor
        #: Where DeleteVm with a hold puts a VM (set by the composition root: the bin deletes
        #: through this lifecycle when a hold is up).
        self.recycle_bin: RecycleBin | None = None
        #: Where StartVm of a hibernated VM goes, and whose saved state DeleteVm removes (set by
        #: the composition root).
        self.hibernation: "VmHibernation | None" = None
        #: ACPI presses before a graceful shutdown asks the guest agent too ([compute] config).
        self.shutdown_agent_after_s = 20.0
        #: First-boot customization (first_boot.py), set by the wiring; None: refused.
        self.first_boot: FirstBoot | None = None
        #: Set the guest's clock after a resume (guest_agent.py's sync_clock), set by the wiring.
        self.clock_sync: Callable[[str, VmSpec | None], Awaitable[bool]] | None = None

    async def reclaim_placement(self, uuid: str, spec: VmSpec) -> None:
        """A stopped VM that gave its placement up (the recycle bin) takes one again: planned
        anew, since its old CPUs may be another VM's by now, and its definition re-rendered
        with it. RESOURCE_EXHAUSTED (the placer's) when none fits; nothing changes then."""
        placer = self.binder.placer
        if placer is None or not (spec.dedicated_cpus or spec.hugepages) or placer.get(uuid) is not None:
            return
        tree = await self.hv.call(lambda c: snaps.list_tree(c.lookupByUUIDString(uuid)), timeout=30)
        external = [x.name for x in tree if x.kind == "external"]
        if external:
            # Re-rendering would point the disks back at their base images and drop the overlays.
            raise FailedPrecondition(f"vm has external snapshots ({', '.join(external)}), so its definition cannot be "
                                     "rebuilt with a new CPU placement; delete them first", field="vm")
        bindings = await self.binder.bindings(spec)
        try:
            xml = self.renderer.render(spec, bindings)
            await self.hv.call(lambda c: c.defineXML(xml), timeout=30)
        except BaseException:
            await self.binder.release_placement(uuid)
            raise
        self.inventory.forget(uuid)

    def validation_context(self) -> ValidationContext:
        return self.renderer.validation(self.binder.placer is not None)

    def _prepare_dirs(self, spec: VmSpec) -> None:
        self.renderer.prepare_dirs(spec, self.hv.qemu_user())

    # -- create ------------------------------------------------------------------------------------

    async def create(self, spec: VmSpec, *, start: bool = False, request_id: str = "", fingerprint: str = "",
                     lock_timeout: float = 0.0, customization: GuestCustomization | None = None) -> OperationRecord:
        spec = spec.copy()
        validate(spec, self.validation_context())
        # Set when this create customizes the guest's first boot (first_boot.py).
        first_boot = self.first_boot if customization is not None else None
        if customization is not None:
            if first_boot is None:
                raise FailedPrecondition("this agent does not customize guests", field="customization")
            first_boot.check(customization, spec)
        if self.admission is not None:
            self.admission.check_admission("new VMs", field="spec")
        if not spec.uuid:
            # A retried request (same request_id) must name the same VM, so the runner sees the
            # same target and returns the first operation instead of creating a second VM.
            spec.uuid = str(uuidlib.uuid5(REQUEST_NS, request_id)) if request_id else new_uuid()
        spec.uuid = spec.uuid.lower()
        placer = self.binder.placer
        # Only a reservation this call makes is released on failure (a create naming an
        # existing VM's uuid must not free that VM's CPUs).
        reserved_here = placer is not None and placer.get(spec.uuid) is None
        bindings = await self.binder.bindings(spec)

        async def undo() -> None:
            if first_boot is not None:
                first_boot.discard(spec.uuid)
            if reserved_here:
                await self.binder.release_placement(spec.uuid)
            await self.binder.release_luns(spec, range(len(spec.disks)))

        try:
            await self.binder.fill_macs(spec.nics)
            # The guest device names are decided now and kept in the spec: GetVm reports them, and
            # per-disk calls (detach, resize, I/O-error resume) name disks by target.
            for disk, target in zip(spec.disks, assign_disk_targets(spec, spec.os_family or "linux")):
                disk.target = target
            dom = self.renderer.build(spec, bindings)
            if first_boot is not None:
                first_boot.attach(dom, spec)  # the first-boot drive and its pending mark
            xml = dom.to_xml()
        except BaseException:
            await undo()
            raise

        async def work(op: OperationContext) -> Any:
            await op.progress(10, "defining")

            def define(conn: libvirt.virConnect) -> None:
                for ref, field in ((spec.uuid, "spec.uuid"), (spec.name, "spec.name")):
                    try:
                        existing = self.inventory.lookup(conn, ref)
                    except NotFound:
                        continue
                    mark = read_mark(existing)
                    where = f" in the recycle bin until {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(mark.expires_at))}" \
                        if mark else ""
                    raise AlreadyExists(f"a VM with {field.split('.')[1]} {ref!r} already exists ({existing.name()}{where})",
                                        field=field)
                try:
                    dom = conn.defineXML(xml)
                except libvirt.libvirtError as exc:
                    if exc.get_error_code() == libvirt.VIR_ERR_OPERATION_FAILED and "already exists" in str(exc):
                        raise AlreadyExists(str(exc), field="spec.name") from None
                    raise Internal(f"libvirt refused the domain definition: {exc}") from None
                if spec.autostart:
                    dom.setAutostart(1)

            try:
                # From here the VM exists in libvirt: a cancel could only leave it half-made.
                cancelling.commit(f"vm {spec.name!r} is being defined; delete it instead")
                self._prepare_dirs(spec)
                if first_boot is not None and customization is not None:
                    await first_boot.write(customization, spec, self.hv.qemu_user())
                await self.hv.call(define, timeout=30)
            except BaseException:
                await undo()
                raise
            if first_boot is not None:
                self.inventory.forget(spec.uuid)  # its definition holds the pending mark too: read it again
            else:
                self.inventory.remember(spec.uuid, spec)
            await self.ops.events.publish("vm.defined", resource_kind="vm", resource_id=spec.uuid, resource_name=spec.name,
                                          message=f"{spec.name} defined", operation_id=op.id)
            if start:
                await op.progress(50, "starting")
                try:
                    await self.start_domain(spec.uuid)
                except AgentError as exc:
                    if await self._runs_after_all(spec.uuid):
                        log.warning("event=vm.start_answer_lost vm=%s error=%r (it runs: the start happened)",
                                    spec.uuid, exc.message)
                        return await self.ops.result(spec.uuid, op)
                    # The VM exists now (libvirtd may even be gone, so it could not be undefined):
                    # say so, or a manager reading "failed" takes it for nothing made (seen with
                    # libvirtd killed mid-create) and a retry meets ALREADY_EXISTS.
                    exc.message = f"{exc.message}; {left_stopped(spec.name)}"
                    raise
            return await self.ops.result(spec.uuid, op)

        try:
            return await self.ops.submit("vm.create", spec.uuid, work, request_id=request_id, fingerprint=fingerprint,
                                         lock_timeout=lock_timeout, wait=30.0 if start else QUICK_WAIT_S, cancellable=True,
                                         metadata={"start": "true"} if start else None)
        except Exception:
            await undo()  # refused before it ran (busy, request id reuse)
            raise

    async def _runs_after_all(self, uuid: str, wait_s: float = 15.0) -> bool:
        """Whether a start whose call failed ran anyway: libvirtd can die after launching QEMU
        and before answering, and the restarted daemon re-attaches the running guest (a create
        reported failed while its VM ran). Asked again until libvirt answers, up to ``wait_s``."""
        deadline = asyncio.get_running_loop().time() + wait_s
        while True:
            try:
                return await self.inventory.state(uuid) in (st.RUNNING, st.PAUSED)
            except (AgentError, libvirt.libvirtError):
                if asyncio.get_running_loop().time() > deadline:
                    return False
                await asyncio.sleep(1.0)

    # -- start / stop ------------------------------------------------------------------------------

    async def start_domain(self, uuid: str) -> None:
        spec = await self.inventory.spec(uuid)
        self._prepare_dirs(spec)  # the run dir is volatile (tmpfs after a host reboot)

        def start(conn: libvirt.virConnect) -> None:
            dom = conn.lookupByUUIDString(uuid)
            if dom.isActive():
                return
            try:
                dom.create()
            except libvirt.libvirtError as exc:
                raise FailedPrecondition(f"QEMU did not start: {exc}{_start_hint(str(exc))}") from None

        if self.reservations is None:
            await self.hv.call(start, timeout=120)
            return
        async with self.reservations.admitted(uuid, spec, f"starting vm {spec.name!r}"):
            await self.hv.call(start, timeout=120)

    async def start_vm(self, ref: str, *, request_id: str = "", fingerprint: str = "", lock_timeout: float = 0.0) -> OperationRecord:
        uuid, name = await self.inventory.lookup_uuid(ref, allow_hibernated=self.hibernation is not None)
        if self.hibernation is not None and (await self.inventory.definition(uuid)).hibernated is not None:
            # A hibernated VM starts where it stopped (libvirt's managed save does the same).
            return await self.hibernation.unhibernate(uuid, request_id=request_id, fingerprint=fingerprint,
                                                      lock_timeout=lock_timeout)
        if self.admission is not None and await self.inventory.state(uuid) not in (st.RUNNING, st.PAUSED):
            self.admission.check_admission(f"starting vm {name!r}", field="vm")

        async def work(op: OperationContext) -> Any:
            await self.start_domain(uuid)
            return await self.ops.result(uuid, op)

        return await self.ops.submit("vm.start", uuid, work, request_id=request_id, fingerprint=fingerprint,
                                     lock_timeout=lock_timeout, wait=30.0)

    async def wait_state(self, uuid: str, want: set[str], timeout: float) -> bool:
        """Wait for libvirt to report one of ``want``; woken by events, re-checked every 2 s."""
        deadline = time.monotonic() + timeout
        changed = self.monitor.changed_event(uuid)
        while True:
            changed.clear()
            if await self.inventory.state(uuid) in want:
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            try:
                await asyncio.wait_for(changed.wait(), timeout=min(left, 2.0))
            except asyncio.TimeoutError:
                pass

    async def destroy(self, uuid: str) -> None:
        """Power off: graceful destroy first (QEMU gets SIGTERM and can flush), then forced."""

        def destroy(conn: libvirt.virConnect) -> None:
            dom = conn.lookupByUUIDString(uuid)
            if not dom.isActive():
                return
            try:
                dom.destroyFlags(libvirt.VIR_DOMAIN_DESTROY_GRACEFUL)
            except libvirt.libvirtError:
                if dom.isActive():
                    dom.destroy()

        await self.hv.call(destroy, timeout=90)

    async def shutdown(self, ref: str, *, timeout: float = 0.0, force: bool = False, hard: bool = False,
                       request_id: str = "", fingerprint: str = "", lock_timeout: float = 0.0) -> OperationRecord:
        uuid, name = await self.inventory.lookup_uuid(ref)
        timeout = timeout or DEFAULT_SHUTDOWN_TIMEOUT_S

        async def work(op: OperationContext) -> Any:
            if await self.inventory.state(uuid) in (st.STOPPED, st.CRASHED):
                return await self.ops.result(uuid, op)
            if not hard:
                await op.progress(10, "acpi-shutdown")
                # ACPI presses, then the guest agent for a guest that ignores them (shutdown.py).
                spec = (await self.inventory.definition(uuid)).spec
                via = await graceful_stop(self.hv, uuid, timeout, guest_agent=bool(spec and spec.guest_agent),
                                          stopped=lambda s: self.wait_state(uuid, {st.STOPPED, st.CRASHED}, s),
                                          stage=lambda name: op.progress(50, name), agent_after_s=self.shutdown_agent_after_s)
                if via:
                    await op.note(shutdown_via=via)  # the operation says how the guest was asked
                    return await self.ops.result(uuid, op)
                if not force:
                    raise DeadlineExceeded(f"vm {name!r} did not shut down within {timeout:.0f}s; retry with force to power it off")
            # A cancel stops the graceful wait (a guest that got the button may still power off);
            # the power-off itself is one call that cannot be taken back.
            cancelling.commit(f"vm {name!r} is being powered off")
            await op.progress(80, "power-off")
            await self.destroy(uuid)
            return await self.ops.result(uuid, op)

        return await self.ops.submit("vm.shutdown", uuid, work, request_id=request_id, fingerprint=fingerprint,
                                     lock_timeout=lock_timeout, wait=2.0 if not hard else QUICK_WAIT_S, cancellable=True)

    async def reboot(self, ref: str, *, hard: bool = False, request_id: str = "", fingerprint: str = "",
                     lock_timeout: float = 0.0) -> OperationRecord:
        def do(dom: libvirt.virDomain) -> None:
            if hard:
                dom.reset(0)
            else:
                # ACPI power button; libvirt restarts the guest once it powers off (fake reboot),
                # so guests without a reboot handler still come back.
                dom.reboot(libvirt.VIR_DOMAIN_REBOOT_ACPI_POWER_BTN)

        # The metadata lets recovery judge a reboot cut short (recovery.py recover_reboot): a
        # reset that libvirt answered has happened; a power-button press may not be honoured.
        return await self._simple(ref, "vm.reboot", do, request_id, fingerprint, lock_timeout,
                                  metadata={"hard": str(hard).lower()}, note_asked=True)

    async def pause(self, ref: str, *, request_id: str = "", fingerprint: str = "", lock_timeout: float = 0.0) -> OperationRecord:
        return await self._simple(ref, "vm.pause", lambda d: d.suspend() if d.state()[0] == libvirt.VIR_DOMAIN_RUNNING else None,
                                  request_id, fingerprint, lock_timeout)

    async def resume(self, ref: str, *, request_id: str = "", fingerprint: str = "", lock_timeout: float = 0.0) -> OperationRecord:
        """Resume a paused VM, then set its guest's clock (behind by the pause) through its agent."""
        async def after(uuid: str) -> None:
            if self.clock_sync is not None:
                await self.clock_sync(uuid, (await self.inventory.definition(uuid)).spec)

        return await self._simple(ref, "vm.resume", lambda d: d.resume() if d.state()[0] == libvirt.VIR_DOMAIN_PAUSED else None,
                                  request_id, fingerprint, lock_timeout, after=after)

    async def _simple(self, ref: str, kind: str, fn: Callable[[libvirt.virDomain], Any], request_id: str, fingerprint: str,
                      lock_timeout: float, *, metadata: dict[str, str] | None = None, note_asked: bool = False,
                      after: Callable[[str], Awaitable[None]] | None = None) -> OperationRecord:
        """One libvirt call on a running VM, as an operation; ``note_asked`` records in the
        operation that libvirt answered the call (for a kind whose effect leaves no state to read)."""
        uuid, name = await self.inventory.lookup_uuid(ref)

        async def work(op: OperationContext) -> Any:
            def do(conn: libvirt.virConnect) -> None:
                dom = conn.lookupByUUIDString(uuid)
                if not dom.isActive():
                    raise FailedPrecondition(f"vm {name!r} is not running", field="vm")
                fn(dom)

            await self.hv.call(do, timeout=30)
            if note_asked:
                await op.note(asked_at=f"{time.time():.3f}")
            if after is not None:
                await after(uuid)
            return await self.ops.result(uuid, op)

        return await self.ops.submit(kind, uuid, work, request_id=request_id, fingerprint=fingerprint,
                                     lock_timeout=lock_timeout, wait=QUICK_WAIT_S, metadata=metadata)

    # -- delete ------------------------------------------------------------------------------------

    async def delete(self, ref: str, *, delete_disks: bool = False, force: bool = False, hold_s: int = 0,
                     request_id: str = "", fingerprint: str = "", lock_timeout: float = 0.0) -> OperationRecord:
        """DeleteVm; with ``hold_s`` the VM goes to the recycle bin instead (recycle.py) and is
        deleted, as asked here, when the hold is up. A VM already in the bin is deleted now."""
        check_hold(hold_s)
        uuid, name = await self.inventory.lookup_uuid(ref, allow_recycled=True, allow_hibernated=True, allow_template=True)
        spec = await self.inventory.spec(uuid)
        definition = await self.inventory.definition(uuid)
        in_bin = definition.recycled
        if hold_s and in_bin is not None:
            raise FailedPrecondition(f"{in_bin_message(name, in_bin)}; its hold is not changed", field="hold_time_s")
        if hold_s and definition.hibernated is not None:
            raise FailedPrecondition(f"vm {name!r} is hibernated; resume it first, or delete it (and its saved state) "
                                     "without hold_time_s", field="hold_time_s")
        if hold_s and self.recycle_bin is None:
            raise FailedPrecondition("this agent has no recycle bin; delete without hold_time_s", field="hold_time_s")
        storage = self.binder.disks
        if delete_disks and storage is None and any(d.volume for d in spec.disks):
            raise FailedPrecondition("delete_disks needs the storage subsystem, which is not running on this agent; "
                                     "delete the VM keeping its disks", field="delete_disks")

        async def work(op: OperationContext) -> Any:
            running = await self.inventory.state(uuid) not in (st.STOPPED, st.CRASHED)
            if running and not force:
                raise FailedPrecondition(f"vm {name!r} is running; shut it down first or pass force", field="vm")
            # Which disks the VM holds, read from its definition under the VM lock (a disk
            # attached since the request was checked counts): after the undefine nothing says.
            current = await self.inventory.spec(uuid)
            own = [(i, d.volume) for i, d in enumerate(current.disks) if d.volume and not d.shareable and d.device != "cdrom"]
            if delete_disks and storage is not None:
                # Refused before anything changes (the power-off included): after the undefine a
                # refusal would leave the VM gone and its disks half-deleted (seen: a linked
                # clone stood on one).
                await self._check_disks_deletable(uuid, own, storage)
            if running:
                await self.destroy(uuid)
            if hold_s and self.recycle_bin is not None:
                await self.recycle_bin.recycle(op, uuid, name, hold_s, delete_disks)
                return None

            if self.hibernation is not None:
                await self.hibernation.discard_state(uuid)

            def undefine(conn: libvirt.virConnect) -> None:
                dom = conn.lookupByUUIDString(uuid)
                flags = (libvirt.VIR_DOMAIN_UNDEFINE_NVRAM | libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
                         | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA | libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA
                         | libvirt.VIR_DOMAIN_UNDEFINE_TPM)  # swtpm's state goes with the VM
                dom.undefineFlags(flags)

            await self.hv.call(undefine, timeout=30)
            self.inventory.forget(uuid)
            self.renderer.run_dirs.remove(uuid)
            if delete_disks and storage is not None:
                for i, volume in own:
                    await storage.delete_volume(volume, field=f"spec.disks[{i}].volume")
            await self.binder.release_placement(uuid)
            await self.ops.events.publish("vm.deleted", resource_kind="vm", resource_id=uuid, resource_name=name,
                                          message=f"{name} deleted", attributes={"delete_disks": str(delete_disks).lower()},
                                          operation_id=op.id)
            luns = [i for i, d in enumerate(current.disks) if d.lun is not None]
            if luns:
                # Kernel iSCSI/FC LUNs leave the host unless another VM uses them; never fails the delete.
                await op.progress(90, "releasing SAN LUNs on the host")
                await self.binder.release_lun_disks(current, luns)
            return None

        return await self.ops.submit("vm.delete", uuid, work, request_id=request_id, fingerprint=fingerprint,
                                     lock_timeout=lock_timeout, wait=QUICK_WAIT_S,
                                     metadata={"hold_s": str(hold_s)} if hold_s else None)

    async def _check_disks_deletable(self, uuid: str, own: list[tuple[int, str]], storage: Any) -> None:
        """Each disk DeleteVm would delete: not used by another VM here, and deletable by storage."""
        users: dict[str, set[str]] = {}
        for other in await self.inventory.list(recycled=None):  # a VM in the recycle bin holds its disks
            if other.uuid != uuid and other.spec is not None:
                for d in other.spec.disks:
                    if d.volume:
                        users.setdefault(d.volume, set()).add(other.name)
        for i, volume in own:
            field = f"spec.disks[{i}].volume"
            if volume in users:
                raise FailedPrecondition(f"{field}: volume {volume!r} is also a disk of VM(s) {', '.join(sorted(users[volume]))}; "
                                         "detach it there first, or delete the VM without delete_disks", field=field)
            await storage.check_deletable(volume, field=field)
