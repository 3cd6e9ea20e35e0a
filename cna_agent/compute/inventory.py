"""The host's VMs as compute knows them: lookup, listing, state, and the views other
subsystems read (which disks use what, which NICs exist, where QEMU runs).

* The VM spec lives in the domain's ``<metadata>`` (domxml.CNA_NS); it is read once per
  definition and cached, invalidated by libvirt's DEFINED/UNDEFINED events (events.py) and
  by every operation that changes a definition (``forget``/``remember``).
* Domains without our metadata are reported as unmanaged on request and never touched.
* Storage, network and placement never read libvirt themselves to learn about VMs: they get
  this inventory as their VmDisks / VmNics / VmLocator (contracts.py), so compute stays the one
  owner of VMs and their devices.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable
from xml.etree import ElementTree as ET

import libvirt

from cna_agent.compute import domxml as dx
from cna_agent.compute import qmp
from cna_agent.compute import state as st
from cna_agent.compute.marks import DefinitionMetadata
from cna_agent.compute.vm_counters import read_stat
from cna_agent.compute.hibernate_store import HibernateMark
from cna_agent.compute.customization_mark import CustomizationMark
from cna_agent.compute.customization_mark import read_mark as read_customization_mark
from cna_agent.compute.pending_changes import PendingMark, pending_fields, qemu_identity
from cna_agent.compute.pending_changes import read_mark as read_pending_mark
from cna_agent.compute.template_mark import TemplateMark, template_message
from cna_agent.compute.template_mark import read_mark as read_template_mark
from cna_agent.compute.hibernate_store import read_mark as read_hibernate_mark
from cna_agent.compute.recycle import RecycleMark, in_bin_message, read_mark
from cna_agent.compute.spec import UUID_RE, VmSpec
from cna_agent.compute.spec_validation import validate_name
from cna_agent.contracts import DiskUse, VmNic
from cna_agent.errors import FailedPrecondition, InvalidArgument, NotFound
from cna_agent.hypervisor import Hypervisor, embedded_root
from cna_agent.operations import ResourceLocks

log = logging.getLogger(__name__)


@dataclass
class ConsoleInfo:
    type: str = "none"
    host: str = ""
    port: int = 0
    #: Only a console ticket carries one (console_tickets.py), never the VM's listing.
    password: str = ""
    unix_socket: str = ""
    #: When the ticket's password stops being accepted (None: no ticket).
    password_expires: float | None = None


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
    #: What this host leaves out of the spec (render.host_limitations), one sentence each.
    host_limitations: tuple[str, ...] = ()
    #: When the VM's hold in the recycle bin ends (None: not in the bin).
    recycle_expires: float | None = None
    #: Hibernated (state HIBERNATED): where its saved state is, and since when.
    hibernated: HibernateMark | None = None
    #: The guest agent as seen from the host (guest_agent.py's statuses) and its version; GetVm only.
    tools_status: str = ""
    tools_version: str = ""
    #: First-boot customization (first_boot.py): pending, done or failed; None: none asked.
    customization: CustomizationMark | None = None
    #: Spec fields UpdateVm wrote for the next start that the running QEMU does not have yet.
    pending_changes: tuple[str, ...] = ()
    #: A template (template_mark.py): not started or changed; DeployVm's source.
    template: bool = False


@dataclass
class VmDefinition:
    """What a domain's persistent definition says about it (cached per uuid)."""

    name: str
    managed: bool
    spec: VmSpec | None
    #: In the recycle bin (recycle.py): until when, and how it is then deleted.
    recycled: RecycleMark | None = None
    #: Hibernated (hibernate.py): its RAM is saved on this datastore (shown as HIBERNATED
    #: while the domain is shut off).
    hibernated: HibernateMark | None = None
    customization: CustomizationMark | None = None
    #: Changes waiting for the next start (pending_changes.py), valid for one QEMU process.
    pending: PendingMark | None = None
    template: TemplateMark | None = None
    #: What this host leaves out of the spec, worked out on first use (it depends on the spec
    #: and the host only, and a listing of 1,000 VMs spent 5 ms a call working it out again).
    limitations: tuple[str, ...] | None = field(default=None, compare=False)


