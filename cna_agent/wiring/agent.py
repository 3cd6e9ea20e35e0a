"""Build the whole agent, in dependency order, and start and stop it in that order.

Who gets what (the arrows are constructor arguments):

    state store -> event hub -> operation runner (result encoder from api/)
    hypervisor -> host facts, KVM verdict
    hypervisor -> VM inventory (compute) -> storage (VmDisks), network (VmNics), placement (VmLocator)
    state store -> maintenance mode (HostAdmission) -> compute; compute's migrations -> evacuation
    storage (DiskProvider), network (PortProvider), placement (Placer) -> compute's other parts
    everything -> servicers -> gRPC server

Start-up order matters for restarts (DESIGN.md "Restart adopts, never redoes"): the state
database opens first, subsystems start (compute adopts what libvirt has), operations a previous
process left open are closed by recovery (never re-run), then the server starts; background
loops (network apply and repair, placement drift, the VRM link) start once it serves.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Awaitable, Callable

from cna_agent import __version__
from cna_agent.config import AgentConfig
from cna_agent.host.kvmprobe import KvmVerdict
from cna_agent.blocking import BlockingPool
from cna_agent.host.service import HostService, host_pool
from cna_agent.hypervisor import Hypervisor, choose_uri
from cna_agent.network.service import NetworkService
from cna_agent.operations import OperationRunner
from cna_agent.state.eventlog import EventHub, EventLog
from cna_agent.state.journal import OperationJournal
from cna_agent.state.store import StateStore
from cna_agent.tasks import cancel_and_wait

log = logging.getLogger("cna_agent.wiring")

Hook = Callable[[], Awaitable[None]]


@dataclass
class Agent:
    """Everything the running agent holds; built by :func:`build_agent`, torn down in reverse."""

    config: AgentConfig
    store: StateStore
    events: EventHub
    runner: OperationRunner
    hypervisor: Hypervisor
    host: HostService
    server: object
    #: Run once serving (background loops), in order.
    after_start: list[tuple[str, Hook]] = field(default_factory=list)
    #: Run at stop, in order (the reverse of start).
    stops: list[tuple[str, Hook]] = field(default_factory=list)

    async def start_background(self) -> None:
        for name, hook in self.after_start:
            await hook()
            log.info("event=component.started name=%s", name)

    async def stop(self) -> None:
        for name, hook in self.stops:
            try:
                await hook()
            except Exception:
                log.exception("event=component.stop_failed name=%s", name)
        await self.hypervisor.stop()
        self.host.pool.shutdown()
        await self.events.close()
        self.store.close()


#: Deadline of the KVM probe (a firmware test boot of at most 10 s, plus QEMU start and kill).
KVM_PROBE_TIMEOUT_S = 60.0


async def resolve_virt_type(config: AgentConfig, hypervisor: Hypervisor, state_dir: Path, *,
                            pool: BlockingPool) -> tuple[KvmVerdict, str]:
    """The KVM verdict and virt_type; the probe runs in ``pool`` (the shared host pool)."""
    from cna_agent.host.kvmprobe import probe_kvm

    facts = hypervisor.facts
    emulator = facts.emulator if facts else ""
    arch = facts.arch if facts else platform.machine()
    if config.libvirt.virt_type == "qemu":
        return KvmVerdict(False, "virt_type = qemu in the configuration", method="config"), "qemu"
    verdict = await pool.run(lambda: probe_kvm(emulator, arch, cache_file=state_dir / "kvm-probe.json"),
                             timeout=KVM_PROBE_TIMEOUT_S, what="KVM probe")
    if facts is not None and not facts.kvm_in_domcaps and verdict.usable:
        verdict = KvmVerdict(False, "libvirt's capabilities offer no kvm domain type for this arch", method="domcaps")
    if config.libvirt.virt_type == "kvm":
        if not verdict.usable:
            log.warning("event=kvm.forced reason=%r", verdict.reason)
        return verdict, "kvm"
    return verdict, "kvm" if verdict.usable else "qemu"


async def build_agent(config: AgentConfig) -> Agent:
    from cna_agent.api.agent import AgentServicer
    from cna_agent.api.events import EventServicer
    from cna_agent.api.host import HostServicer
    from cna_agent.api.network import NetworkServicer
    from cna_agent.api.migration import MigrationServicer
    from cna_agent.api.operations import OperationsServicer
    from cna_agent.api.peer import GrpcMigrationPeer
    from cna_agent.api.results import encode_result
    from cna_agent.api.server import AgentServer
    from cna_agent.api.storage import StorageServicer
    from cna_agent.api.vm import VmServicer
    from cna_agent.api.backup import BackupServicer
    from cna_agent.api.appliance import ApplianceServicer
    from cna_agent.compute.evacuation import HostEvacuation
    from cna_agent.compute.inventory import VmInventory
    from cna_agent.compute.maintenance import MaintenanceMode
    from cna_agent.compute.render import host_limitations
    from cna_agent.metrics import rpc_on_call
    from cna_agent.wiring import parts
    from cna_agent.wiring.telemetry import build_telemetry
    from cna_agent.network.recovery import NetworkRecovery
    from cna_agent.storage.recovery import VolumeRecovery
    from cna_agent.storage.transfer import VolumeTransfers

    state_dir = Path(config.state.dir)
    for d in (state_dir, Path(config.state.run_dir)):
        d.mkdir(parents=True, exist_ok=True, mode=0o700)
    store = StateStore(state_dir / "agent.db")
    events = EventHub(store, EventLog(store, retention=config.state.event_retention))
    runner = OperationRunner(store, OperationJournal(store), events, retention_s=config.state.operation_retention_days * 86400,
                             encode=encode_result)

    uri = choose_uri(config.libvirt.uri, str(state_dir))
    hypervisor = Hypervisor(
        uri,
        executor_threads=config.libvirt.executor_threads,
        call_timeout_s=config.libvirt.call_timeout_s,
        keepalive_interval_s=config.libvirt.keepalive_interval_s,
        reconnect_max_backoff_s=config.libvirt.reconnect_max_backoff_s,
    )
    try:
        await hypervisor.start()
    except Exception as exc:
        # Keep serving (host facts, operations, events) and keep trying: the VRM must see a
        # degraded host, not a dead agent, while libvirtd is down.
        log.error("event=libvirt.unavailable uri=%s error=%r", uri, str(exc))
        await hypervisor.start_disconnected()
    pool = host_pool()  # shared: KVM probe, host facts and stats, placement checks
    kvm, virt_type = await resolve_virt_type(config, hypervisor, state_dir, pool=pool)
    log.info("event=virt_type chosen=%s kvm_usable=%s reason=%r", virt_type, kvm.usable, kvm.reason)
    host = HostService(hypervisor, kvm=kvm, virt_type=virt_type, host_uuid=config.host.host_uuid, pool=pool)

    render_ctx, host_cpus = await parts.render_context(config, hypervisor, virt_type)
    inventory = VmInventory(hypervisor, runner.locks, console_listen=config.host.console_listen,
                            limitations=functools.partial(host_limitations, ctx=render_ctx))
    placement = await parts.build_placement(config, host, store, events, inventory)
    maintenance = MaintenanceMode(store)
    await maintenance.load()  # before anything is served: a host restarted in maintenance stays in it
    storage = parts.build_storage(config, hypervisor, runner, events, inventory)
    network = parts.build_network(config, runner, events, inventory, libvirt_uri=uri)
    peer = GrpcMigrationPeer(cert=config.vrm.cert, key=config.vrm.key, ca=config.vrm.ca)
    compute = parts.build_compute(config, hypervisor, runner, events, inventory, render_ctx, virt_type=virt_type,
                                  host_cpus=host_cpus, disks=storage, ports=network.service, placer=placement.placer,
                                  checks=[network.service.reconciler, placement.monitor],
                                  peer=peer, cold_peer=peer,
                                  host_uuid=config.host.host_uuid or (hypervisor.facts.host_uuid if hypervisor.facts else ""),
                                  store=store, admission=maintenance, images=storage.images,
                                  transfer=VolumeTransfers(storage.volumes.roots, storage.runner, storage.executor,
                                                           timeout=config.storage.command_timeout_s))
    evacuation = HostEvacuation(maintenance, compute.migrations, inventory, runner, events=events,
                                max_parallel=config.migration.max_outgoing)
    # Every blocking pool, for the metrics (read at scrape time).
    pools = [store.pool, hypervisor.pool, pool, compute.resumer.executor, storage.executor,
             network.service.ovs.pool, network.service.netlink_pool]
    if compute.hibernation is not None:
        pools.append(compute.hibernation.files)
    if compute.appliances is not None:
        pools.append(compute.appliances.files)
    if compute.guest_agents is not None:
        pools.append(compute.guest_agents.pool)
    if compute.monitor.pool is not None:
        pools.append(compute.monitor.pool)
    telemetry = build_telemetry(config, hypervisor, host, store, events, pools,
                                collect=compute.counters.collect if compute.counters is not None else None)
    for each in pools:  # a fixed thread count from here on (see BlockingPool.prestart)
        await asyncio.to_thread(each.prestart)

    await storage.start()
    log.info("event=storage.started datastores=%d threads=%d", len(config.storage.datastores), config.storage.executor_threads)
    await compute.start()
    recovered = await runner.recover({**VolumeRecovery(storage).handlers(), **NetworkRecovery(network.service).handlers(),
                                      **compute.recovery_handlers(), **evacuation.recovery_handlers()})

    servicers: dict[str, object] = {
        "cna.v1.HostService": HostServicer(host, placement=placement.monitor, maintenance=evacuation),
        "cna.v1.OperationsService": OperationsServicer(runner),
        "cna.v1.EventService": EventServicer(events),
        "cna.v1.VmService": VmServicer(compute),
        "cna.v1.StorageService": StorageServicer(storage, compute.disks, compute.disk_moves),
        "cna.v1.NetworkService": NetworkServicer(network.service, network.ops, compute.nics),
        "cna.v1.AgentService": AgentServicer(telemetry.link, store),
        "cna.v1.MigrationService": MigrationServicer(compute.incoming, compute.cold_incoming),
        "cna.v1.BackupService": BackupServicer(compute.backups),
        "cna.v1.ApplianceService": ApplianceServicer(compute.appliances),
    }
    server = AgentServer(config, servicers, on_call=rpc_on_call)

    agent = Agent(config, store, events, runner, hypervisor, host, server)
    network_loop: list[asyncio.Task[None]] = []

    async def start_network() -> None:
        # Applying at after_start keeps a slow or absent OVSDB from delaying the gRPC server:
        # the VRM can see the host and read the drift while OVS is being fixed. NIC bindings
        # from now on wait for that first apply (a bridge it makes may not exist yet).
        network.service.expect_initial_apply()
        network_loop.append(asyncio.get_running_loop().create_task(
            _network_loop(network.service, config.network.reconcile_interval_s), name="network-reconcile"))

    async def stop_network() -> None:
        await cancel_and_wait(network_loop[0] if network_loop else None)
        await network.service.close()

    agent.after_start = [("network", start_network), ("reconcile", compute.start_reconcile), ("vrm", telemetry.start)]
    agent.stops = [("vrm", telemetry.stop), ("compute", compute.stop), ("network", stop_network), ("storage", storage.stop)]
    await events.publish(
        "agent.started", resource_kind="agent", resource_name=platform.node(),
        message=f"cna-agent {__version__} started", attributes={
            "version": __version__, "libvirt_uri": uri, "virt_type": virt_type, "recovered_operations": len(recovered),
        },
    )
    return agent


async def _network_loop(network: NetworkService, interval_s: float) -> None:
    """Apply the declared networks once (and repair every port), then repair the declared
    bridges every ``interval_s`` (0 = once). The VMs' ports are repaired per VM by compute's
    reconcile, which runs network's port check."""
    try:
        await network.apply_declared()
    except Exception:
        log.exception("event=network.apply_crashed")
    while interval_s > 0:
        await asyncio.sleep(interval_s)
        try:
            await network.reconcile(repair=True, ports=False)
        except Exception:  # keep the loop alive; the next pass retries
            log.exception("event=network.reconcile_crashed")
