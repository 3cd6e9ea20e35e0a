"""Compute's plug into the daemon: VmService, its gRPC servicer, events and recovery."""

from __future__ import annotations

import logging
import os
import platform

from cna_agent.component import AgentContext, Component
from cna_agent.compute.io_resume import IoErrorResumer
from cna_agent.compute.render import RenderContext
from cna_agent.compute.resolvers import parse_image_dirs
from cna_agent.compute.service import VmService

log = logging.getLogger(__name__)


async def _host_cpu(ctx: AgentContext) -> tuple[int, int]:
    """(logical CPUs, MHz) from libvirt's node info; fallbacks when it is unreachable."""
    try:
        info = await ctx.hypervisor.call(lambda c: c.getInfo(), timeout=10)
        return int(info[2]), int(info[3]) or 2000
    except Exception:
        return os.cpu_count() or 1, 2000


async def start(ctx: AgentContext) -> Component:
    from cna_agent import __version__
    from cna_agent.api.vm import VmServicer
    from cna_agent.api.vm_convert import snapshot_to_pb, vm_to_pb

    facts = ctx.hypervisor.facts
    cpus, mhz = await _host_cpu(ctx) if ctx.hypervisor.connected else (os.cpu_count() or 1, 2000)
    render_ctx = RenderContext(
        host_arch=facts.arch if facts else platform.machine(),
        virt_type=ctx.virt_type,
        state_dir=ctx.config.state.dir,
        run_dir=ctx.config.state.run_dir,
        qmp_fallback_dir=ctx.config.state.qmp_fallback_dir,
        console_listen=ctx.config.host.console_listen,
        host_cpu_mhz=mhz,
        agent_version=__version__,
    )
    service = VmService(
        ctx.hypervisor, ctx.runner, ctx.events, render_ctx, virt_type=ctx.virt_type, host_cpus=cpus,
        image_dirs=parse_image_dirs(ctx.config.compute.image_dirs), to_result=vm_to_pb, components=ctx.components,
    )
    service.snapshot_result = snapshot_to_pb
    await service.start()
    resumer = IoErrorResumer(service, interval_s=ctx.config.compute.io_error_check_interval_s,
                             enabled=ctx.config.compute.io_error_resume == "auto")
    service.monitor.on_io_error = resumer.kick
    await resumer.start()

    async def stop() -> None:
        await resumer.stop()
        await service.stop()
    return Component(
        name="compute",
        servicers={"cna.v1.VmService": VmServicer(service)},
        recovery_handlers={"vm.create": service.recover_create, "vm.start": service.recover_start,
                           "vm.shutdown": service.recover_shutdown, "vm.delete": service.recover_delete},
        service=service,
        stop=stop,
        pools=(resumer.executor,),
    )