def presence(conn: libvirt.virConnect, uuid: str) -> tuple[bool, bool]:
    """(defined, running) of domain ``uuid`` as libvirt says now (runs in the libvirt pool):
    what recovery decides from."""
    try:
        return True, bool(conn.lookupByUUIDString(uuid).isActive())
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
            return False, False
        raise


#: How long a domain's MACs are taken as read (all_macs).
MAC_TTL_S = 60.0


def vm_lock(uuid: str) -> str:
    """The resource-lock key that serialises operations on one VM."""
    return f"vm/{uuid}"


class VmInventory:
    def __init__(self, hypervisor: Hypervisor, locks: ResourceLocks, *, console_listen: str = "127.0.0.1",
                 limitations: Callable[[VmSpec], tuple[str, ...]] | None = None) -> None:
        """``limitations``: what this host leaves out of a spec (the domain builder's answer)."""
        self.hv = hypervisor
        self._limitations = limitations
        self.locks = locks
        self.console_listen = console_listen
        self._cache: dict[str, VmDefinition] = {}
        #: Bumped by every change to the cache: a read that began before a change must not
        #: write back what it found (it may be the definition from before the change: seen,
        #: a VM just moved to the recycle bin listed again by a listing that raced the move).
        self._epoch = 0
        self._state_times: dict[str, float] = {}
        #: (uuid, spec, live domain) -> (tools status, version): set by the wiring to the guest
        #: agent part's answer, which needs no call of its own (GetVm has the live XML already).
        self.tools_view: Callable[[str, VmSpec | None, dx.Domain | None], tuple[str, str]] | None = None
        #: Each domain's MACs (live and persistent definitions) as last read, with when; dropped
        #: with its definition (forget, remember, vanished) and re-read after MAC_TTL_S, so a
        #: NIC hot-plugged behind the agent's back is seen within that time.
        self._macs: dict[str, tuple[float, frozenset[str]]] = {}
        #: Called with a VM's uuid whenever its definition changed or went (what else keeps
        #: facts read from it, e.g. the stats collector's device layout, drops them).
        self.definition_listeners: list[Callable[[str], None]] = []
        self._run_dirs: list[str] | None = None
        #: A shut-off domain's NICs, with the cached definition they were parsed from (the
        #: same object still cached means the same definition: vm_nics).
        self._stopped_nics: dict[str, tuple[VmDefinition, tuple[VmNic, ...]]] = {}

    # -- cache ---------------------------------------------------------------------------------

    def _changed(self, uuid: str) -> None:
        for listener in self.definition_listeners:
            listener(uuid)

    def forget(self, uuid: str) -> None:
        """The definition changed (or went): read it again next time."""
        self._changed(uuid)
        self._epoch += 1
        self._cache.pop(uuid, None)
        self._macs.pop(uuid, None)

    def remember(self, uuid: str, spec: VmSpec) -> None:
        """An operation just wrote this spec into the definition."""
        self._changed(uuid)
        self._epoch += 1
        self._macs.pop(uuid, None)
        old = self._cache.get(uuid)
        self._cache[uuid] = VmDefinition(spec.name, True, spec, old.recycled if old else None,
                                         old.hibernated if old else None, old.customization if old else None,
                                         old.pending if old else None, old.template if old else None)

    def _keep(self, uuid: str, found: VmDefinition, since: int) -> None:
        """Cache what a read begun at epoch ``since`` found, unless the cache changed meanwhile."""
        if self._epoch == since:
            self._cache[uuid] = found

    def note_state(self, uuid: str, when: float) -> None:
        self._state_times[uuid] = when

    def vanished(self, uuid: str) -> None:
        """The domain is gone from libvirt: drop what is kept for it (a cached definition
        written back by a read that raced the delete included)."""
        self._changed(uuid)
        self._epoch += 1
        self._cache.pop(uuid, None)
        self._state_times.pop(uuid, None)
        self._macs.pop(uuid, None)

    def _limits(self, d: VmDefinition) -> tuple[str, ...]:
        if d.spec is None or self._limitations is None:
            return ()
        if d.limitations is None:
            d.limitations = self._limitations(d.spec)
        return d.limitations

    def is_managed_cached(self, uuid: str) -> bool:
        c = self._cache.get(uuid)
        return c is not None and c.managed

    # -- lookups -------------------------------------------------------------------------------

    @staticmethod
    def lookup(conn: libvirt.virConnect, ref: str) -> libvirt.virDomain:
        try:
            if UUID_RE.match(ref):
                return conn.lookupByUUIDString(ref)
            return conn.lookupByName(ref)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                raise NotFound(f"vm {ref!r} not found", field="vm") from None
            raise

    @staticmethod
    def check_ref(ref: str) -> None:
        if not ref:
            raise InvalidArgument("vm", "must name a VM (UUID or name)")
        if "\x00" in ref:
            raise InvalidArgument("vm", "must not contain NUL")
        if not UUID_RE.match(ref):
            validate_name(ref, "vm")

    async def lookup_uuid(self, ref: str, *, require_managed: bool = True, allow_recycled: bool = False,
                          allow_hibernated: bool = False, allow_template: bool = False) -> tuple[str, str]:
        """(uuid, name) of the VM named by UUID or name; NotFound / FailedPrecondition. A VM in
        the recycle bin is refused unless ``allow_recycled`` (RestoreVm, DeleteVm), a hibernated
        one unless ``allow_hibernated`` (StartVm, UnhibernateVm, DeleteVm): any other change
        would no longer fit the saved guest; a template unless ``allow_template`` (DeleteVm,
        DeployVm): it is not started or changed."""
        self.check_ref(ref)
        uuid, name = await self.hv.call(lambda c: (lambda d: (d.UUIDString(), d.name()))(self.lookup(c, ref)), timeout=10)
        if require_managed or not allow_recycled or not allow_hibernated or not allow_template:
            d = await self.definition(uuid)
            if require_managed and not d.managed:
                raise FailedPrecondition(f"vm {name!r} was not created by cna-agent; the agent leaves it alone", field="vm")
            if d.recycled is not None and not allow_recycled:
                raise FailedPrecondition(in_bin_message(name, d.recycled), field="vm")
            if d.hibernated is not None and not allow_hibernated:
                raise FailedPrecondition(hibernated_message(name, d.hibernated), field="vm")
            if d.template is not None and not allow_template:
                raise FailedPrecondition(template_message(name), field="vm")
        return uuid, name

    async def definition(self, uuid: str) -> VmDefinition:
        c = self._cache.get(uuid)
        if c is None:
            since = self._epoch
            c = await self.hv.call(lambda conn: self.read_definition(conn.lookupByUUIDString(uuid)), timeout=15)
            self._keep(uuid, c, since)
        return c

    async def spec(self, uuid: str) -> VmSpec:
        """The managed VM's spec (FailedPrecondition for a domain the agent did not define)."""
        d = await self.definition(uuid)
        if d.spec is None:
            raise FailedPrecondition("the VM has no agent spec (not managed by this agent)", field="vm")
        return d.spec

    @staticmethod
    def read_definition(dom: libvirt.virDomain) -> VmDefinition:
        """The spec and marks, from one read of the persistent definition (marks.DefinitionMetadata)."""
        try:
            defn = DefinitionMetadata.read(dom)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                raise  # gone meanwhile: the caller skips it (a listing) or reports it
            return VmDefinition(dom.name(), False, None)
        except ET.ParseError:
            return VmDefinition(dom.name(), False, None)
        meta = defn.element(dx.CNA_NS)
        if meta is None:
            return VmDefinition(defn.name(), False, None)
        try:
            text = dx.spec_json_from_metadata_xml(meta)
            spec = VmSpec.from_json(text) if text else None
        except (ET.ParseError, ValueError):
            spec = None
        if spec is None:
            return VmDefinition(defn.name(), False, None)
        return VmDefinition(defn.name(), True, spec, read_mark(defn), read_hibernate_mark(defn), read_customization_mark(defn),
                            read_pending_mark(defn), read_template_mark(defn))

    # -- reads ---------------------------------------------------------------------------------

    async def state(self, uuid: str) -> str:
        s, r = await self.hv.call(lambda c: c.lookupByUUIDString(uuid).state(), timeout=10)
        return st.map_state(s, r)[0]

    async def status(self, uuid: str) -> VmInfo:
        """Name, state and whether the agent manages it, without the spec or the live XML:
        what one VM's reconcile needs, on each of its events (get() also reads and parses the
        live definition: at 1,000 events a second, a parse per event on the event loop)."""
        def read(conn: libvirt.virConnect) -> tuple[str, tuple[int, int]]:
            dom = self.lookup(conn, uuid)
            return dom.name(), tuple(dom.state())  # type: ignore[return-value]

        name, (s, r) = await self.hv.call(read, timeout=10)
        cached = await self.definition(uuid)
        state, reason = shown_state(s, r, cached)
        return VmInfo(uuid=uuid, name=name, managed=cached.managed, spec=None, state=state, reason=reason)

    async def running(self, uuid: str) -> bool:
        return await self.state(uuid) not in (st.STOPPED, st.CRASHED)

    async def get(self, ref: str) -> VmInfo:
        self.check_ref(ref)

        def read(conn: libvirt.virConnect) -> tuple[str, str, tuple[int, int], list[int], str]:
            dom = self.lookup(conn, ref)
            s = dom.state()
            info = dom.info()
            xml = dom.XMLDesc(0) if dom.isActive() else ""
            return dom.UUIDString(), dom.name(), (s[0], s[1]), info, xml

        uuid, name, (s, r), info, live_xml = await self.hv.call(read, timeout=15)
        cached = await self.definition(uuid)
        state, reason = shown_state(s, r, cached)
        vm = VmInfo(uuid=uuid, name=name, managed=cached.managed, spec=cached.spec, state=state, reason=reason,
                    state_time=self._state_times.get(uuid), cpu_time_ns=int(info[4]),
                    host_limitations=self._limits(cached),
                    recycle_expires=cached.recycled.expires_at if cached.recycled else None,
                    hibernated=cached.hibernated if state == st.HIBERNATED else None,
                    customization=cached.customization, template=cached.template is not None)
        live = dx.Domain.from_xml(live_xml) if live_xml else None
        if live is not None:
            vm.console = self._console_from(live)
            vm.qemu_pid = self._qemu_pid(name)
            if cached.pending is not None:
                vm.pending_changes = pending_fields(cached.pending, qemu_identity(vm.qemu_pid))
        if self.tools_view is not None and cached.managed:
            vm.tools_status, vm.tools_version = self.tools_view(uuid, cached.spec, live)
        holder = self.locks.holder(vm_lock(uuid))
        vm.active_operation_id = holder.id if holder else ""
        return vm

    async def list(self, *, states: Iterable[str] = (), include_unmanaged: bool = False, status_only: bool = False,
                   recycled: bool | None = False) -> list[VmInfo]:
        """The host's VMs; ``recycled``: False leaves out those in the recycle bin (what ListVms
        shows), True lists only them, None lists both (disk and MAC users: a VM in the bin
        still holds its disks and MACs)."""
        wanted = set(states)
        # STATE only: every other group but interface needs each domain's QEMU monitor, and
        # one QEMU stuck on dead storage then held every listing's libvirt thread until the
        # pool ran dry (benchmarks.isolation: ListVms p99 30 s while one VM hung). Not
        # CPU_TOTAL either: it reads each running domain's cgroup files, 0.7 ms a domain.
        # CPU time and RSS come from one read of QEMU's /proc/<pid>/stat, which is where
        # virDomainGetInfo's cpuTime and libvirt's balloon.rss come from too (and against
        # a libvirtd, a GetInfo per VM was a round trip per VM).
        flags = libvirt.VIR_DOMAIN_STATS_STATE

        def read(conn: libvirt.virConnect) -> list[tuple[str, str, int, int, int, int, VmDefinition]]:
            out = []
            for dom, stats in conn.getAllDomainStats(flags, 0):
                uuid = dom.UUIDString()
                try:
                    cached = self._cache.get(uuid) or self.read_definition(dom)
                except libvirt.libvirtError:
                    continue  # undefined since the listing began (read_definition raised NO_DOMAIN)
                s = stats.get("state.state", 0)
                name = dom.name()
                cpu = rss = 0
                if s not in (libvirt.VIR_DOMAIN_SHUTOFF, libvirt.VIR_DOMAIN_CRASHED, libvirt.VIR_DOMAIN_NOSTATE):
                    cpu, rss = self._qemu_usage(name)
                out.append((uuid, name, s, stats.get("state.reason", 0), cpu, rss, cached))
            return out

        vms: list[VmInfo] = []
        since = self._epoch
        for uuid, name, s, r, cpu, rss, cached in await self.hv.call(read, timeout=30):
            self._keep(uuid, cached, since)
            if not cached.managed and not include_unmanaged:
                continue
            if recycled is not None and (cached.recycled is not None) != recycled:
                continue
            state, reason = shown_state(s, r, cached)
            if wanted and state not in wanted:
                continue
            holder = self.locks.holder(vm_lock(uuid))
            vms.append(VmInfo(uuid=uuid, name=name, managed=cached.managed, spec=None if status_only else cached.spec,
                              state=state, reason=reason, state_time=self._state_times.get(uuid), cpu_time_ns=int(cpu),
                              memory_rss_kib=int(rss), active_operation_id=holder.id if holder else "",
                              host_limitations=() if status_only else self._limits(cached),
                              recycle_expires=cached.recycled.expires_at if cached.recycled else None,
                              hibernated=cached.hibernated if state == st.HIBERNATED else None,
                              customization=cached.customization, template=cached.template is not None))
        vms.sort(key=lambda v: v.name)
        return vms

    def _console_from(self, dom: dx.Domain) -> ConsoleInfo:
        for g in (dom.devices.graphics if dom.devices else []):
            if g.type in ("vnc", "spice"):
                host = g.listen or (g.listens[0].address if g.listens else "") or self.console_listen
                return ConsoleInfo(type=g.type, host=host or "", port=g.port or 0)
        return ConsoleInfo(type="none")

    async def pending_changes(self, uuid: str, name: str) -> tuple[str, ...]:
        """The fields UpdateVm left for the VM's next start that its running QEMU lacks."""
        mark = (await self.definition(uuid)).pending
        return pending_fields(mark, self.qemu_identity(name)) if mark is not None else ()

    def qemu_identity(self, name: str) -> str:
        """pid:starttime of the VM's running QEMU ("" when it runs none)."""
        return qemu_identity(self._qemu_pid(name))

    def _qemu_pid(self, name: str) -> str:
        for d in self.qemu_run_dirs():
            try:
                with open(os.path.join(d, f"{name}.pid")) as fh:
                    return fh.read().strip()
            except OSError:
                continue
        return ""

    def _qemu_usage(self, name: str) -> tuple[int, int]:
        """(CPU ns, resident KiB) of the running guest's QEMU from /proc (0, 0 when it cannot
        be read: it stopped meanwhile)."""
        pid = self._qemu_pid(name)
        if not pid.isdigit():
            return 0, 0
        try:
            _, user, system, rss = read_stat("/proc", int(pid))
        except (OSError, ValueError, IndexError):
            return 0, 0
        return user + system, rss

    def qemu_run_dirs(self) -> list[str]:
        """Where libvirt keeps its QEMU pid files for this connection (fixed by its URI)."""
        if self._run_dirs is None:
            root = embedded_root(self.hv.uri)
            self._run_dirs = [os.path.join(root, "run", "qemu")] if root is not None else ["/run/libvirt/qemu", "/var/run/libvirt/qemu"]
        return self._run_dirs

    async def qmp_socket(self, uuid: str) -> tuple[str, str]:
        """(side-channel socket path from the live domain's <qemu:commandline>, name)."""

        def read(conn: libvirt.virConnect) -> tuple[str, str]:
            dom = conn.lookupByUUIDString(uuid)
            return dom.XMLDesc(0), dom.name()

        xml, name = await self.hv.call(read, timeout=15)
        return qmp.path_from_args(dx.Domain.from_xml(xml).qemu_args), name

    async def console(self, ref: str) -> ConsoleInfo:
        vm = await self.get(ref)
        if vm.state not in (st.RUNNING, st.PAUSED):
            raise FailedPrecondition(f"vm {vm.name!r} is {vm.state}; its console exists only while it runs", field="vm")
        return vm.console or ConsoleInfo()

    # -- views for storage, network and placement (contracts.VmDisks / VmNics / VmLocator) ---------

    async def disk_users(self) -> list[DiskUse]:
        out: list[DiskUse] = []
        for vm in await self.list(recycled=None):  # a VM in the recycle bin still holds its disks
            for disk in vm.spec.disks if vm.spec else ():
                if disk.volume:
                    out.append(DiskUse(vm.uuid, volume=disk.volume))
                elif disk.lun is not None:
                    out.append(DiskUse(vm.uuid, lun_datastore=disk.lun.datastore, lun_id=disk.lun.lun_id))
        return out

    async def vm_nics(self, vm_uuid: str = "") -> list[VmNic]:
        """Every NIC of one domain or all, running ones from the live XML (tap names, what
        QEMU has now). A shut-off domain's NICs are its definition's, so they are parsed once
        per cached definition: the network drift loop asks every 60 s, and parsing 900 stopped
        domains' XML was most of its 0.6 s of CPU at 1,000 VMs (benchmarks.scale, py-spy)."""
        stopped = self._stopped_nics

        def read(conn: libvirt.virConnect) -> list[tuple[str, str, bool, str, VmDefinition]]:
            doms = [conn.lookupByUUIDString(vm_uuid)] if vm_uuid else conn.listAllDomains()
            out = []
            for dom in doms:
                try:
                    uuid = dom.UUIDString()
                    cached = self._cache.get(uuid) or self.read_definition(dom)
                    active = bool(dom.isActive())
                    known = None if active else stopped.get(uuid)
                    xml = "" if known is not None and known[0] is cached else dom.XMLDesc(0)
                    out.append((uuid, dom.name(), active, xml, cached))
                except libvirt.libvirtError:  # vanished while listing
                    continue
            return out

        nics: list[VmNic] = []
        since = self._epoch
        found = await self.hv.call(read, timeout=30)
        for uuid, name, active, xml, cached in found:
            self._keep(uuid, cached, since)
            if not xml:
                nics.extend(stopped[uuid][1])
                continue
            groups = {n.mac.lower(): n.port_group for n in cached.spec.nics} if cached.spec else {}
            spec_nics = {n.mac.lower(): n for n in cached.spec.nics} if cached.spec else {}
            these = interfaces_of(uuid, name, active, xml, groups, spec_nics)
            if active:
                stopped.pop(uuid, None)
            else:
                stopped[uuid] = (cached, tuple(these))
            nics.extend(these)
        if not vm_uuid:  # a full listing: forget domains that are gone
            present = {f[0] for f in found}
            for uuid in [u for u in stopped if u not in present]:
                del stopped[uuid]
        return nics

    async def all_macs(self) -> set[str]:
        """Every MAC of every domain on this host, live and persistent definitions.

        Read per domain only when not known (or older than MAC_TTL_S): with 1,000 domains,
        reading and parsing every definition for each new NIC made a create cost 200 ms
        (benchmarks.scale)."""
        now = time.monotonic()
        fresh = {u for u, (when, _) in self._macs.items() if now - when < MAC_TTL_S}

        def read(conn: libvirt.virConnect) -> tuple[list[str], dict[str, frozenset[str]]]:
            present: list[str] = []
            found: dict[str, frozenset[str]] = {}
            for dom in conn.listAllDomains():
                uuid = dom.UUIDString()
                present.append(uuid)
                if uuid in fresh:
                    continue
                try:
                    docs = [dom.XMLDesc(0)]
                    if dom.isPersistent() and dom.isActive():
                        docs.append(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
                except libvirt.libvirtError:
                    continue
                macs: set[str] = set()
                for doc in docs:
                    d = dx.Domain.from_xml(doc)
                    macs |= {i.mac.lower() for i in (d.devices.interfaces if d.devices else []) if i.mac}
                found[uuid] = frozenset(macs)
            return present, found

        since = self._epoch
        present, found = await self.hv.call(read, timeout=30)
        if self._epoch == since:  # a definition changed meanwhile: use what was read, keep nothing
            self._macs.update((u, (now, m)) for u, m in found.items())
        out: set[str] = set()
        for uuid in present:
            macs = found.get(uuid)
            if macs is None:
                entry = self._macs.get(uuid)
                macs = entry[1] if entry else frozenset()
            out |= macs
        return out

    async def locate(self, vm_uuid: str) -> tuple[str, str, int]:
        info = await self.get(vm_uuid)
        pid = int(info.qemu_pid) if str(info.qemu_pid).isdigit() else 0
        return info.name, info.state, pid


def shown_state(state: int, reason: int, definition: VmDefinition) -> tuple[str, str]:
    """The state the API shows: libvirt's, except a shut-off domain with a hibernate mark."""
    shown = st.map_state(state, reason)
    if definition.hibernated is not None and state == libvirt.VIR_DOMAIN_SHUTOFF:
        return st.HIBERNATED, "hibernated"
    return shown


def hibernated_message(name: str, mark: HibernateMark) -> str:
    since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(mark.saved_at))
    return (f"vm {name!r} is hibernated (its RAM saved on datastore {mark.datastore!r} since {since}); StartVm or "
            "UnhibernateVm resumes it, DeleteVm deletes it and its saved state")


