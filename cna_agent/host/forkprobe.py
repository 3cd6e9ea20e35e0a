"""Can a child this agent forks enter another mount namespace?

Why this exists: with the embedded driver, libvirt runs inside the agent's process, and to give
each QEMU its private ``/dev`` (qemu.conf ``namespaces``) it forks a helper that ``setns()``-es
into the new guest's mount namespace to create the device nodes there (``/dev/kvm``, block
devices, ``/dev/net/tun``). The kernel refuses that with EINVAL when the caller shares its
filesystem context with another thread, i.e. when the forked helper has threads. gRPC's
event-engine thread pool restarts its threads inside every forked child from a
``pthread_atfork`` handler; newer grpcio only does so with fork support enabled
(``cna_agent/__init__.py`` turns it off), but Debian 12's python3-grpcio 1.51 registers the
handler unconditionally. There every KVM guest failed to start with "Unable to enter mount
namespace: Invalid argument" (seen in the packaged agent on a Debian node).

The probe reproduces exactly that step in a fresh interpreter with the agent's grpc and the
agent's environment: start a gRPC aio server (the thread pool the agent will have), fork, and
in the child ``setns()`` into its own mount namespace. ~0.1 s; run only when the agent seeds the
embedded root's qemu.conf.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from dataclasses import dataclass

_PROBE = r"""
import asyncio, ctypes, json, os
import grpc

async def main():
    server = grpc.aio.server()
    server.add_insecure_port("127.0.0.1:0")
    await server.start()
    libc = ctypes.CDLL(None, use_errno=True)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            fd = os.open("/proc/self/ns/mnt", os.O_RDONLY)
            err = 0 if libc.setns(fd, 0) == 0 else ctypes.get_errno()
        except OSError as exc:
            err = exc.errno or -1
        with open("/proc/self/status") as fh:
            threads = next(int(line.split()[1]) for line in fh if line.startswith("Threads:"))
        os.write(w, json.dumps({"setns_errno": err, "threads": threads}).encode())
        os._exit(0)
    os.close(w)
    os.waitpid(pid, 0)
    print(json.dumps({**json.loads(os.read(r, 256) or b"{}"), "grpc": grpc.__version__}))
    await server.stop(None)

asyncio.run(main())
"""


@dataclass(frozen=True)
class ForkVerdict:
    #: A forked child entered a mount namespace (or the probe could not tell: libvirt's default
    #: stays, and ``reason`` says why).
    can_setns: bool
    reason: str
    threads_in_child: int = 0
    grpc_version: str = ""


def probe_forked_setns(timeout: float = 30.0) -> ForkVerdict:
    """Run the probe in a child interpreter (never in the agent: forking the agent itself is
    what is being judged, and its gRPC server does not exist yet when the root is seeded)."""
    # The child inherits the agent's environment, GRPC_ENABLE_FORK_SUPPORT=0 included (set by
    # cna_agent/__init__.py, which every import of this module has run).
    try:
        proc = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return ForkVerdict(True, f"fork probe did not run: {exc}")
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        return ForkVerdict(True, f"fork probe failed (rc={proc.returncode}): {proc.stderr.strip()[-300:]}")
    try:
        seen = json.loads(lines[-1])
        err, threads, version = int(seen["setns_errno"]), int(seen["threads"]), str(seen["grpc"])
    except (ValueError, KeyError, TypeError):
        return ForkVerdict(True, f"fork probe gave {lines[-1]!r}")
    if err == 0:
        return ForkVerdict(True, "a forked child enters a mount namespace", threads, version)
    if err != errno.EINVAL:
        # EPERM: not privileged, and libvirt uses no namespaces for an unprivileged driver anyway.
        return ForkVerdict(True, f"not judged: setns() in the child: {os.strerror(err)}", threads, version)
    return ForkVerdict(False, f"a forked child has {threads} threads (grpcio {version} restarts its thread pool "
                              f"after fork) and setns() fails: {os.strerror(err)}", threads, version)
