"""``cna-agent``: the daemon entry point. Config -> wiring -> serve; signals, sd_notify.

Start-up order matters for restarts (DESIGN.md "Restart adopts, never redoes"): the state
database opens first, operations a previous process left open are closed by recovery (never
re-run), then the server starts and systemd hears READY only once clients can be answered.
Start-up failures print one line naming the key at fault and exit non-zero, so
``systemctl status`` shows the cause without digging.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import importlib.util
import logging
import os
import platform
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

from cna_agent import __version__
from cna_agent.component import COMPONENT_MODULES, AgentContext
from cna_agent.config import AgentConfig, ConfigError, load_config

log = logging.getLogger("cna_agent.daemon")

EXIT_CONFIG = 2
EXIT_STARTUP = 3


@dataclass
class Agent:
    """Everything the running agent holds; built by :func:`build_agent`, torn down in reverse."""

    config: AgentConfig
    store: object
    events: object
    runner: object
    hypervisor: object | None
    host: object
    server: object
    context: object = None


#: Deadline of the KVM probe (a firmware test boot of at most 10 s, plus QEMU start and kill).
KVM_PROBE_TIMEOUT_S = 60.0


async def resolve_virt_type(config: AgentConfig, hypervisor, state_dir: Path, *, pool):
    """The KVM verdict and virt_type; the probe runs in ``pool`` (the shared host pool)."""
    from cna_agent.host.kvmprobe import KvmVerdict, probe_kvm

    facts = hypervisor.facts if hypervisor is not None else None
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


async def build_agent(config: AgentConfig):
    from cna_agent.api.events import EventServicer
    from cna_agent.api.host import HostServicer
    from cna_agent.api.operations import OperationsServicer
    from cna_agent.api.server import AgentServer
    from cna_agent.hypervisor import Hypervisor, choose_uri
    from cna_agent.host.service import HostService, host_pool
    from cna_agent.operations import OperationRunner
    from cna_agent.state.eventlog import EventHub, EventLog
    from cna_agent.state.journal import OperationJournal
    from cna_agent.state.store import StateStore

    state_dir = Path(config.state.dir)
    for d in (state_dir, Path(config.state.run_dir)):
        d.mkdir(parents=True, exist_ok=True, mode=0o700)
    store = StateStore(state_dir / "agent.db")
    events = EventHub(store, EventLog(store, retention=config.state.event_retention))
    runner = OperationRunner(store, OperationJournal(store), events, retention_s=config.state.operation_retention_days * 86400)

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

    ctx = AgentContext(config, store, events, runner, hypervisor, host, virt_type, kvm)
    ctx.pools.extend((store.pool, hypervisor.pool, pool))
    servicers: dict[str, object] = {
        "cna.v1.HostService": HostServicer(host),
        "cna.v1.OperationsService": OperationsServicer(runner),
        "cna.v1.EventService": EventServicer(events),
    }
    recovery: dict[str, object] = {}
    for module_name in COMPONENT_MODULES:
        if importlib.util.find_spec(module_name) is None:
            continue
        component = await importlib.import_module(module_name).start(ctx)
        ctx.components[component.name] = component
        ctx.pools.extend(component.pools)
        servicers.update(component.servicers)
        recovery.update(component.recovery_handlers)
        log.info("event=component.started name=%s services=%s", component.name, ",".join(component.servicers) or "-")

    recovered = await runner.recover(recovery)
    from cna_agent.metrics import rpc_on_call

    server = AgentServer(config, servicers, on_call=rpc_on_call)
    await events.publish(
        "agent.started", resource_kind="agent", resource_name=platform.node(),
        message=f"cna-agent {__version__} started", attributes={
            "version": __version__, "libvirt_uri": uri, "virt_type": virt_type, "recovered_operations": len(recovered),
        },
    )
    return Agent(config, store, events, runner, hypervisor, host, server, ctx)


async def serve(config: AgentConfig) -> int:
    from cna_agent.api.server import StartupError
    from cna_agent.sdnotify import SystemdNotifier, watchdog_loop

    notifier = SystemdNotifier()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        agent = await build_agent(config)
        await agent.server.start()
    except StartupError as exc:
        print(f"cna-agent: {exc}", file=sys.stderr)
        return EXIT_STARTUP
    except OSError as exc:
        print(f"cna-agent: cannot start: {exc}", file=sys.stderr)
        return EXIT_STARTUP
    for component in agent.context.components.values():
        if component.after_start is not None:
            await component.after_start()
    await agent.server.set_serving(True)
    listen = ", ".join(filter(None, [config.grpc.listen and f"tcp {config.grpc.listen}", config.grpc.unix_socket and f"unix {config.grpc.unix_socket}"]))
    log.info("event=agent.ready version=%s listen=%r tls=%s", __version__, listen, config.tls.enabled)
    notifier.ready(status=f"serving on {listen}")

    async def healthy() -> bool:
        # The ping proves the event loop and the state database both still answer.
        try:
            await asyncio.wait_for(agent.store.run(agent.store.query, "SELECT 1"), timeout=5)
            return True
        except Exception:
            return False

    watchdog = loop.create_task(watchdog_loop(notifier, healthy), name="sd-watchdog")
    prune = loop.create_task(_housekeeping(agent), name="housekeeping")
    await stop.wait()
    log.info("event=agent.stopping")
    notifier.stopping()
    watchdog.cancel()
    prune.cancel()
    await agent.server.set_serving(False)
    await agent.server.stop(grace=5)
    await agent.runner.shutdown(timeout=5)
    for component in reversed(list(agent.context.components.values())):
        if component.stop is not None:
            try:
                await component.stop()
            except Exception:
                log.exception("event=component.stop_failed name=%s", component.name)
    if agent.hypervisor is not None:
        await agent.hypervisor.stop()
    agent.host.pool.shutdown()
    await agent.events.close()
    agent.store.close()
    log.info("event=agent.stopped")
    return 0


async def _housekeeping(agent: Agent) -> None:
    while True:
        try:
            n = await agent.runner.prune()
            if n:
                log.info("event=journal.pruned operations=%d", n)
        except Exception:
            log.exception("event=journal.prune_failed")
        await asyncio.sleep(3600)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cna-agent", description="Compute node agent for KVM clouds.")
    p.add_argument("--version", action="version", version=f"cna-agent {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    s = sub.add_parser("serve", help="run the agent (what the systemd unit starts)")
    s.add_argument("--config", "-c", default=None, help="config file (default /etc/cna-agent/agent.toml)")
    c = sub.add_parser("check-config", help="validate the configuration and print the effective values")
    c.add_argument("--config", "-c", default=None, help="config file (default /etc/cna-agent/agent.toml)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command is None:
        _parser().print_help(sys.stderr)
        return EXIT_CONFIG
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"cna-agent: configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if args.command == "check-config":
        try:
            from cna_agent.api.server import StartupError, read_tls

            read_tls(config)
        except StartupError as exc:
            print(f"cna-agent: configuration error: {exc}", file=sys.stderr)
            return EXIT_CONFIG
        print(f"# sources: {', '.join(config.sources) or '(defaults only)'}")
        print(config.to_toml(), end="")
        return 0
    from cna_agent.logs import setup_logging

    setup_logging(config.log.level, config.log.format)
    os.umask(0o077)
    try:
        return asyncio.run(serve(config))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
