"""Placement's plug into the daemon: a HostPlacer built from the probed topology.

Started before compute (COMPONENT_MODULES order) so compute finds it as the "placement"
component when it plans dedicated-CPU and hugepage VMs.
"""

from __future__ import annotations

import logging

from cna_agent.component import AgentContext, Component
from cna_agent.host.cpulist import parse_cpulist
from cna_agent.host.placement import Planner
from cna_agent.host.placer import HostPlacer

log = logging.getLogger(__name__)


async def start(ctx: AgentContext) -> Component:
    caps = await ctx.host.capabilities()
    planner = Planner(caps.topology, reserved_cpus=parse_cpulist(ctx.config.host.reserved_cpus))
    placer = HostPlacer(planner, ctx.store)
    restored = await placer.load()
    log.info("event=placement.ready restored=%d reserved_cpus=%s", restored, ctx.config.host.reserved_cpus or "-")
    return Component(name="placement", service=placer)
