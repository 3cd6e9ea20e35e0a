"""``cna-agent``: the daemon entry point. Config -> wiring (cna_agent/wiring) -> serve;
signals, sd_notify.

systemd hears READY only once clients can be answered: the wiring has built and started every
subsystem and closed the operations a previous process left open, the server listens, and the
background loops run.
Start-up failures print one line naming the key at fault and exit non-zero, so
``systemctl status`` shows the cause without digging.
"""

from __future__ import annotations

import argparse
import asyncio
import faulthandler
import logging
import os
import signal
import sys

from cna_agent import __version__
from cna_agent.config import AgentConfig, ConfigError, load_config
from cna_agent.wiring import Agent, build_agent

log = logging.getLogger("cna_agent.daemon")

EXIT_CONFIG = 2
EXIT_STARTUP = 3


#: The longest a stop may take (the gRPC grace and the operations' wind-down are 5 s each).
STOP_DEADLINE_S = 20

async def serve(config: AgentConfig) -> int:
    from cna_agent.api.server import StartupError, preflight
    from cna_agent.sdnotify import SystemdNotifier, watchdog_loop

    notifier = SystemdNotifier()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        preflight(config)
        agent = await build_agent(config)
        await agent.server.start()
    except StartupError as exc:
        print(f"cna-agent: {exc}", file=sys.stderr)
        return EXIT_STARTUP
    except OSError as exc:
        print(f"cna-agent: cannot start: {exc}", file=sys.stderr)
        return EXIT_STARTUP
    await agent.start_background()
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
    # A stop that hangs (a component waiting on something that will not come) is ended here,
    # with every thread's stack on stderr (the journal), instead of by systemd's SIGKILL at
    # TimeoutStopSec with nothing said. The guests run on either way (KillMode=process).
    faulthandler.dump_traceback_later(STOP_DEADLINE_S, exit=True)
    notifier.stopping()
    watchdog.cancel()
    prune.cancel()
    await agent.server.set_serving(False)
    await agent.server.stop(grace=5)
    await agent.runner.shutdown(timeout=5)
    await agent.stop()
    faulthandler.cancel_dump_traceback_later()
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

    setup_logging(config.log.level, config.log.format, config.log.target)
    os.umask(0o077)
    try:
        return asyncio.run(serve(config))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
