"""Builders for each subsystem, called by agent.py in dependency order. Each takes exactly
the collaborators its subsystem needs and returns the built objects; tests build a subset the
same way (so a test wires services as the daemon does)."""

from __future__ import annotations

import logging
import os
import platform
from dataclasses import dataclass
from typing import Any, Sequence

from cna_agent.compute.binder import Binder
from cna_agent.compute.disks import DiskOperations
from cna_agent.compute.events import EVENT_READ_TIMEOUT_S, DomainEventMonitor
from cna_agent.compute.first_boot import FirstBoot
from cna_agent.compute.guest_agent import READ_DEADLINE_S, GuestAgents
from cna_agent.compute.guest_passwords import GuestPasswords
from cna_agent.compute.inventory import VmInventory
from cna_agent.compute.io_resume import IoErrorResumer
from cna_agent.compute.ledger import VmStateLedger
from cna_agent.compute.lifecycle import DomainRenderer, VmLifecycle
from cna_agent.compute.nics import NicOperations
from cna_agent.blocking import BlockingPool
from cna_agent.compute.appliances import VmAppliances
from cna_agent.compute.backup import VmBackups
from cna_agent.compute.console_tickets import ConsoleTickets
from cna_agent.compute.disk_move import DiskMoves
from cna_agent.compute.hibernate import VmHibernation
from cna_agent.compute.hibernate_handoff import HibernationHandoff
from cna_agent.compute.reconcile import VmReconciler
from cna_agent.compute.recycle import RecycleBin
from cna_agent.compute.recovery import VmRecovery
from cna_agent.compute.render import RenderContext
from cna_agent.compute.resolvers import LocalFileResolver, parse_image_dirs
from cna_agent.compute.reservations import HostCapacity, ReservationAdmission, host_memory_mib
from cna_agent.compute.rundirs import QemuRunDirs
from cna_agent.compute.service import Compute, state_follower
from cna_agent.compute.sidechannel import SideChannels
from cna_agent.compute.vm_counters import VmCounters
from cna_agent.compute.snapshot_ops import VmSnapshots
from cna_agent.compute.templates import VmTemplates
from cna_agent.compute.update import VmUpdates
from cna_agent.compute.vmops import VmOps
from cna_agent.config import AgentConfig
from cna_agent.contracts import (ColdMigrationPeer, DiskProvider, HostAdmission, ImageStore, MigrationPeer, Placer, PortProvider, VmCheck,
                                 VmLocator, VolumeTransfer)
from cna_agent.host.cpulist import parse_cpulist
from cna_agent.host.drift import PlacementMonitor
from cna_agent.host.placement import Planner
from cna_agent.host.placer import HostPlacer, read_live_hugepages
from cna_agent.host.service import HostService
from cna_agent.hypervisor import Hypervisor
from cna_agent.compute.migration import VmMigrations
from cna_agent.compute.migration_cold import ColdMigrations
from cna_agent.compute.migration_cold_incoming import ColdIncoming
from cna_agent.compute.migration_incoming import IncomingMigrations
from cna_agent.network.operations import NetworkOperations
from cna_agent.network.service import NetworkService
from cna_agent.operations import OperationRunner
from cna_agent.state.eventlog import EventHub
from cna_agent.state.store import StateStore
from cna_agent.storage.executor import StorageExecutor
from cna_agent.storage.runner import SubprocessRunner
from cna_agent.storage.secrets import LibvirtSecrets
from cna_agent.storage.service import StorageService

log = logging.getLogger(__name__)


# -- placement ---------------------------------------------------------------------------------


@dataclass
class Placement:
    placer: HostPlacer
    monitor: PlacementMonitor


