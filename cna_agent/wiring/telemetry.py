"""Telemetry: the VRM link, the stats sampler and the metrics endpoint.

All three start once the node API serves (so a VRM that calls back right after registration
is answered) and are optional: no [vrm] address and no [metrics] listen means no sampler
either. None of them can stop the agent: the link retries forever, the sampler logs failed
samples, and a metrics port that cannot be bound is logged, not fatal (the VRM's view of the
host matters more than a scraper's).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from cna_agent.blocking import BlockingPool
from cna_agent.config import AgentConfig
from cna_agent.host.service import HostService
from cna_agent.hypervisor import Hypervisor
from cna_agent.state.eventlog import EventHub
from cna_agent.state.store import StateStore
from cna_agent.vrm.link import VrmLink
from cna_agent.vrm.stats import Collect, StatsSampler

log = logging.getLogger(__name__)


@dataclass
class Telemetry:
    config: AgentConfig
    link: VrmLink
    sampler: StatsSampler
    metrics: Any = None

    async def start(self) -> None:
        if self.link.enabled or self.metrics is not None:
            self.sampler.start()
        if self.metrics is not None:
            try:
                self.metrics.start()
            except OSError as exc:
                log.error("event=metrics.unavailable listen=%s error=%r", self.config.metrics.listen, str(exc))
                self.metrics = None
        await self.link.start()

    async def stop(self) -> None:
        await self.link.stop()
        await self.sampler.stop()
        if self.metrics is not None:
            self.metrics.stop()


def build_telemetry(config: AgentConfig, hypervisor: Hypervisor, host: HostService, store: StateStore,
                    events: EventHub, pools: list[BlockingPool], collect: Collect | None = None) -> Telemetry:
    """``collect``: compute's VM counters (VmCounters.collect); None, or ``[stats] vm_sources =
    "libvirt"``, samples with libvirt's bulk call alone."""
    from cna_agent import __version__
    from cna_agent.api import pb
    from cna_agent.api.host import capabilities_to_pb, stats_to_pb
    from cna_agent.metrics import AgentCollector, MetricsEndpoint, build_registry
    from cna_agent.vrm.convert import vm_stats_to_pb
    from cna_agent.vrm.stats import parse_groups

    timeout = min(config.libvirt.call_timeout_s, max(5.0, config.stats.interval_s * 3))
    sampler = StatsSampler(lambda fn: hypervisor.call(fn, timeout=timeout), interval_s=config.stats.interval_s,
                           groups=parse_groups(config.stats.vm_stats), host_stats=host.stats,
                           collect=collect if config.stats.vm_sources == "host" else None)

    async def register_request() -> Any:
        caps = await host.capabilities()
        endpoint = config.vrm.endpoint or config.grpc.listen
        return pb.vrm_pb2.RegisterRequest(
            host_uuid=config.vrm.host_uuid or caps.host_uuid, hostname=caps.hostname, agent_version=__version__,
            endpoint=endpoint, capabilities=capabilities_to_pb(caps),
        )

    async def heartbeat() -> Any:
        latest = sampler.latest_host
        if latest is None:
            latest = sampler.latest_host = await host.stats()
        snap = sampler.latest
        beat = pb.vrm_pb2.Heartbeat(host=stats_to_pb(latest))
        if snap is not None:
            beat.vms.extend(vm_stats_to_pb(v) for v in snap.vms)
            beat.stats_interval_seconds = snap.interval_s
        return beat

    link = VrmLink(config.vrm, store=store, events=events, register_request=register_request, heartbeat=heartbeat)
    metrics = None
    if config.metrics.listen:
        registry = build_registry(AgentCollector(sampler=sampler, link=link, store=store, events=events, pools=pools))
        metrics = MetricsEndpoint(config.metrics.listen, registry)
    if link.enabled and not (config.vrm.endpoint or config.grpc.listen):
        log.warning("event=vrm.no_endpoint why=%r", "grpc.listen and vrm.endpoint are empty: the VRM cannot call this host back")
    return Telemetry(config, link, sampler, metrics)
