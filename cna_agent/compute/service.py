"""Compute: the host's VMs and every device of theirs, as one set of parts built by the wiring.

Each part has one job (inventory.py: what VMs exist; lifecycle.py: create/start/stop/delete;
update.py: UpdateVm; disks.py and nics.py: devices on existing VMs; snapshot_ops.py;
recovery.py and recovery_devices.py: operations a crash left open; events.py: libvirt's domain events; sidechannel.py:
the QMP side channel; reconcile.py: the one per-VM reconcile that runs every subsystem's check;
io_resume.py: compute's own check, resuming VMs paused on a storage error). This module holds
them together and does the little that needs several: start-up adoption, consoles and QEMU
diagnostics. Future VM flows (migration, hibernate, backup) get a module of their own beside
these, built from the same VmOps, Binder and providers.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable

from cna_agent.compute.migration import VmMigrations
from cna_agent.compute.migration_cold_incoming import ColdIncoming
from cna_agent.compute.migration_incoming import IncomingMigrations
from cna_agent.compute.migration_recovery import MigrationRecovery
from cna_agent.compute import state as st
from cna_agent.compute.appliances import VmAppliances
from cna_agent.compute.backup import VmBackups
from cna_agent.compute.binder import Binder
from cna_agent.compute.console import ConsoleSession, ConsoleSessions
from cna_agent.compute.console_tickets import ConsoleTickets
from cna_agent.compute.disk_move import DiskMoves
from cna_agent.compute.disks import DiskOperations
from cna_agent.compute.events import DomainEventMonitor
from cna_agent.compute.first_boot import FirstBoot
from cna_agent.compute.guest_agent import GuestAgents
from cna_agent.compute.guest_passwords import GuestPasswords
from cna_agent.compute.hibernate import VmHibernation
from cna_agent.compute.hibernate_handoff import HibernationHandoff
from cna_agent.compute.inventory import VmInfo, VmInventory
from cna_agent.compute.io_resume import IoErrorResumer
from cna_agent.compute.lifecycle import VmLifecycle
from cna_agent.compute.nics import NicOperations
from cna_agent.compute.ledger import Now, VmStateLedger
from cna_agent.compute.recycle import RecycleBin
from cna_agent.compute.reconcile import VmReconciler
from cna_agent.compute.recovery import VmRecovery
from cna_agent.compute.recovery_devices import DeviceRecovery
from cna_agent.compute.sidechannel import Diagnostics, SideChannels
from cna_agent.compute.snapshot_ops import VmSnapshots
from cna_agent.compute.templates import VmTemplates
from cna_agent.compute.vm_counters import VmCounters
from cna_agent.compute.update import VmUpdates
from cna_agent.compute.vmops import VmOps
from cna_agent.errors import FailedPrecondition, InvalidArgument
from cna_agent.operations import RecoveryHandler

log = logging.getLogger(__name__)


def state_follower(inventory: VmInventory, sidechannels: SideChannels) -> Callable[[str, str, str, float], None]:
    """The domain-event hook: remember when each VM's state changed, and follow running
    managed guests' side-channel monitors (drop them when the guest stops)."""

    def follow(uuid: str, state: str, reason: str, when: float) -> None:
        inventory.note_state(uuid, when)
        if inventory.is_managed_cached(uuid) or state == "deleted":
            sidechannels.state_changed(uuid, state)
        if state == "deleted":
            inventory.vanished(uuid)

    return follow


