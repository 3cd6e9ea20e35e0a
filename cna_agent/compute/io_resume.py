"""Resume VMs that QEMU paused on an I/O error once their storage answers again.

Why: every agent-built disk has ``error_policy=stop`` (render.py), so when a datastore or LUN
fails QEMU pauses the guest instead of handing it EIO, and the failed requests are retried when
the guest continues: nothing is lost. Without someone resuming it the VM stays paused forever;
oVirt's VDSM learned to resume such VMs itself when their storage domain comes back
("resume_behavior = auto_resume"). This module does the same, level-triggered like KubeVirt's
virt-handler: every ``[compute] io_error_check_interval_s`` it lists the VMs paused with reason
``ioerror``, asks libvirt which disks failed (``virDomainGetDiskErrors``) and checks each of those
disks' storage through the same resolver that bound it at create time (datastore health, file
present and readable, LUN present with a capacity). Only when every failed disk answers is the VM
resumed, through the normal per-VM-locked ``vm.resume`` operation. A VM that pauses again soon
after a resume is retried with an exponential back-off so a flapping array does not make it
bounce. ``io_error_resume = "manual"`` turns this off (the VRM or an admin resumes).

Each VM may choose otherwise (``spec.storage_errors``): ``resume`` (as above), ``pause`` (never
resumed by the agent), or ``poweroff``: resumed like ``resume`` if its storage answers within
``poweroff_after_s`` of the pause the agent first saw, powered off after that (VDSM's "kill"
resume behaviour, for managers whose HA restarts it on a host with working storage). The
host's setting is only the default for VMs that say nothing.

The probes run in a bounded pool of their own (BlockingPool "io-probe", 2 threads) with a deadline: a hung SAN makes a probe time
out (the VM simply stays paused), never blocks the agent.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Awaitable, Callable

import libvirt

from cna_agent.blocking import BlockingPool
from cna_agent.compute import domxml as dx
from cna_agent.contracts import Finding, VmStatus
from cna_agent.errors import AgentError

if TYPE_CHECKING:
    from cna_agent.compute.inventory import VmInventory
    from cna_agent.contracts import DiskProvider
    from cna_agent.hypervisor import Hypervisor
    from cna_agent.state.eventlog import EventHub

log = logging.getLogger(__name__)

#: A disk that failed with ENOSPC is resumed only with at least this much free space again.
MIN_FREE_BYTES = 64 * 1024 * 1024
#: Re-paused within this many seconds of an automatic resume counts as a failed resume.
FLAP_WINDOW_S = 120.0
MAX_BACKOFF_S = 600.0
PROBE_TIMEOUT_S = 15.0


@dataclass
class _Attempts:
    """Per-VM back-off state for automatic resumes."""

    failures: int = 0
    not_before: float = 0.0
    #: When the agent last resumed the VM; cleared once a re-pause within FLAP_WINDOW_S has
    #: been counted as a failure, so each re-pause counts once.
    last_resume: float = 0.0
    #: What blocked the last check (reported once per change, not every interval).
    last_reason: str = ""
    #: When this process first saw the VM paused by the current I/O error (the poweroff clock).
    paused_since: float = 0.0


@dataclass(frozen=True)
class PausedVm:
    uuid: str
    name: str
    #: target dev ("vdb") -> libvirt disk error code (VIR_DOMAIN_DISK_ERROR_*).
    errors: dict[str, int]
    #: target dev -> the host path libvirt opened ("" for network disks).
    sources: dict[str, str]


def _disk_sources(xml: str) -> dict[str, str]:
    domain = dx.Domain.from_xml(xml)
    out: dict[str, str] = {}
    for disk in domain.devices.disks if domain.devices else []:
        if disk.target_dev is None:
            continue
        out[disk.target_dev] = disk.source_file or disk.source_dev or ""
    return out


def _paused_vm(dom: libvirt.virDomain) -> PausedVm | None:
    state, reason = dom.state()
    if state != libvirt.VIR_DOMAIN_PAUSED or reason != libvirt.VIR_DOMAIN_PAUSED_IOERROR:
        return None
    errors = {k: int(v) for k, v in (dom.diskErrors(0) or {}).items() if int(v) != libvirt.VIR_DOMAIN_DISK_ERROR_NONE}
    return PausedVm(dom.UUIDString(), dom.name(), errors, _disk_sources(dom.XMLDesc(0)))


def list_io_paused(conn: libvirt.virConnect) -> list[PausedVm]:
    """The running domains libvirt reports as paused by an I/O error, with their failed disks."""
    out = []
    for dom in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_PAUSED):
        try:
            vm = _paused_vm(dom)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                raise
            continue
        if vm is not None:
            out.append(vm)
    return out


def io_paused(conn: libvirt.virConnect, uuid: str) -> PausedVm | None:
    """One domain, if libvirt reports it paused by an I/O error."""
    try:
        return _paused_vm(conn.lookupByUUIDString(uuid))
    except libvirt.libvirtError as exc:
        if exc.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
            raise
        return None


def probe_path(path: str, need_free: bool) -> None:
    """Read the first block of a disk's file or device; raise OSError when storage does not answer.

    The read goes through the page cache on purpose: O_DIRECT on a file needs aligned buffers
    and some datastores (tmpfs, FUSE) refuse it, while the point is only that the path opens
    and the filesystem answers. ENOSPC failures also need free space again.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        os.pread(fd, 4096, 0)
    finally:
        os.close(fd)
    if need_free:
        st = os.statvfs(os.path.dirname(path) or "/")
        free = st.f_bavail * st.f_frsize
        if free < MIN_FREE_BYTES:
            raise OSError(28, f"only {free // (1024 * 1024)} MiB free on the datastore of {path}")


