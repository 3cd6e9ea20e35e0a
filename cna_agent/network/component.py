"""The network subsystem's plug into the daemon: NetworkService, its servicer, reconcile loop.

After start (recovery done, serving), the declared networks are (re)applied and every VM's
NICs reconciled; then a periodic pass repeats the comparison ([network] reconcile_interval_s).
Applying at after_start rather than in start() keeps a slow or absent OVSDB from delaying the
gRPC server: the VRM can see the host and read the drift while OVS is being fixed.
"""

from __future__ import annotations

import asyncio
import logging

from cna_agent.component import AgentContext, Component
from cna_agent.network.service import NetworkOperations, NetworkService

log = logging.getLogger(__name__)


async def start(ctx: AgentContext) -> Component:
    from cna_agent.api.network import TO_PB, NetworkServicer

    cfg = ctx.config.network
    service = NetworkService(
        ovsdb=cfg.ovsdb, ovsdb_timeout_s=cfg.ovsdb_timeout_s, netlink_threads=cfg.netlink_threads,
        state_dir=ctx.config.state.dir, events=ctx.events,
        hypervisor=ctx.hypervisor, runner=ctx.runner, components=ctx.components,
        config_bridges=cfg.bridges, config_port_groups=cfg.port_groups,
    )
    ops = NetworkOperations(service, ctx.runner, TO_PB)
    tasks: list[asyncio.Task[None]] = []

    async def periodic() -> None:
        while True:
            await asyncio.sleep(cfg.reconcile_interval_s)
            try:
                await service.reconcile(repair=True)
            except Exception:  # keep the loop alive; the next pass retries
                log.exception("event=network.reconcile_crashed")

    async def after_start() -> None:
        async def first() -> None:
            try:
                await service.apply_declared()
            except Exception:
                log.exception("event=network.apply_crashed")
            if cfg.reconcile_interval_s > 0:
                await periodic()

        tasks.append(asyncio.get_running_loop().create_task(first(), name="network-reconcile"))

    async def stop() -> None:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await service.close()

    return Component(
        name="network",
        servicers={"cna.v1.NetworkService": NetworkServicer(service, ops)},
        service=service,
        after_start=after_start,
        stop=stop,
        pools=(service.ovs.pool, service.netlink_pool),
    )