async def build_placement(config: AgentConfig, host: HostService, store: StateStore, events: EventHub,
                          vms: VmLocator) -> Placement:
    """A HostPlacer over the probed topology (reservations restored from the state database),
    and the drift monitor comparing placed VMs' real threads/memory with their plans."""
    caps = await host.capabilities()
    planner = Planner(caps.topology, reserved_cpus=parse_cpulist(config.host.reserved_cpus))
    placer = HostPlacer(planner, store, live_hugepages=lambda: host.pool.run(
        read_live_hugepages, timeout=10, what="reading the hugepage pools"))
    restored = await placer.load()
    log.info("event=placement.ready restored=%d reserved_cpus=%s", restored, config.host.reserved_cpus or "-")
    monitor = PlacementMonitor(placer, events, vms.locate, interval_s=config.host.placement_check_interval_s,
                               repair=config.host.placement_repair, pool=host.pool)
    return Placement(placer, monitor)


# -- compute -------------------------------------------------------------------------------------


async def _host_cpu(hypervisor: Hypervisor) -> tuple[int, int]:
    """(logical CPUs, MHz) from libvirt's node info; fallbacks when it is unreachable."""
    if not hypervisor.connected:
        return os.cpu_count() or 1, 2000
    try:
        info = await hypervisor.call(lambda c: c.getInfo(), timeout=10)
        return int(info[2]), int(info[3]) or 2000
    except Exception:
        return os.cpu_count() or 1, 2000


async def render_context(config: AgentConfig, hypervisor: Hypervisor, virt_type: str) -> tuple[RenderContext, int]:
    """This host's facts for the domain builder, and its logical CPU count."""
    from cna_agent import __version__

    facts = hypervisor.facts
    cpus, mhz = await _host_cpu(hypervisor)
    ctx = RenderContext(
        host_arch=facts.arch if facts else platform.machine(),
        virt_type=virt_type,
        state_dir=config.state.dir,
        run_dir=config.state.run_dir,
        qmp_fallback_dir=config.state.qmp_fallback_dir,
        console_listen=config.host.console_listen,
        host_cpu_mhz=mhz,
        agent_version=__version__,
        hyperv_features=facts.hyperv_features if facts else None,
        hotplug_slots=config.compute.hotplug_slots,
    )
    return ctx, cpus


