"""``cna-ctl``: the admin's debug CLI, talking to the local agent over its unix socket.

Reads like virsh / vdsm-client: ``cna-ctl host info``, ``cna-ctl ops list``; aligned tables by
default, ``--json`` for scripts. Exit codes scripts can test: 0 ok, 1 the agent refused or
failed the request, 2 bad usage, 69 (EX_UNAVAILABLE) the agent is not reachable.

Each command group lives in its own module with a ``register(subparsers, common)`` function;
add a group by listing its module in COMMAND_MODULES.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from cna_agent import __version__
from cna_agent.cli.common import DEFAULT_SOCKET, EXIT_OK, CliError, Client

COMMAND_MODULES: tuple[str, ...] = (
    "cna_agent.cli.host",
    "cna_agent.cli.ops",
    "cna_agent.cli.events",
    "cna_agent.cli.vm",
    "cna_agent.cli.datastore",
    "cna_agent.cli.volume",
    "cna_agent.cli.appliance",
    "cna_agent.cli.net",
    "cna_agent.cli.vrm",
)


def build_parser() -> argparse.ArgumentParser:
    # --json is accepted before or after the command; the subcommands' copy must not reset a
    # global --json to False, hence SUPPRESS there.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="machine-readable JSON output")
    p = argparse.ArgumentParser(prog="cna-ctl", description="Debug CLI for the local cna-agent.")
    p.add_argument("--json", action="store_true", help="machine-readable JSON output")
    p.add_argument("--socket", default=os.environ.get("CNA_CTL_SOCKET", DEFAULT_SOCKET),
                   help=f"agent unix socket (default {DEFAULT_SOCKET}, or $CNA_CTL_SOCKET)")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for an answer (default 30)")
    p.add_argument("--version", action="version", version=f"cna-ctl {__version__}")
    sub = p.add_subparsers(dest="group", metavar="GROUP", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub, common)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        client = Client(args.socket, args.timeout)
        out = args.func(client, args)
        if out is not None:
            print(out)
        return EXIT_OK
    except CliError as exc:
        print(f"cna-ctl: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