class IoErrorResumer:
    """Resumes VMs paused on an I/O error once their failed disks answer again.

    Collaborators: the hypervisor (which VMs are paused, and why), the VM inventory (which are
    ours, with which spec), the disk provider (does the failed volume or LUN resolve again),
    the lifecycle's resume (an ordinary journalled VM operation) and the event hub.
    """

    def __init__(self, hypervisor: "Hypervisor", inventory: "VmInventory", volumes: "DiskProvider",
                 resume: Callable[[str], Awaitable[Any]], events: "EventHub", *,
                 interval_s: float, enabled: bool = True, executor: BlockingPool | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 power_off: Callable[[str], Awaitable[Any]] | None = None) -> None:
        self.hv = hypervisor
        self.inventory = inventory
        self.volumes = volumes
        self.resume = resume
        #: A hard power-off as a journalled VM operation (for the "poweroff" policy).
        self.power_off = power_off
        self.events = events
        self.interval_s = interval_s
        #: The host's default for VMs whose spec names no action (io_error_resume = "auto").
        self.enabled = enabled
        self.executor = executor or BlockingPool("io-probe", 2, PROBE_TIMEOUT_S, hint="storage not answering?")
        self._clock = clock
        self._attempts: dict[str, _Attempts] = {}

    # -- contracts.VmCheck (compute/reconcile.py runs it per VM, at its interval and on events) --

    name = "io-resume"

    async def check_vm(self, vm: VmStatus) -> list[Finding]:
        """One VM: resume it if an I/O error paused it and its failed disks answer again."""
        now = self._clock()
        if vm.state != "paused" or vm.reason != "ioerror":
            self._forget_if_settled(vm.uuid, now)
            return []
        paused = await self.hv.call(lambda c: io_paused(c, vm.uuid), timeout=30)
        if paused is None:
            return []
        outcome = await self._consider(paused, now)
        if outcome in ("resumed", "powered off"):
            return [Finding(self.name, vm.uuid, "paused by an I/O error", True, outcome)]
        return [Finding(self.name, vm.uuid, f"paused by an I/O error: {outcome}")] if outcome else []

    async def stop(self) -> None:
        self.executor.shutdown()

    def _forget_if_settled(self, uuid: str, now: float) -> None:
        a = self._attempts.get(uuid)
        if a is None:
            return
        a.paused_since = 0.0  # not paused now: a later I/O error starts its own poweroff clock
        if now - a.last_resume > FLAP_WINDOW_S:
            del self._attempts[uuid]  # stayed up: a later I/O error starts afresh

    async def blocked_by(self, vm: PausedVm, spec: Any) -> str:
        """Why the VM must stay paused ("" = every failed disk answers again); ``spec`` is the
        VM's VmSpec, whose disks say which datastore volume or LUN each target is."""
        if not vm.errors:
            # libvirt lost the per-disk detail (e.g. after an agent restart the error was
            # already cleared by a manual 'cont' attempt); check every disk then.
            failed = dict.fromkeys(vm.sources, libvirt.VIR_DOMAIN_DISK_ERROR_UNSPEC)
        else:
            failed = vm.errors
        by_target = {d.target: d for d in (spec.disks if spec else [])}
        for target, code in sorted(failed.items()):
            disk = by_target.get(target)
            field_name = f"disk {target}"
            try:
                if disk is not None and disk.lun is not None and (disk.lun.datastore or disk.lun.lun_id):
                    await self.volumes.resolve_lun(disk.lun.datastore, disk.lun.lun_id, field=field_name, vm=vm.uuid)
                elif disk is not None and disk.volume:
                    await self.volumes.resolve_volume(disk.volume, field=field_name)
                path = vm.sources.get(target, "")
                if path:
                    await self.executor.run(lambda p=path, c=code: probe_path(p, c == libvirt.VIR_DOMAIN_DISK_ERROR_NO_SPACE),
                                            timeout=PROBE_TIMEOUT_S, what=f"probing {path}")
            except (AgentError, OSError) as exc:
                return f"{target}: {exc}"
        return ""

    async def check_once(self) -> list[str]:
        """Every VM paused by an I/O error, in one libvirt listing; the UUIDs resumed."""
        if not self.hv.connected:
            return []
        paused = await self.hv.call(list_io_paused, timeout=30)
        now = self._clock()
        seen = {vm.uuid for vm in paused}
        for uuid in list(self._attempts):
            if uuid not in seen:
                self._forget_if_settled(uuid, now)
        return [vm.uuid for vm in paused if await self._consider(vm, now) == "resumed"]

    async def _consider(self, vm: PausedVm, now: float) -> str:
        """Decide one paused VM: "resumed", why it stays paused, or "" (not ours / backing off)."""
        cached = await self.inventory.definition(vm.uuid)
        if not cached.managed:
            return ""  # not ours: leave it alone
        action = self.action_for(cached.spec)
        if action == "pause":
            return ""  # its policy (or the host's io_error_resume = "manual"): the VRM or an admin resumes
        a = self._attempts.setdefault(vm.uuid, _Attempts())
        if not a.paused_since:
            a.paused_since = now
        if action == "poweroff" and now - a.paused_since >= cached.spec.storage_errors.effective_poweroff_after_s():
            return await self._power_off(vm, a, now)
        if a.last_resume and now - a.last_resume < FLAP_WINDOW_S:
            # paused again soon after our resume: back off before the next try
            a.failures += 1
            a.not_before = now + min(MAX_BACKOFF_S, self.interval_s * 2 ** a.failures)
            a.last_resume = 0.0
        if now < a.not_before:
            return f"backing off until the storage stays up (attempt {a.failures + 1})"
        reason = await self.blocked_by(vm, cached.spec)
        if reason:
            if reason != a.last_reason:
                a.last_reason = reason
                log.info("vm %s stays paused after an I/O error: %s", vm.name, reason)
            return reason
        try:
            op = await self.resume(vm.uuid)
        except AgentError as exc:  # busy (another operation holds the VM), gone, ...
            log.warning("resuming vm %s after an I/O error failed: %s", vm.name, exc)
            return f"resume failed: {exc.message}"
        if op.error is not None:
            log.warning("resuming vm %s after an I/O error failed: %s", vm.name, op.error.message)
            return f"resume failed: {op.error.message}"
        a.last_resume = self._clock()
        a.last_reason = ""
        disks = ", ".join(sorted(vm.errors)) or "all disks"
        await self.events.publish(
            "vm.io_error_resumed", severity="info",
            message=f"{vm.name}: storage answers again ({disks}); resumed after the I/O error",
            resource_kind="vm", resource_id=vm.uuid, resource_name=vm.name,
            attributes={"disks": disks, "attempt": str(a.failures + 1)})
        return "resumed"

    def action_for(self, spec: Any) -> str:
        """The VM's own storage-error action, or the host's default."""
        action = spec.storage_errors.action if spec is not None else ""
        return action or ("resume" if self.enabled else "pause")

    async def _power_off(self, vm: PausedVm, a: _Attempts, now: float) -> str:
        if self.power_off is None:
            return "its policy powers it off, but this agent has no power-off path"
        try:
            op = await self.power_off(vm.uuid)
        except AgentError as exc:
            return f"power-off failed: {exc.message}"
        if op.error is not None:
            return f"power-off failed: {op.error.message}"
        waited = int(now - a.paused_since)
        self._attempts.pop(vm.uuid, None)
        disks = ", ".join(sorted(vm.errors)) or "all disks"
        await self.events.publish(
            "vm.io_error_powered_off", severity="error", resource_kind="vm", resource_id=vm.uuid, resource_name=vm.name,
            message=f"{vm.name}: paused by a storage error ({disks}) for {waited} s; powered off by its storage-error policy",
            attributes={"disks": disks, "paused_s": str(waited), "operation_id": getattr(op, "id", "")})
        return "powered off"

    def state_of(self, uuid: str) -> dict[str, Any]:
        """Back-off state (for diagnostics and tests)."""
        a = self._attempts.get(uuid)
        return {} if a is None else {"failures": a.failures, "not_before": a.not_before, "last_reason": a.last_reason}