@dataclass
class Compute:
    ops: VmOps
    inventory: VmInventory
    binder: Binder
    monitor: DomainEventMonitor
    sidechannels: SideChannels
    lifecycle: VmLifecycle
    updates: VmUpdates
    disks: DiskOperations
    nics: NicOperations
    snapshots: VmSnapshots
    recovery: VmRecovery
    resumer: IoErrorResumer
    reconciler: VmReconciler
    #: Live migration: this host as the source, and as the destination.
    migrations: VmMigrations
    incoming: IncomingMigrations
    #: Cold migration, this host as the destination (the source side hangs off migrations).
    cold_incoming: ColdIncoming | None = None
    #: The last state seen per VM, to turn what changed while nobody watched into events.
    ledger: VmStateLedger | None = None
    #: The serial console sessions this agent holds (console.py).
    consoles: ConsoleSessions = field(default_factory=ConsoleSessions)
    #: VMs deleted with a hold (recycle.py): restored, or deleted when the hold is up.
    recycle_bin: RecycleBin | None = None
    #: Hibernate and resume (hibernate.py), and what follows them (hibernate_handoff.py).
    hibernation: VmHibernation | None = None
    handoff: HibernationHandoff | None = None
    #: Pull-mode backups and checkpoints (backup.py).
    backups: VmBackups | None = None
    #: Short-lived console passwords handed out by GetConsole (console_tickets.py).
    tickets: ConsoleTickets | None = None
    #: Live storage migration of running VMs' disks (disk_move.py).
    disk_moves: DiskMoves | None = None
    #: OVF/OVA import and export (appliances.py).
    appliances: VmAppliances | None = None
    #: Guest info and tools status from qemu-guest-agent (guest_agent.py).
    guest_agents: GuestAgents | None = None
    #: SetGuestPassword through the guest agent (guest_passwords.py).
    guest_passwords: GuestPasswords | None = None
    #: First-boot customization's drive and its removal when the guest is done (first_boot.py).
    first_boot: FirstBoot | None = None
    #: ConvertVmToTemplate and DeployVm (templates.py).
    templates: VmTemplates | None = None
    #: Running VMs' counters for the stats sampler, each from its cheapest source (vm_counters.py).
    counters: VmCounters | None = None

    def recovery_handlers(self) -> dict[str, RecoveryHandler]:
        """How each operation kind a crash left open is decided (the runner calls them once)."""
        handlers = {**self.recovery.handlers(), **DeviceRecovery(self.ops.hv, self.inventory).handlers(),
                    "vm.migrate": MigrationRecovery(self.migrations).recover}
        if self.migrations.cold is not None:
            handlers["vm.migrate_cold"] = self.migrations.cold.recover
        if self.recycle_bin is not None:
            handlers["vm.restore"] = self.recycle_bin.recover_restore
        if self.handoff is not None:
            handlers.update(self.handoff.handlers())
        if self.backups is not None:
            handlers.update(self.backups.handlers())
        if self.disk_moves is not None:
            handlers.update(self.disk_moves.handlers())
        if self.appliances is not None:
            handlers.update(self.appliances.handlers())
        if self.guest_passwords is not None:
            handlers.update(self.guest_passwords.handlers())
        if self.templates is not None:
            handlers.update(self.templates.handlers())
        return handlers

    async def start(self) -> None:
        await self.monitor.start()
        if self.ops.hv.connected:
            vms = await self.adopt()
            await self.compare_states(vms, observed="at start")
            await self.incoming.restore()
            await self.release_orphan_claims()
        # Registered after the first connection: it runs on every later one (a libvirtd restart,
        # or libvirt down when the agent started), whose gap no event covered.
        self.ops.hv.add_on_connect(self._reconnected)

    async def _reconnected(self, _conn: Any) -> None:
        await self.compare_states(await self.inventory.list(include_unmanaged=True, recycled=None), observed="after reconnect")

    async def compare_states(self, vms: list[VmInfo], *, observed: str) -> int:
        """Events for every VM whose state differs from the one last seen (ledger.py)."""
        if self.ledger is None:
            return 0
        return await self.ledger.compare([Now(v.uuid, v.name, v.state, v.reason, v.managed) for v in vms], observed=observed)

    async def start_reconcile(self) -> None:
        """Once serving: the per-VM reconcile (start-up pass, events, timer), and the recycle
        bin's sweep (a hold that ran out while the agent was down is handled now)."""
        await self.reconciler.start()
        if self.recycle_bin is not None:
            self.recycle_bin.start()
        if self.first_boot is not None:
            await self.first_boot.start()

    async def stop(self) -> None:
        if self.recycle_bin is not None:
            await self.recycle_bin.stop()
        if self.first_boot is not None:
            await self.first_boot.stop()
        await self.reconciler.stop()
        await self.resumer.stop()
        await self.monitor.stop()
        if self.tickets is not None:
            await self.tickets.stop()
        await self.sidechannels.close()

    async def adopt(self) -> list[VmInfo]:
        """List every domain; ours are adopted with their spec, others noted. Nothing is
        started, stopped or redefined (DESIGN.md "Restart adopts, never redoes")."""
        vms = await self.inventory.list(include_unmanaged=True, recycled=None)
        managed = [v for v in vms if v.managed]
        for v in managed:
            if v.state in (st.RUNNING, st.PAUSED):
                self.sidechannels.state_changed(v.uuid, st.RUNNING)
        log.info("event=vm.adopted managed=%d unmanaged=%d running=%d", len(managed), len(vms) - len(managed),
                 sum(1 for v in managed if v.state == st.RUNNING))
        return vms

    async def release_orphan_claims(self) -> int:
        """Placements of VMs that are neither defined here nor arriving (a create or an incoming
        migration cut short between claiming and defining) would hold CPUs and memory for
        nothing, forever: released at start-up, before any new claim is made."""
        placer = self.binder.placer
        if placer is None:
            return 0
        defined = {v.uuid for v in await self.inventory.list(include_unmanaged=True, recycled=None)} | self.incoming.arriving()
        orphans = [p.uuid for p in placer.placements() if p.uuid not in defined]
        for uuid in orphans:
            log.warning("event=placement.orphan_released vm=%s", uuid)
            await self.binder.release_placement(uuid)
        return len(orphans)

    async def open_console(self, ref: str, *, force: bool = False) -> ConsoleSession:
        """A serial console session on a running VM (close it when done)."""
        uuid, name = await self.inventory.lookup_uuid(ref)
        spec = (await self.inventory.definition(uuid)).spec
        if spec is not None and not spec.serial_console:
            raise FailedPrecondition(f"vm {name!r} has no serial console (spec.serial_console is off)", field="vm")
        return await self.consoles.open(ConsoleSession(self.ops.hv, uuid, name), force=force)

    async def diagnostics(self, ref: str, *, dirty_rate_seconds: int = 0) -> Diagnostics:
        """QEMU-level facts over the side channel (query-status, vCPU threads, dirty rate,
        the last GUEST_PANICKED details); the VM must be running or paused."""
        if not 0 <= dirty_rate_seconds <= 60:
            raise InvalidArgument("dirty_rate_seconds", f"{dirty_rate_seconds} is not in 0..60 (0 = do not measure)")
        uuid, name = await self.inventory.lookup_uuid(ref)
        if await self.inventory.state(uuid) not in (st.RUNNING, st.PAUSED):
            raise FailedPrecondition(f"vm {name!r} is not running; QEMU diagnostics exist only while it runs", field="vm")
        return await self.sidechannels.diagnostics(uuid, dirty_rate_seconds)
