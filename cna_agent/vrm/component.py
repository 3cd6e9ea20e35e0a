"""Telemetry's plug into the daemon: the VRM link, the stats sampler and the metrics endpoint.

All three start in ``after_start`` (once the node API serves, so a VRM that calls back right
after registration is answered) and are optional: no [vrm] address and no [metrics] listen
means no sampler either. None of them can stop the agent: the link retries forever, the
sampler logs failed samples, and a metrics port that cannot be bound is logged, not fatal
(the VRM's view of the host matters more than a scraper's).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from cna_agent.component import AgentContext, Component

log = logging.getLogger(__name__)


@dataclass
class Telemetry:
    """What other components (and tests) can reach as ``ctx.components["vrm"].service``."""

    link: Any
    sampler: Any
    metrics: Any = None


async def start(ctx: AgentContext) -> Component:
    from cna_agent import __version__
    from cna_agent.api import pb
    from cna_agent.api.agent import AgentServicer
    from cna_agent.api.host import capabilities_to_pb, stats_to_pb
    from cna_agent.metrics import AgentCollector, MetricsEndpoint, build_registry
    from cna_agent.vrm.convert import vm_stats_to_pb
    from cna_agent.vrm.link import VrmLink
    from cna_agent.vrm.stats import StatsSampler, parse_groups

    cfg = ctx.config
    timeout = min(cfg.libvirt.call_timeout_s, max(5.0, cfg.stats.interval_s * 3))
    sampler = StatsSampler(lambda fn: ctx.hypervisor.call(fn, timeout=timeout), interval_s=cfg.stats.interval_s,
                           groups=parse_groups(cfg.stats.vm_stats), host_stats=ctx.host.stats)

    async def register_request() -> Any:
        caps = await ctx.host.capabilities()
        endpoint = cfg.vrm.endpoint or cfg.grpc.listen
        return pb.vrm_pb2.RegisterRequest(
            host_uuid=cfg.vrm.host_uuid or caps.host_uuid, hostname=caps.hostname, agent_version=__version__,
            endpoint=endpoint, capabilities=capabilities_to_pb(caps),
        )

    async def heartbeat() -> Any:
        host = sampler.latest_host
        if host is None:
            host = sampler.latest_host = await ctx.host.stats()
        snap = sampler.latest
        beat = pb.vrm_pb2.Heartbeat(host=stats_to_pb(host))
        if snap is not None:
            beat.vms.extend(vm_stats_to_pb(v) for v in snap.vms)
            beat.stats_interval_seconds = snap.interval_s
        return beat

    link = VrmLink(cfg.vrm, store=ctx.store, events=ctx.events, register_request=register_request, heartbeat=heartbeat)
    metrics = None
    if cfg.metrics.listen:
        registry = build_registry(AgentCollector(sampler=sampler, link=link, store=ctx.store, events=ctx.events,
                                                  pools=ctx.pools))
        metrics = MetricsEndpoint(cfg.metrics.listen, registry)
    if link.enabled and not (cfg.vrm.endpoint or cfg.grpc.listen):
        log.warning("event=vrm.no_endpoint why=%r", "grpc.listen and vrm.endpoint are empty: the VRM cannot call this host back")
    telemetry = Telemetry(link, sampler, metrics)

    async def after_start() -> None:
        if link.enabled or metrics is not None:
            sampler.start()
        if metrics is not None:
            try:
                metrics.start()
            except OSError as exc:
                log.error("event=metrics.unavailable listen=%s error=%r", cfg.metrics.listen, str(exc))
                telemetry.metrics = None
        await link.start()

    async def stop() -> None:
        await link.stop()
        await sampler.stop()
        if telemetry.metrics is not None:
            telemetry.metrics.stop()

    return Component(
        name="vrm",
        servicers={"cna.v1.AgentService": AgentServicer(link, ctx.store)},
        service=telemetry,
        after_start=after_start,
        stop=stop,
    )
