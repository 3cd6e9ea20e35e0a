"""VmService: the VM lifecycle on libvirt, as journalled, per-VM-serialised operations.

* Every mutating call validates the spec and resolves its bindings *before* submitting an
  operation, so bad input is refused with INVALID_ARGUMENT and nothing on the host changes.
* Operations take the lock "vm/<uuid>": one operation per VM at a time, different VMs in
  parallel; ``lock_timeout`` says how long to wait for a busy VM (0 = FAILED_PRECONDITION at
  once). Duplicate request ids return the first operation (the runner's journal).
* The VM spec lives in the domain's ``<metadata>`` (domxml.CNA_NS); listing reads it once
  per definition and caches it (invalidated by libvirt's DEFINED/UNDEFINED events).
* Domains without our metadata are reported as unmanaged on request and never touched.

Hooks for later work: ``qmp`` (the side channel), serial-console streaming and snapshots
reach VMs through :meth:`lookup_uuid`, :meth:`serial_log_path` and :meth:`with_vm_lock`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
import uuid as uuidlib
from dataclasses import dataclass, replace
from typing import Any, Awaitable, Callable, Iterable, Sequence
from xml.etree import ElementTree as ET

import libvirt

from cna_agent import __version__
from cna_agent.compute.disks import DiskOperations
from cna_agent.compute import domxml as dx
from cna_agent.compute import state as st
from cna_agent.contracts import DiskResolver, NicResolver
from cna_agent.compute.events import DomainEventMonitor
from cna_agent.hypervisor import Hypervisor
from cna_agent.compute import qmp as qmpmod
from cna_agent.compute import snapshots as snaps
from cna_agent.compute.render import Bindings, assign_disk_targets, RenderContext, build_domain, serial_log_path
from cna_agent.compute.rundirs import QemuRunDirs, QemuUser
from cna_agent.compute.sidechannel import Diagnostics, SideChannels
from cna_agent.compute.resolvers import LocalFileResolver, NoNetworkResolver
from cna_agent.compute.spec import UUID_RE, ValidationContext, VmSpec, new_uuid, validate, validate_name
from cna_agent.errors import AlreadyExists, DeadlineExceeded, FailedPrecondition, Internal, InvalidArgument, NotFound
from cna_agent.operations import OperationContext, OperationRunner
from cna_agent.state.eventlog import EventHub
from cna_agent.state.journal import OperationRecord, RequestIdConflict

log = logging.getLogger(__name__)

#: Fields UpdateVm may change, and those it can change on a running VM (hot-plug / live tune).
UPDATABLE = {"vcpus", "max_vcpus", "memory_mib", "max_memory_mib", "cpu_qos", "memory_qos", "description", "labels",
             "cpu_topology", "cpu_mode", "cpu_model", "balloon", "autostart", "console", "watchdog", "panic_device",
             "guest_agent", "serial_console", "numa_cells", "boot"}
LIVE_UPDATABLE = {"vcpus", "memory_mib", "cpu_qos", "memory_qos", "description", "labels", "autostart"}
QUICK_WAIT_S = 10.0
REQUEST_NS = uuidlib.UUID("0b6f3f0e-4a51-4c7e-9a53-6b1f1c2d3e4f")
DEFAULT_SHUTDOWN_TIMEOUT_S = 120.0


@dataclass
class ConsoleInfo:
    type: str = "none"
    host: str = ""
    port: int = 0
    password: str = ""
    unix_socket: str = ""


@dataclass
class VmInfo:
    uuid: str
    name: str
    managed: bool
    spec: VmSpec | None
    state: str = st.UNKNOWN
    reason: str = ""
    state_time: float | None = None
    active_operation_id: str = ""
    cpu_time_ns: int = 0
    memory_rss_kib: int = 0
    qemu_pid: str = ""
    console: ConsoleInfo | None = None


@dataclass
class _Cached:
    name: str
    managed: bool
    spec: VmSpec | None


ResultFactory = Callable[[VmInfo], Any]


class VmService:
    def __init__(
        self,
        hypervisor: Hypervisor,
        runner: OperationRunner,
        events: EventHub,
        render_ctx: RenderContext,
        *,
        virt_type: str,
        host_cpus: int,
        image_dirs: Sequence[str] = (),
        to_result: ResultFactory | None = None,
        components: dict[str, Any] | None = None,
    ) -> None:
        self.hv = hypervisor
        self.runner = runner
        self.events = events
        self.render_ctx = render_ctx
        self.run_dirs = QemuRunDirs(render_ctx)
        self.virt_type = virt_type
        self.host_cpus = host_cpus
        self.local_files = LocalFileResolver(image_dirs)
        self._to_result = to_result or (lambda info: None)
        self._components = components if components is not None else {}
        self._cache: dict[str, _Cached] = {}
        self._state_times: dict[str, float] = {}
        self.monitor = DomainEventMonitor(hypervisor, events, on_change=self._note_state, on_definition_change=self._forget)
        self.sidechannels = SideChannels(events, self._qmp_lookup)
        #: SnapshotInfo -> the API's Snapshot message (set by the component; services never import the API).
        self.snapshot_result: Callable[[snaps.SnapshotInfo], Any] = lambda info: None
        self.disks = DiskOperations(self)

    # -- start / stop ---------------------------------------------------------------------------

    async def start(self) -> None:
        await self.monitor.start()
        if self.hv.connected:
            await self.adopt()

    async def stop(self) -> None:
        await self.monitor.stop()
        await self.sidechannels.close()

    async def adopt(self) -> list[VmInfo]:
        """List every domain; ours are adopted with their spec, others noted. Nothing is
        started, stopped or redefined (DESIGN.md "Restart adopts, never redoes")."""
        vms = await self.list(include_unmanaged=True)
        managed = [v for v in vms if v.managed]
        for v in managed:
            if v.state in (st.RUNNING, st.PAUSED):
                self.sidechannels.state_changed(v.uuid, st.RUNNING)
        log.info("event=vm.adopted managed=%d unmanaged=%d running=%d", len(managed), len(vms) - len(managed),
                 sum(1 for v in managed if v.state == st.RUNNING))
        return vms

    def _note_state(self, uuid: str, state: str, reason: str, when: float) -> None:
        self._state_times[uuid] = when
        if uuid in self._cache and self._cache[uuid].managed:
            self.sidechannels.state_changed(uuid, state)

    async def _qmp_lookup(self, uuid: str) -> tuple[str, str]:
        """(side-channel socket path from the live domain's <qemu:commandline>, name)."""

        def read(conn: libvirt.virConnect) -> tuple[str, str]:
            dom = conn.lookupByUUIDString(uuid)
            return dom.XMLDesc(0), dom.name()

        xml, name = await self.hv.call(read, timeout=15)
        return qmpmod.path_from_args(dx.Domain.from_xml(xml).qemu_args), name

    async def open_console(self, ref: str, *, force: bool = False) -> "ConsoleSession":
        """A serial console session on a running VM (close it when done)."""
        from cna_agent.compute.console import ConsoleSession

        uuid, name = await self.lookup_uuid(ref)
        cached = await self._cached(uuid)
        if cached.spec is not None and not cached.spec.serial_console:
            raise FailedPrecondition(f"vm {name!r} has no serial console (spec.serial_console is off)", field="vm")
        session = ConsoleSession(self.hv, uuid, name)
        await session.open(force=force)
        return session

    # -- snapshots ------------------------------------------------------------------------------------

    async def list_snapshots(self, ref: str) -> list["snaps.SnapshotInfo"]:
        uuid, _ = await self.lookup_uuid(ref)
        return await self.hv.call(lambda c: snaps.list_tree(c.lookupByUUIDString(uuid)), timeout=30)

    async def create_snapshot(self, ref: str, name: str, *, description: str = "", quiesce: bool = False, request_id: str = "",
                              fingerprint: str = "", lock_timeout: float = 0.0) -> OperationRecord:
        validate_name(name, "name")
        snaps.validate_description(description)
        uuid, _ = await self.lookup_uuid(ref)

        async def work(op: OperationContext) -> Any:
            info = await self.hv.call(lambda c: snaps.create(c.lookupByUUIDString(uuid), name, description, quiesce), timeout=300)
            self._cache.pop(uuid, None)  # an external snapshot changed the disk sources
            await self.events.publish("vm.snapshot.created", resource_kind="vm", resource_id=uuid, message=f"snapshot {name} ({info.kind})",
                                      attributes={"snapshot": name, "kind": info.kind}, operation_id=op.id)
            return self.snapshot_result(info)

        return await self._submit("vm.snapshot.create", uuid, work, request_id=request_id, fingerprint=fingerprint,
                                  lock_timeout=lock_timeout, wait=QUICK_WAIT_S)

    async def revert_snapshot(self, ref: str, name: str, *, request_id: str = "", fingerprint: str = "",
                              lock_timeout: float = 0.0) -> OperationRecord:
        validate_name(name, "snapshot")
        uuid, _ = await self.lookup_uuid(ref)

        async def work(op: OperationContext) -> Any:
            await self.hv.call(lambda c: snaps.revert(c.lookupByUUIDString(uuid), name), timeout=300)
            self._cache.pop(uuid, None)
            await self.events.publish("vm.snapshot.reverted", resource_kind="vm", resource_id=uuid, message=f"reverted to {name}",
                                      attributes={"snapshot": name}, operation_id=op.id)
            return await self._result(uuid)

        return await self._submit("vm.snapshot.revert", uuid, work, request_id=request_id, fingerprint=fingerprint,
                                  lock_timeout=lock_timeout, wait=QUICK_WAIT_S)

    async def delete_snapshot(self, ref: str, name: str, *, request_id: str = "", fingerprint: str = "",
                              lock_timeout: float = 0.0) -> OperationRecord:
        validate_name(name, "snapshot")
        uuid, _ = await self.lookup_uuid(ref)

        async def work(op: OperationContext) -> Any:
            how = await self.hv.call(lambda c: snaps.delete(c.lookupByUUIDString(uuid), name), timeout=300)
            await self.events.publish("vm.snapshot.deleted", resource_kind="vm", resource_id=uuid, message=f"snapshot {name} deleted ({how})",
                                      attributes={"snapshot": name, "how": how}, operation_id=op.id)
            return None

        return await self._submit("vm.snapshot.delete", uuid, work, request_id=request_id, fingerprint=fingerprint,
                                  lock_timeout=lock_timeout, wait=QUICK_WAIT_S)

    async def diagnostics(self, ref: str, *, dirty_rate_seconds: int = 0) -> Diagnostics:
        """QEMU-level facts over the side channel (query-status, vCPU threads, dirty rate,
        the last GUEST_PANICKED details); the VM must be running or paused."""
        if not 0 <= dirty_rate_seconds <= 60:
            raise InvalidArgument("dirty_rate_seconds", f"{dirty_rate_seconds} is not in 0..60 (0 = do not measure)")
        uuid, name = await self.lookup_uuid(ref)
        if await self._state(uuid) not in (st.RUNNING, st.PAUSED):
            raise FailedPrecondition(f"vm {name!r} is not running; QEMU diagnostics exist only while it runs", field="vm")
        return await self.sidechannels.diagnostics(uuid, dirty_rate_seconds)

    def _forget(self, uuid: str) -> None:
        self._cache.pop(uuid, None)

    # -- seams -------------------------------------------------------------------------------------

    def _disk_resolver(self) -> DiskResolver:
        storage = self._components.get("storage")
        resolver = getattr(storage, "service", None) if storage is not None else None
        return resolver if resolver is not None and hasattr(resolver, "resolve_volume") else self.local_files  # type: ignore[return-value]

    def _nic_resolver(self) -> NicResolver:
        network = self._components.get("network")
        resolver = getattr(network, "service", None) if network is not None else None
        return resolver if resolver is not None and hasattr(resolver, "resolve_port_group") else NoNetworkResolver()  # type: ignore[return-value]

    def validation_context(self) -> ValidationContext:
        return ValidationContext(host_arch=self.render_ctx.host_arch, virt_type=self.virt_type, host_cpus=self.host_cpus,
                                 have_placer="placement" in self._components)

    def serial_log_path(self, uuid: str) -> str:
        """Where the VM's serial console is logged (for the console stream and admins)."""
        return serial_log_path(self.render_ctx, uuid)

    async def _bindings(self, spec: VmSpec) -> Bindings:
        disks_r = self._disk_resolver()
        disks = []
        for i, disk in enumerate(spec.disks):
            if disk.volume:
                # Absolute paths are local images under [compute] image_dirs; datastore ids
                # ("datastore/relative/path") belong to the storage subsystem.
                r = self.local_files if disk.volume.startswith("/") else disks_r
                disks.append(await r.resolve_volume(disk.volume, field=f"spec.disks[{i}].volume"))
            else:
                assert disk.lun is not None
                disks.append(await disks_r.resolve_lun(disk.lun.datastore, disk.lun.lun_id, field=f"spec.disks[{i}].lun"))
        nics_r = self._nic_resolver()
        nics = [await nics_r.resolve_port_group(n.port_group, field=f"spec.nics[{i}].port_group") for i, n in enumerate(spec.nics)]
        kernel = initrd = ""
        if spec.boot.kernel:
            kernel = self._boot_file(spec.boot.kernel, "spec.boot.kernel")
        if spec.boot.initrd:
            initrd = self._boot_file(spec.boot.initrd, "spec.boot.initrd")
        placement = None
        placer = self._placer()
        if placer is not None and (spec.dedicated_cpus or spec.hugepages):
            # Reserved now, under the placer's lock and in the state database, so concurrent
            # creations never share a dedicated CPU; released again if the create fails.
            placement = await placer.plan(spec.uuid, spec.effective_max_vcpus, spec.memory_mib, dedicated=spec.dedicated_cpus,
                                          hugepages=spec.hugepages, numa_cells=spec.numa_cells)
        return Bindings(disks=disks, nics=nics, kernel=kernel, initrd=initrd, placement=placement)

    def _placer(self) -> Any:
        placement = self._components.get("placement")
        return getattr(placement, "service", None) if placement is not None else None

    async def _release_placement(self, uuid: str) -> None:
        placer = self._placer()
        if placer is not None:
            await placer.release(uuid)

    def _boot_file(self, path: str, field: str) -> str:
        storage = self._components.get("storage")
        resolve = getattr(getattr(storage, "service", None), "resolve_boot_file", None)
        if resolve is not None and not path.startswith("/"):
            return resolve(path, field=field)
        return self.local_files.confine(path, field=field)

    def _fill_macs(self, spec: VmSpec) -> None:
        used = {n.mac.lower() for c in self._cache.values() if c.spec for n in c.spec.nics if n.mac}
        for nic in spec.nics:
            if nic.mac:
                nic.mac = nic.mac.lower()
                continue
            while True:
                mac = "52:54:00:%02x:%02x:%02x" % (random.randrange(256), random.randrange(256), random.randrange(256))
                if mac not in used:
                    break
            used.add(mac)
            nic.mac = mac

    def _render(self, spec: VmSpec, bindings: Bindings) -> str:
        ctx = replace(self.render_ctx, agent_version=__version__, created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        return build_domain(spec, bindings, ctx).to_xml()

    # -- lookups -------------------------------------------------------------------------------------

    @staticmethod
    def _lookup(conn: libvirt.virConnect, ref: str) -> libvirt.virDomain:
        try:
            if UUID_RE.match(ref):
                return conn.lookupByUUIDString(ref)
            return conn.lookupByName(ref)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                raise NotFound(f"vm {ref!r} not found", field="vm") from None
            raise

    async def lookup_uuid(self, ref: str, *, require_managed: bool = True) -> tuple[str, str]:
        """(uuid, name) of the VM named by UUID or name; NotFound / FailedPrecondition."""
        if not ref:
            raise InvalidArgument("vm", "must name a VM (UUID or name)")
        if not UUID_RE.match(ref):
            validate_name(ref, "vm")
        uuid, name = await self.hv.call(lambda c: (lambda d: (d.UUIDString(), d.name()))(self._lookup(c, ref)), timeout=10)
        if require_managed:
            cached = await self._cached(uuid)
            if not cached.managed:
                raise FailedPrecondition(f"vm {name!r} was not created by cna-agent; the agent leaves it alone", field="vm")
        return uuid, name

    async def _cached(self, uuid: str) -> _Cached:
        c = self._cache.get(uuid)
        if c is None:
            c = await self.hv.call(lambda conn: self._read_definition(conn.lookupByUUIDString(uuid)), timeout=15)
            self._cache[uuid] = c
        return c

    @staticmethod
    def _read_definition(dom: libvirt.virDomain) -> _Cached:
        try:
            meta = dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, dx.CNA_NS, libvirt.VIR_DOMAIN_AFFECT_CONFIG if dom.isPersistent() else 0)
        except libvirt.libvirtError:
            return _Cached(dom.name(), False, None)
        try:
            text = dx.spec_json_from_metadata(ET.fromstring(meta))
            spec = VmSpec.from_json(text) if text else None
        except (ET.ParseError, ValueError):
            spec = None
        return _Cached(dom.name(), spec is not None, spec)

    # -- reads -----------------------------------------------------------------------------------------

    async def get(self, ref: str) -> VmInfo:
        if not ref:
            raise InvalidArgument("vm", "must name a VM (UUID or name)")

        def read(conn: libvirt.virConnect) -> tuple[str, str, tuple[int, int], list[int], str, str]:
            dom = self._lookup(conn, ref)
            s = dom.state()
            info = dom.info()
            xml = dom.XMLDesc(0) if dom.isActive() else ""
            return dom.UUIDString(), dom.name(), (s[0], s[1]), info, xml, ""

        uuid, name, (s, r), info, live_xml, _ = await self.hv.call(read, timeout=15)
        cached = await self._cached(uuid)
        state, reason = st.map_state(s, r)
        vm = VmInfo(uuid=uuid, name=name, managed=cached.managed, spec=cached.spec, state=state, reason=reason,
                    state_time=self._state_times.get(uuid), cpu_time_ns=int(info[4]))
        if live_xml:
            vm.console = self._console_from_xml(live_xml, cached.spec)
            vm.qemu_pid = self._qemu_pid(name)
        holder = self.runner.locks.holder(f"vm/{uuid}")
        vm.active_operation_id = holder.id if holder else ""
        return vm

    async def list(self, *, states: Iterable[str] = (), include_unmanaged: bool = False, status_only: bool = False) -> list[VmInfo]:
        wanted = set(states)
        flags = libvirt.VIR_DOMAIN_STATS_STATE | libvirt.VIR_DOMAIN_STATS_CPU_TOTAL | libvirt.VIR_DOMAIN_STATS_BALLOON

        def read(conn: libvirt.virConnect) -> list[tuple[str, str, int, int, int, int, _Cached | None]]:
            out = []
            for dom, stats in conn.getAllDomainStats(flags, 0):
                uuid = dom.UUIDString()
                cached = self._cache.get(uuid)
                if cached is None:
                    cached = self._read_definition(dom)
                out.append((uuid, dom.name(), stats.get("state.state", 0), stats.get("state.reason", 0),
                            stats.get("cpu.time", 0), stats.get("balloon.rss", 0), cached))
            return out

        rows = await self.hv.call(read, timeout=30)
        vms: list[VmInfo] = []
        for uuid, name, s, r, cpu, rss, cached in rows:
            assert cached is not None
            self._cache[uuid] = cached
            if not cached.managed and not include_unmanaged:
                continue
            state, reason = st.map_state(s, r)
            if wanted and state not in wanted:
                continue
            holder = self.runner.locks.holder(f"vm/{uuid}")
            vms.append(VmInfo(uuid=uuid, name=name, managed=cached.managed, spec=None if status_only else cached.spec,
                              state=state, reason=reason, state_time=self._state_times.get(uuid), cpu_time_ns=int(cpu),
                              memory_rss_kib=int(rss), active_operation_id=holder.id if holder else ""))
        vms.sort(key=lambda v: v.name)
        return vms

    async def console(self, ref: str) -> ConsoleInfo:
        vm = await self.get(ref)
        if vm.state not in (st.RUNNING, st.PAUSED):
            raise FailedPrecondition(f"vm {vm.name!r} is {vm.state}; its console exists only while it runs", field="vm")
        return vm.console or ConsoleInfo()

    def _console_from_xml(self, xml: str, spec: VmSpec | None) -> ConsoleInfo:
        dom = dx.Domain.from_xml(xml)
        for g in (dom.devices.graphics if dom.devices else []):
            if g.type in ("vnc", "spice"):
                host = g.listen or (g.listens[0].address if g.listens else "") or self.render_ctx.console_listen
                return ConsoleInfo(type=g.type, host=host or "", port=g.port or 0, password=spec.console.password if spec else "")
        return ConsoleInfo(type="none")

    def _qemu_pid(self, name: str) -> str:
        for d in self.qemu_run_dirs():
            try:
                with open(os.path.join(d, f"{name}.pid")) as fh:
                    return fh.read().strip()
            except OSError:
                continue
        return ""

    def qemu_run_dirs(self) -> list[str]:
        uri = self.hv.uri
        if uri.startswith("qemu:///embed?root="):
            return [os.path.join(uri.split("root=", 1)[1].split("&", 1)[0], "run", "qemu")]
        return ["/run/libvirt/qemu", "/var/run/libvirt/qemu"]

    # -- operations ----------------------------------------------------------------------------------

    async def _submit(self, kind: str, uuid: str, work: Callable[[OperationContext], Awaitable[Any]], *, request_id: str,
                      fingerprint: str, lock_timeout: float, wait: float) -> OperationRecord:
        try:
            return await self.runner.submit(kind, uuid, work, request_id=request_id, fingerprint=fingerprint,
                                            lock_key=f"vm/{uuid}", lock_timeout=lock_timeout, wait=wait)
        except RequestIdConflict as exc:
            raise InvalidArgument("request_id", str(exc)) from None

    async def _result(self, uuid: str) -> Any:
        return self._to_result(await self.get(uuid))

    async def create(self, spec: VmSpec, *, start: bool = False, request_id: str = "", fingerprint: str = "",
                     lock_timeout: float = 0.0) -> OperationRecord:
        spec = spec.copy()
        validate(spec, self.validation_context())
        if not spec.uuid:
            # A retried request (same request_id) must name the same VM, so the runner sees the
            # same target and returns the first operation instead of creating a second VM.
            spec.uuid = str(uuidlib.uuid5(REQUEST_NS, request_id)) if request_id else new_uuid()
        spec.uuid = spec.uuid.lower()
        placer = self._placer()
        # Only a reservation this call makes is released on failure (a create naming an
        # existing VM's uuid must not free that VM's CPUs).
        reserved_here = placer is not None and placer.get(spec.uuid) is None
        bindings = await self._bindings(spec)
        self._fill_macs(spec)
        # The guest device names are decided now and kept in the spec: GetVm reports them, and
        # per-disk calls (detach, resize, I/O-error resume) name disks by target.
        for disk, target in zip(spec.disks, assign_disk_targets(spec, spec.os_family or "linux")):
            disk.target = target
        xml = self._render(spec, bindings)

        async def work(op: OperationContext) -> Any:
            await op.progress(10, "defining")

            def define(conn: libvirt.virConnect) -> None:
                for ref, field in ((spec.uuid, "spec.uuid"), (spec.name, "spec.name")):
                    try:
                        existing = self._lookup(conn, ref)
                    except NotFound:
                        continue
                    raise AlreadyExists(f"a VM with {field.split('.')[1]} {ref!r} already exists ({existing.name()})", field=field)
                try:
                    dom = conn.defineXML(xml)
                except libvirt.libvirtError as exc:
                    if exc.get_error_code() == libvirt.VIR_ERR_OPERATION_FAILED and "already exists" in str(exc):
                        raise AlreadyExists(str(exc), field="spec.name") from None
                    raise Internal(f"libvirt refused the domain definition: {exc}") from None
                if spec.autostart:
                    dom.setAutostart(1)

            self._prepare_dirs(spec.uuid)
            try:
                await self.hv.call(define, timeout=30)
            except Exception:
                if reserved_here:
                    await self._release_placement(spec.uuid)
                raise
            self._cache[spec.uuid] = _Cached(spec.name, True, spec)
            await self.events.publish("vm.defined", resource_kind="vm", resource_id=spec.uuid, resource_name=spec.name,
                                      message=f"{spec.name} defined", operation_id=op.id)
            if start:
                await op.progress(50, "starting")
                await self._start_domain(spec.uuid)
            return await self._result(spec.uuid)

        try:
            return await self._submit("vm.create", spec.uuid, work, request_id=request_id, fingerprint=fingerprint,
                                      lock_timeout=lock_timeout, wait=30.0 if start else QUICK_WAIT_S)
        except Exception:
            if reserved_here:
                await self._release_placement(spec.uuid)  # refused before it ran (busy, request id reuse)
            raise

    def _prepare_dirs(self, uuid: str) -> None:
        facts = self.hv.facts
        qemu = QemuUser(facts.qemu_uid, facts.qemu_gid) if facts is not None and facts.qemu_uid is not None else None
        self.run_dirs.prepare(uuid, qemu)
        os.makedirs(os.path.join(self.render_ctx.state_dir, "nvram"), mode=0o700, exist_ok=True)

    async def _start_domain(self, uuid: str) -> None:
        self._prepare_dirs(uuid)  # the run dir is volatile (tmpfs after a host reboot)

        def start(conn: libvirt.virConnect) -> None:
            dom = conn.lookupByUUIDString(uuid)
            if dom.isActive():
                return
            try:
                dom.create()
            except libvirt.libvirtError as exc:
                raise FailedPrecondition(f"QEMU did not start: {exc}") from None

        await self.hv.call(start, timeout=120)

    async def start_vm(self, ref: str, *, request_id: str = "", fingerprint: str = "", lock_timeout: float = 0.0) -> OperationRecord:
        uuid, _ = await self.lookup_uuid(ref)

        async def work(op: OperationContext) -> Any:
            await self._start_domain(uuid)
            return await self._result(uuid)

        return await self._submit("vm.start", uuid, work, request_id=request_id, fingerprint=fingerprint,
                                  lock_timeout=lock_timeout, wait=30.0)

    async def _state(self, uuid: str) -> str:
        s, r = await self.hv.call(lambda c: c.lookupByUUIDString(uuid).state(), timeout=10)
        return st.map_state(s, r)[0]

    async def _wait_state(self, uuid: str, want: set[str], timeout: float) -> bool:
        """Wait for libvirt to report one of ``want``; woken by events, re-checked every 2 s."""
        deadline = time.monotonic() + timeout
        changed = self.monitor.changed_event(uuid)
        while True:
            changed.clear()
            if await self._state(uuid) in want:
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            try:
                await asyncio.wait_for(changed.wait(), timeout=min(left, 2.0))
            except asyncio.TimeoutError:
                pass

    async def _destroy(self, uuid: str) -> None:
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
        uuid, name = await self.lookup_uuid(ref)
        timeout = timeout or DEFAULT_SHUTDOWN_TIMEOUT_S

        async def work(op: OperationContext) -> Any:
            if await self._state(uuid) in (st.STOPPED, st.CRASHED):
                return await self._result(uuid)
            if not hard:
                await op.progress(10, "acpi-shutdown")

                def acpi(conn: libvirt.virConnect) -> None:
                    dom = conn.lookupByUUIDString(uuid)
                    if dom.state()[0] == libvirt.VIR_DOMAIN_PAUSED:
                        dom.resume()  # a paused guest cannot see the power button
                    dom.shutdownFlags(libvirt.VIR_DOMAIN_SHUTDOWN_ACPI_POWER_BTN)

                await self.hv.call(acpi, timeout=30)
                if await self._wait_state(uuid, {st.STOPPED, st.CRASHED}, timeout):
                    return await self._result(uuid)
                if not force:
                    raise DeadlineExceeded(f"vm {name!r} did not shut down within {timeout:.0f}s; retry with force to power it off")
            await op.progress(80, "power-off")
            await self._destroy(uuid)
            return await self._result(uuid)

        return await self._submit("vm.shutdown", uuid, work, request_id=request_id, fingerprint=fingerprint,
                                  lock_timeout=lock_timeout, wait=2.0 if not hard else QUICK_WAIT_S)

    async def reboot(self, ref: str, *, hard: bool = False, request_id: str = "", fingerprint: str = "",
                     lock_timeout: float = 0.0) -> OperationRecord:
        uuid, name = await self.lookup_uuid(ref)

        async def work(op: OperationContext) -> Any:
            def do(conn: libvirt.virConnect) -> None:
                dom = conn.lookupByUUIDString(uuid)
                if not dom.isActive():
                    raise FailedPrecondition(f"vm {name!r} is not running", field="vm")
                if hard:
                    dom.reset(0)
                else:
                    # ACPI power button; libvirt restarts the guest once it powers off (fake reboot),
                    # so guests without a reboot handler still come back.
                    dom.reboot(libvirt.VIR_DOMAIN_REBOOT_ACPI_POWER_BTN)

            await self.hv.call(do, timeout=30)
            return await self._result(uuid)

        return await self._submit("vm.reboot", uuid, work, request_id=request_id, fingerprint=fingerprint,
                                  lock_timeout=lock_timeout, wait=QUICK_WAIT_S)

    async def pause(self, ref: str, *, request_id: str = "", fingerprint: str = "", lock_timeout: float = 0.0) -> OperationRecord:
        return await self._simple(ref, "vm.pause", lambda d: d.suspend() if d.state()[0] == libvirt.VIR_DOMAIN_RUNNING else None,
                                  request_id, fingerprint, lock_timeout, need_active=True)

    async def resume(self, ref: str, *, request_id: str = "", fingerprint: str = "", lock_timeout: float = 0.0) -> OperationRecord:
        return await self._simple(ref, "vm.resume", lambda d: d.resume() if d.state()[0] == libvirt.VIR_DOMAIN_PAUSED else None,
                                  request_id, fingerprint, lock_timeout, need_active=True)

    async def _simple(self, ref: str, kind: str, fn: Callable[[libvirt.virDomain], Any], request_id: str, fingerprint: str,
                      lock_timeout: float, *, need_active: bool) -> OperationRecord:
        uuid, name = await self.lookup_uuid(ref)

        async def work(op: OperationContext) -> Any:
            def do(conn: libvirt.virConnect) -> None:
                dom = conn.lookupByUUIDString(uuid)
                if need_active and not dom.isActive():
                    raise FailedPrecondition(f"vm {name!r} is not running", field="vm")
                fn(dom)

            await self.hv.call(do, timeout=30)
            return await self._result(uuid)

        return await self._submit(kind, uuid, work, request_id=request_id, fingerprint=fingerprint,
                                  lock_timeout=lock_timeout, wait=QUICK_WAIT_S)

    async def delete(self, ref: str, *, delete_disks: bool = False, force: bool = False, request_id: str = "",
                     fingerprint: str = "", lock_timeout: float = 0.0) -> OperationRecord:
        uuid, name = await self.lookup_uuid(ref)
        cached = await self._cached(uuid)
        deleter = getattr(self._disk_resolver(), "delete_volume", None)
        if delete_disks and deleter is None and cached.spec and any(d.volume for d in cached.spec.disks):
            raise FailedPrecondition("delete_disks needs the storage subsystem, which is not running on this agent; "
                                     "delete the VM keeping its disks", field="delete_disks")

        async def work(op: OperationContext) -> Any:
            from cna_agent.compute.disks import release_lun_disks

            if await self._state(uuid) not in (st.STOPPED, st.CRASHED):
                if not force:
                    raise FailedPrecondition(f"vm {name!r} is running; shut it down first or pass force", field="vm")
                await self._destroy(uuid)
            # Which SAN LUNs the VM holds, read from its definition under the VM lock (a disk
            # attached since the request was checked counts): after the undefine nothing says.
            current = (await self._cached(uuid)).spec
            lun_disks = [(i, d) for i, d in enumerate(current.disks if current else ()) if d.lun is not None]

            def undefine(conn: libvirt.virConnect) -> None:
                dom = conn.lookupByUUIDString(uuid)
                flags = (libvirt.VIR_DOMAIN_UNDEFINE_NVRAM | libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
                         | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA | libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA)
                dom.undefineFlags(flags)

            await self.hv.call(undefine, timeout=30)
            self._cache.pop(uuid, None)
            self.run_dirs.remove(uuid)
            if delete_disks and deleter is not None and cached.spec:
                for i, disk in enumerate(cached.spec.disks):
                    if disk.volume and not disk.shareable and disk.device != "cdrom":
                        await deleter(disk.volume, field=f"spec.disks[{i}].volume")
            await self._release_placement(uuid)
            await self.events.publish("vm.deleted", resource_kind="vm", resource_id=uuid, resource_name=name,
                                      message=f"{name} deleted", attributes={"delete_disks": str(delete_disks).lower()},
                                      operation_id=op.id)
            if lun_disks:
                # Kernel iSCSI/FC LUNs leave the host unless another VM uses them; never fails the delete.
                await op.progress(90, "releasing SAN LUNs on the host")
                await release_lun_disks(self, uuid, lun_disks)
            return None

        return await self._submit("vm.delete", uuid, work, request_id=request_id, fingerprint=fingerprint,
                                  lock_timeout=lock_timeout, wait=QUICK_WAIT_S)

    # -- disks on a defined VM (StorageService's AttachDisk & co.; see compute/disks.py) ---------

    async def attach_disk(self, ref: str, disk: Any, **kw: Any) -> OperationRecord:
        return await self.disks.attach(ref, disk, **kw)

    async def detach_disk(self, ref: str, target: str, **kw: Any) -> OperationRecord:
        return await self.disks.detach(ref, target, **kw)

    async def resize_disk(self, ref: str, target: str, new_size_bytes: int, **kw: Any) -> OperationRecord:
        return await self.disks.resize(ref, target, new_size_bytes, **kw)

    async def set_disk_qos(self, ref: str, target: str, qos: Any, **kw: Any) -> OperationRecord:
        return await self.disks.set_qos(ref, target, qos, **kw)

    async def update(self, ref: str, new: VmSpec, mask: Sequence[str], *, request_id: str = "", fingerprint: str = "",
                     lock_timeout: float = 0.0) -> OperationRecord:
        uuid, name = await self.lookup_uuid(ref)
        if not mask:
            raise InvalidArgument("update_mask", "name the fields to change, e.g. vcpus, memory_mib, cpu_qos")
        for path in mask:
            if path not in UPDATABLE:
                raise InvalidArgument("update_mask", f"{path!r} cannot be updated (updatable: {', '.join(sorted(UPDATABLE))})")
        cached = await self._cached(uuid)
        assert cached.spec is not None
        old = cached.spec
        merged = old.copy()
        for path in mask:
            setattr(merged, path, getattr(new.copy(), path))
        validate(merged, self.validation_context())
        running = await self._state(uuid) not in (st.STOPPED, st.CRASHED)
        if running:
            offline = [p for p in mask if p not in LIVE_UPDATABLE]
            if offline:
                raise FailedPrecondition(f"{', '.join(offline)} can only change while the VM is stopped", field="update_mask")
            if merged.vcpus > merged.effective_max_vcpus or merged.vcpus != old.vcpus and merged.vcpus > old.effective_max_vcpus:
                raise FailedPrecondition(f"vcpus {merged.vcpus} exceeds max_vcpus {old.effective_max_vcpus}; raise it while stopped", field="spec.vcpus")
            if merged.memory_mib > old.memory_mib and not old.max_memory_mib:
                raise FailedPrecondition("memory can only grow on a running VM defined with max_memory_mib (DIMM hot-plug)", field="spec.memory_mib")
            if merged.memory_mib > (old.max_memory_mib or old.memory_mib):
                raise FailedPrecondition(f"memory_mib exceeds max_memory_mib {old.max_memory_mib}", field="spec.memory_mib")
        if not running:
            external = [x.name for x in await self.list_snapshots(uuid) if x.kind == "external"]
            if external:
                # Re-rendering would point the disks back at their base images and drop the overlays.
                raise FailedPrecondition(f"vm has external snapshots ({', '.join(external)}); delete them before a stopped update",
                                         field="vm")
        bindings = None if running else await self._bindings(merged)

        async def work(op: OperationContext) -> Any:
            if bindings is not None:
                xml = self._render(merged, bindings)
                await self.hv.call(lambda c: c.defineXML(xml), timeout=30)
            else:
                await self._live_update(uuid, old, merged, mask)
            self._cache[uuid] = _Cached(merged.name, True, merged)
            return await self._result(uuid)

        return await self._submit("vm.update", uuid, work, request_id=request_id, fingerprint=fingerprint,
                                  lock_timeout=lock_timeout, wait=QUICK_WAIT_S)

    async def _live_update(self, uuid: str, old: VmSpec, new: VmSpec, mask: Sequence[str]) -> None:
        live = libvirt.VIR_DOMAIN_AFFECT_LIVE | libvirt.VIR_DOMAIN_AFFECT_CONFIG
        ctx = self.render_ctx

        def apply(conn: libvirt.virConnect) -> None:
            dom = conn.lookupByUUIDString(uuid)
            try:
                if "vcpus" in mask and new.vcpus != old.vcpus:
                    dom.setVcpusFlags(new.vcpus, live)
                if "memory_mib" in mask and new.memory_mib != old.memory_mib:
                    if new.memory_mib > old.memory_mib:
                        size = (new.memory_mib - old.memory_mib) * 1024
                        dimm = dx.MemoryDevice(model="dimm", size_kib=size, node=0).to_xml(pretty=False)
                        dom.attachDeviceFlags(dimm, live)
                    else:
                        dom.setMemoryFlags(new.memory_mib * 1024, live)
                if "cpu_qos" in mask:
                    params: dict[str, int] = {"cpu_shares": new.cpu_qos.shares or 1024}
                    if new.cpu_qos.limit_mhz:
                        params["global_period"] = 100_000
                        params["global_quota"] = max(1000, new.cpu_qos.limit_mhz * 100_000 // max(1, ctx.host_cpu_mhz))
                    else:
                        params["global_quota"] = -1
                    dom.setSchedulerParametersFlags(params, live)
                if "memory_qos" in mask:
                    limit = new.memory_qos.limit_mib * 1024 if new.memory_qos.limit_mib else libvirt.VIR_DOMAIN_MEMORY_PARAM_UNLIMITED
                    dom.setMemoryParameters({"hard_limit": limit}, live)
                if "autostart" in mask:
                    dom.setAutostart(1 if new.autostart else 0)
                body = dx.metadata_for_set(new.to_json(), agent_version=__version__)
                dom.setMetadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, body, "cna", dx.CNA_NS, live)
            except libvirt.libvirtError as exc:
                raise FailedPrecondition(f"live update failed (the guest may not support hot-plug): {exc}") from None

        await self.hv.call(apply, timeout=60)

    # -- recovery ------------------------------------------------------------------------------------

    async def recover_create(self, record: OperationRecord) -> Any:
        """A vm.create cut short by an agent crash succeeded iff the domain exists now."""
        from cna_agent.state.journal import OperationError
        from cna_agent.errors import CODES

        try:
            await self.hv.call(lambda c: c.lookupByUUIDString(record.target), timeout=10)
            return None
        except libvirt.libvirtError:
            return OperationError(CODES["ABORTED"], "the agent stopped before the VM was defined; nothing was created")

    async def _recover_by_state(self, record: OperationRecord, done: Callable[[bool, bool], bool], what: str) -> Any:
        """Decide a cut-short operation from libvirt's state now (exists, active) instead of redoing it."""
        from cna_agent.errors import CODES
        from cna_agent.state.journal import OperationError

        def read(conn: libvirt.virConnect) -> tuple[bool, bool]:
            try:
                return True, bool(conn.lookupByUUIDString(record.target).isActive())
            except libvirt.libvirtError as exc:
                if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                    return False, False
                raise

        exists, active = await self.hv.call(read, timeout=10)
        if done(exists, active):
            return None
        return OperationError(CODES["ABORTED"], f"the agent stopped before {what}; libvirt shows it did not happen (nothing was redone)")

    async def recover_start(self, record: OperationRecord) -> Any:
        return await self._recover_by_state(record, lambda exists, active: exists and active, "the VM was started")

    async def recover_shutdown(self, record: OperationRecord) -> Any:
        return await self._recover_by_state(record, lambda exists, active: exists and not active, "the VM was shut down")

    async def recover_delete(self, record: OperationRecord) -> Any:
        return await self._recover_by_state(record, lambda exists, active: not exists, "the VM was deleted")