def build_compute(config: AgentConfig, hypervisor: Hypervisor, runner: OperationRunner, events: EventHub,
                  inventory: VmInventory, ctx: RenderContext, *, virt_type: str, host_cpus: int,
                  disks: DiskProvider | None, ports: PortProvider, placer: Placer | None,
                  checks: Sequence[VmCheck] = (), peer: MigrationPeer | None = None, host_uuid: str = "",
                  store: StateStore | None = None, transfer: VolumeTransfer | None = None,
                  cold_peer: ColdMigrationPeer | None = None, admission: HostAdmission | None = None,
                  images: ImageStore | None = None) -> Compute:
    """Compute's parts around one inventory; ``disks``/``ports``/``placer`` are the other
    subsystems (None for a subsystem this agent does not run: compute/resolvers.py's stand-ins),
    ``checks`` their per-VM checks for compute's reconcile (network's ports, placement's pinning),
    ``transfer`` storage's volume mover for cold migration (None: no cold migration), ``peer`` and
    ``cold_peer`` the destination agent for live and cold moves (api/peer.py's client is both),
    ``admission`` the maintenance mode (creates, starts and incoming migrations ask it), ``images``
    storage's package files for OVF import and export (None: no appliances)."""
    ops = VmOps(hypervisor, runner, events, inventory)
    binder = Binder(inventory, LocalFileResolver(parse_image_dirs(config.compute.image_dirs)), disks, ports, placer)
    renderer = DomainRenderer(ctx, QemuRunDirs(ctx), virt_type=virt_type, host_cpus=host_cpus)
    sidechannels = SideChannels(events, inventory.qmp_socket)
    counters = VmCounters(lambda fn: hypervisor.call(fn, timeout=30, what="stats"), sidechannels.query)
    inventory.definition_listeners.append(counters.forget)
    follow = state_follower(inventory, sidechannels)

    guest_agents = GuestAgents(hypervisor, inventory, pool=BlockingPool("guest-agent", 4, READ_DEADLINE_S + 5,
                                                                        hint="guest agent not answering?"),
                               min_interval_s=config.compute.guest_info_min_interval_s)
    inventory.tools_view = guest_agents.tools_status
    first_boot = FirstBoot(hypervisor, inventory, events, pool=guest_agents.pool, state_dir=ctx.state_dir)

    tickets = ConsoleTickets(hypervisor, inventory, events)

    def on_change(uuid: str, state: str, reason: str, when: float) -> None:
        follow(uuid, state, reason, when)
        guest_agents.vm_state_changed(uuid, state)
        first_boot.vm_state_changed(uuid, state)
        tickets.vm_state_changed(uuid, state)
        reconciler.enqueue(uuid)  # bound below: events arrive only once compute has started

    async def managed(uuid: str) -> bool:
        return (await inventory.definition(uuid)).managed

    ledger = VmStateLedger(store, events, managed) if store is not None else None
    monitor = DomainEventMonitor(hypervisor, events, on_change=on_change, on_definition_change=inventory.forget, ledger=ledger,
                                 pool=BlockingPool("libvirt-events", 1, EVENT_READ_TIMEOUT_S))
    guest_cpus = max(1, host_cpus - len(parse_cpulist(config.host.reserved_cpus))) if config.host.reserved_cpus else host_cpus
    reservations = ReservationAdmission(inventory, HostCapacity(cpu_mhz=guest_cpus * ctx.host_cpu_mhz,
                                                                memory_mib=host_memory_mib()))
    lifecycle = VmLifecycle(ops, binder, renderer, monitor, admission=admission, reservations=reservations)
    recycle_bin = RecycleBin(ops, purge=lambda uuid, delete_disks: lifecycle.delete(uuid, delete_disks=delete_disks, force=True),
                             release=binder.release_placement, reclaim=lifecycle.reclaim_placement,
                             sweep_interval_s=config.compute.recycle_sweep_interval_s)
    lifecycle.recycle_bin = recycle_bin
    lifecycle.first_boot = first_boot
    lifecycle.shutdown_agent_after_s = config.compute.shutdown_guest_agent_after_s
    hibernation = VmHibernation(ops, binder, renderer, BlockingPool("hibernate-files", 2, 60.0, hint="datastore not answering?"),
                                host_uuid=host_uuid, admission=admission, reservations=reservations)
    lifecycle.hibernation = hibernation
    lifecycle.clock_sync = hibernation.clock_sync = guest_agents.sync_clock
    handoff = HibernationHandoff(hibernation, interval_s=config.compute.hibernation_check_interval_s)
    resumer = IoErrorResumer(hypervisor, inventory, binder.volumes, lifecycle.resume, events,
                             interval_s=config.compute.io_error_check_interval_s,
                             enabled=config.compute.io_error_resume == "auto",
                             power_off=lambda uuid: lifecycle.shutdown(uuid, hard=True))
    # Always in the reconcile: a VM's own storage_errors policy applies whatever the host's default.
    reconciler = VmReconciler(inventory, [*checks, resumer, handoff])
    monitor.on_io_error = reconciler.enqueue

    def on_agent(uuid: str, connected: bool) -> None:
        guest_agents.agent_changed(uuid, connected)
        first_boot.agent_changed(uuid, connected)  # a pending first boot is polled from now

    monitor.on_agent = on_agent
    monitor.on_graphics_client = tickets.client_authenticated  # a VNC ticket works once
    incoming = IncomingMigrations(ops, binder, renderer, libvirt_uri=config.migration.libvirt_uri,
                                  migrate_host=config.migration.migrate_host, max_incoming=config.migration.max_incoming,
                                  ttl_s=config.migration.prepare_ttl_s, store=store, admission=admission,
                                  reservations=reservations)
    compute = Compute(
        ops=ops, inventory=inventory, binder=binder, monitor=monitor, lifecycle=lifecycle, sidechannels=sidechannels,
        updates=VmUpdates(ops, binder, renderer, lifecycle),
        disks=DiskOperations(ops, binder, lifecycle),
        nics=NicOperations(ops, binder, lifecycle),
        snapshots=VmSnapshots(ops),
        recovery=VmRecovery(hypervisor, inventory, events),
        recycle_bin=recycle_bin,
        hibernation=hibernation,
        handoff=handoff,
        backups=VmBackups(ops, renderer, bitmaps=sidechannels.persistent_bitmaps),
        tickets=tickets,
        disk_moves=DiskMoves(ops, binder),
        appliances=VmAppliances(ops, lifecycle, images,
                                BlockingPool("appliance-files", 2, 60.0, hint="datastore not answering?")),
        resumer=resumer,
        reconciler=reconciler,
        migrations=VmMigrations(ops, binder, renderer.run_dirs, peer or _no_peer(), max_outgoing=config.migration.max_outgoing,
                                host_uuid=host_uuid, cold=ColdMigrations(ops, binder, renderer.run_dirs, cold_peer or _no_peer(),
                                                                         transfer, host_uuid=host_uuid)),
        incoming=incoming,
        ledger=ledger,
        guest_agents=guest_agents,
        guest_passwords=GuestPasswords(ops, guest_agents),
        first_boot=first_boot,
        templates=VmTemplates(ops, lifecycle, binder.disks),
        counters=counters,
        cold_incoming=ColdIncoming(ops, binder, renderer, transfer, max_incoming=config.migration.max_incoming,
                                   ttl_s=config.migration.prepare_ttl_s, busy_elsewhere=lambda: len(incoming.pending()),
                                   admission=admission),
    )
    if compute.cold_incoming is not None:
        incoming.busy_elsewhere = lambda: len(compute.cold_incoming.pending())  # type: ignore[union-attr]
    return compute


