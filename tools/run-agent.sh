#!/usr/bin/env bash
# Set everything up (tools/setup.sh), then run the agent in the foreground, as systemd would
# but with logs on this terminal. Uses /etc/cna-agent/agent.toml when it exists, otherwise all
# defaults: gRPC on 127.0.0.1:7443 and /run/cna-agent/cna-agent.sock, state in
# /var/lib/cna-agent, libvirt's embedded QEMU driver when no libvirtd runs.
# From another terminal:  .venv/bin/cna-ctl host info
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
"$repo/tools/setup.sh"
exec "$repo/.venv/bin/cna-agent" serve "$@"
