"""Placement's plug into the daemon: a HostPlacer built from the probed topology, and the
drift monitor comparing placed VMs' real threads/memory with their plans.

Started before compute (COMPONENT_MODULES order) so compute finds it as the "placement"
component when it plans dedicated-CPU and hugepage VMs. The drift monitor starts in
``after_start`` (compute exists by then) and finds VMs through compute's service at call
time. This component also registers the HostService servicer with the monitor attached, so
``GetPlacement`` answers (the daemon's plain HostServicer is replaced, same other RPCs).

Config (read with defaults so older config files keep working): ``[host]
placement_check_interval_s`` (60; 0 = no periodic check) and ``placement_repair`` (false:
report drift only; true: re-pin drifted threads as planned).
"""

from __future__ import annotations

import logging

from cna_agent.component import AgentContext, Component
from cna_agent.host.cpulist import parse_cpulist
from cna_agent.host.drift import PlacementMonitor, compute_locator
from cna_agent.host.placement import Planner
from cna_agent.host.placer import HostPlacer

log = logging.getLogger(__name__)


async def start(ctx: AgentContext) -> Component:
    from cna_agent.api.host import HostServicer

    caps = await ctx.host.capabilities()
    planner = Planner(caps.topology, reserved_cpus=parse_cpulist(ctx.config.host.reserved_cpus))
    placer = HostPlacer(planner, ctx.store)
    restored = await placer.load()
    log.info("event=placement.ready restored=%d reserved_cpus=%s", restored, ctx.config.host.reserved_cpus or "-")

    async def locate(uuid: str) -> tuple[str, str, int]:
        compute = ctx.components.get("compute")
        if compute is None or compute.service is None:
            raise LookupError("compute is not running")
        return await compute_locator(compute.service)(uuid)

    monitor = PlacementMonitor(
        placer, ctx.events, locate,
        interval_s=float(getattr(ctx.config.host, "placement_check_interval_s", 60.0)),
        repair=bool(getattr(ctx.config.host, "placement_repair", False)),
        pool=ctx.host.pool,
    )

    async def after_start() -> None:
        monitor.start()

    return Component(
        name="placement",
        service=placer,
        servicers={"cna.v1.HostService": HostServicer(ctx.host, placement=monitor)},
        after_start=after_start,
        stop=monitor.stop,
    )
