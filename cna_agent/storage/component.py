"""Storage's plug into the daemon: StorageService, its servicer, the datastore monitor.

Started after compute (COMPONENT_MODULES order), so compute's VmService finds this service as
its DiskResolver through ``ctx.components["storage"].service`` and this service finds compute's
VMs (used_by, in-use checks) the same way.
"""

from __future__ import annotations

import logging

from cna_agent.component import AgentContext, Component
from cna_agent.storage.executor import StorageExecutor
from cna_agent.storage.runner import SubprocessRunner
from cna_agent.storage.secrets import LibvirtSecrets
from cna_agent.storage.service import ResultFactories, StorageService

log = logging.getLogger(__name__)


async def start(ctx: AgentContext) -> Component:
    from cna_agent.api.storage import StorageServicer, datastore_to_pb, volume_to_pb
    from cna_agent.host.service import read_iscsi_iqn
    from cna_agent.storage.san import backends_for

    cfg = ctx.config.storage
    runner = SubprocessRunner()
    executor = StorageExecutor(cfg.executor_threads, cfg.command_timeout_s)
    service = StorageService(
        cfg.datastores, runner, executor, ctx.runner, ctx.events,
        command_timeout=cfg.command_timeout_s, probe_interval=cfg.probe_interval_s, probe_timeout=cfg.probe_timeout_s,
        initiator_iqn=read_iscsi_iqn(), secrets=LibvirtSecrets(ctx.hypervisor),
        san_backends=backends_for(cfg.datastores, runner), components=ctx.components,
        results=ResultFactories(volume=volume_to_pb, datastore=datastore_to_pb),
    )
    await service.start()
    log.info("event=storage.started datastores=%d threads=%d", len(cfg.datastores), cfg.executor_threads)
    return Component(
        name="storage",
        servicers={"cna.v1.StorageService": StorageServicer(service, ctx.components)},
        service=service,
        stop=service.stop,
        pools=(executor,),
    )