def interfaces_of(uuid: str, name: str, active: bool, xml: str, port_groups: dict[str, str],
                  spec_nics: dict[str, Any] | None = None) -> list[VmNic]:
    """The NICs in one domain document (typed model), with the spec's port group per MAC, and
    from the spec what network enforces itself (addresses, the NIC's own outbound limit)."""
    dom = dx.Domain.from_xml(xml)
    out = []
    for i in dom.devices.interfaces if dom.devices else []:
        mac = (i.mac or "").lower()
        tags = tuple(t.id for t in i.vlan_tags if t.id is not None)
        out.append(VmNic(
            vm_uuid=uuid, vm_name=name, mac=mac, active=active, type=i.type or "", bridge=i.source_bridge or "",
            device=i.target_dev or "", port_group=port_groups.get(mac, ""), virtualport=i.virtualport_type or "",
            interface_id=i.interface_id or "", vlan=None if i.vlan_trunk or not tags else tags[0],
            trunk=tags if i.vlan_trunk else (), link_up=(i.link_state or "up") != "down",
            inbound_kbps=(i.inbound.average or 0) * 8 if i.inbound else 0,
            outbound_kbps=(i.outbound.average or 0) * 8 if i.outbound else _spec_outbound(spec_nics, mac),
            ip_addresses=tuple(getattr((spec_nics or {}).get(mac), "ip_addresses", ()) or ()),
        ))
    return out


def _spec_outbound(spec_nics: dict[str, Any] | None, mac: str) -> int:
    nic = (spec_nics or {}).get(mac)
    bw = getattr(nic, "outbound", None)
    return int(bw.average_kbps) if bw is not None and bw.average_kbps else 0