def _no_peer() -> Any:
    """The peer-agent client (api/peer.py), when the wiring did not hand one in."""
    from cna_agent.api.peer import GrpcMigrationPeer

    return GrpcMigrationPeer()


# -- storage and network -------------------------------------------------------------------------


def build_storage(config: AgentConfig, hypervisor: Hypervisor, runner: OperationRunner, events: EventHub,
                  inventory: VmInventory) -> StorageService:
    from cna_agent.host.service import read_iscsi_iqn
    from cna_agent.storage.san import backends_for

    cfg = config.storage
    commands = SubprocessRunner()
    return StorageService(
        cfg.datastores, commands, StorageExecutor(cfg.executor_threads, cfg.command_timeout_s), runner, events,
        command_timeout=cfg.command_timeout_s, probe_interval=cfg.probe_interval_s, probe_timeout=cfg.probe_timeout_s,
        users=inventory, initiator_iqn=read_iscsi_iqn(), secrets=LibvirtSecrets(hypervisor),
        san_backends=backends_for(cfg.datastores, commands), qemu_user=hypervisor.qemu_user,
    )


@dataclass
class Network:
    service: NetworkService
    ops: NetworkOperations


def build_network(config: AgentConfig, runner: OperationRunner, events: EventHub, inventory: VmInventory,
                  libvirt_uri: str = "") -> Network:
    """``libvirt_uri``: the connection compute uses; a libvirtd's own OVS plugging cannot be
    pointed at a private [network] ovsdb, so then the agent plugs OVS ports itself."""
    cfg = config.network
    service = NetworkService(ovsdb=cfg.ovsdb, ovsdb_timeout_s=cfg.ovsdb_timeout_s, netlink_threads=cfg.netlink_threads,
                             state_dir=config.state.dir, events=events, vms=inventory, config_bridges=cfg.bridges,
                             config_port_groups=cfg.port_groups, reconcile_interval_s=cfg.reconcile_interval_s,
                             libvirt_embedded=not libvirt_uri or libvirt_uri.startswith("qemu:///embed"))
    return Network(service, NetworkOperations(service, runner))

