"""A second, read-mostly QMP monitor on each guest: facts libvirt does not give, or gives badly.

libvirt owns each guest's main QMP monitor and must stay the only one changing QEMU's state
(DESIGN.md): a device_add or stop sent behind its back leaves its view of the domain wrong.
QEMU serves several monitors at once and sends events to each, so the agent adds its own
(a ``-chardev socket`` + ``-mon mode=control`` pair via ``<qemu:commandline>``) and talks to it
with qemu.qmp. Only the commands in :data:`ALLOWED_COMMANDS` pass; they are queries, or
measurements that change nothing libvirt tracks.

What comes this way, and why not from libvirt:

* ``query-status``: QEMU's own run state (``inmigrate``, ``postmigrate``, ``guest-panicked``,
  ``io-error``, ``watchdog``...), finer than libvirt's state/reason pairs.
* ``calc-dirty-rate`` / ``query-dirty-rate``: the guest's memory dirty rate, which decides
  whether a live migration can converge. libvirt only wraps it from 7.2 on and not in
  every binding; the agent needs it on every supported host.
* ``query-stats`` / ``query-stats-schemas``: QEMU's statistics interface (KVM vCPU exits,
  halt polling...), which libvirt does not surface for our version.
* ``GUEST_PANICKED`` events with the panic information the guest left (pvpanic / Hyper-V
  crash MSRs): libvirt reports "crashed" but drops most of the details.
* ``query-cpus-fast``, ``query-iothreads``, ``query-memory-size-summary``: thread ids and
  sizes as QEMU sees them, cross-checked by placement drift checks.
* ``query-blockstats``, ``query-block`` (disk sizes) and ``qom-get`` of the balloon's
  ``guest-stats``: the per-disk and guest-memory figures of the stats sampler
  (vm_counters.py), without a libvirt job and its second monitor round trip
  (query-named-block-nodes) per VM, and with the side channel's deadline instead of a libvirt
  thread held by a QEMU that does not answer.
* ``query-named-block-nodes``: the persistent dirty bitmaps QEMU holds on each image, from which
  a backup checkpoint whose libvirt metadata was lost is redefined (backup.py); libvirt has no
  call that lists them.

libvirt marks a domain using ``<qemu:commandline>`` as tainted ("custom-argv"); that is the
documented price of the side channel and is reported, not hidden.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
from pathlib import Path
from typing import Any, Awaitable, Callable, Mapping

from qemu.qmp import QMPClient
from qemu.qmp.error import QMPError

from cna_agent.errors import FailedPrecondition, InvalidArgument, Unavailable

log = logging.getLogger(__name__)

QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
CHARDEV_ID = "cnaqmp"

#: Commands the side channel may send. Nothing here changes state libvirt tracks.
ALLOWED_COMMANDS: frozenset[str] = frozenset({
    "query-status",
    "query-name",
    "query-uuid",
    "query-version",
    "query-kvm",
    "query-cpus-fast",
    "query-iothreads",
    "query-memory-size-summary",
    "query-balloon",
    "qom-get",
    "query-blockstats",
    "query-block",
    "query-named-block-nodes",
    "query-migrate",
    "query-dirty-rate",
    "calc-dirty-rate",
    "query-stats",
    "query-stats-schemas",
    "query-commands",
    "query-events",
})


#: sun_path is 108 bytes including the terminating NUL.
UNIX_PATH_MAX = 107
#: Where sockets go when the run directory is too deep for sun_path.
SHORT_SOCKET_ROOT = "/run/cna-qmp"


def socket_path(run_dir: str | os.PathLike[str], vm_uuid: str) -> Path:
    """Where a guest's side-channel socket lives (under the agent's run directory)."""
    return Path(run_dir) / "qmp" / f"{vm_uuid}.sock"


def monitor_socket_path(run_dir: str | os.PathLike[str], vm_uuid: str, *,
                        short_root: str | os.PathLike[str] = SHORT_SOCKET_ROOT) -> tuple[Path, bool]:
    """The socket path QEMU gets, and whether it is the short fallback.

    A unix socket path longer than sun_path (107 bytes) makes QEMU fail to start, so a run
    directory that deep gets ``<short_root>/<hash of run_dir>/<hash of uuid>.sock`` instead
    (``/run/cna-qmp`` by default, ``[state] qmp_fallback_dir``):
    deterministic (the agent finds it again after a restart), distinct per agent and per VM.
    Callers log the fallback (it is a configuration smell, not an error).
    """
    preferred = socket_path(run_dir, vm_uuid)
    if len(os.fsencode(str(preferred))) <= UNIX_PATH_MAX:
        return preferred, False
    agent = hashlib.sha256(os.fsencode(str(run_dir))).hexdigest()[:12]
    vm = hashlib.sha256(vm_uuid.encode()).hexdigest()[:16]
    return Path(short_root) / agent / f"{vm}.sock", True


def path_from_args(args: list[str]) -> str:
    """The side-channel socket path inside a domain's <qemu:commandline> ("" when absent)."""
    for i, arg in enumerate(args):
        if arg == "-chardev" and i + 1 < len(args) and f"id={CHARDEV_ID}," in args[i + 1] + ",":
            for part in args[i + 1].split(","):
                if part.startswith("path="):
                    return part[len("path="):]
    return ""


def commandline_args(path: str | os.PathLike[str]) -> list[str]:
    """The QEMU arguments adding the agent's monitor, for the domain's <qemu:commandline>.

    ``server=on,wait=off``: QEMU listens and does not wait for the agent, so a guest starts and
    runs whether or not the agent is up (an agent restart must never stall a guest).
    """
    spath = str(path)
    if "," in spath:
        # QEMU option syntax would split the path at the comma.
        raise InvalidArgument("qmp.socket", f"{spath!r} contains a comma, which QEMU's option parser cannot take")
    return [
        "-chardev", f"socket,id={CHARDEV_ID},path={spath},server=on,wait=off",
        "-mon", f"chardev={CHARDEV_ID},mode=control",
    ]


class _Client(QMPClient):
    """qemu.qmp's client, minus its eager message formatting.

    qemu.qmp logs every message as ``logger.debug("<-- %s", str(msg))``: the pretty-printed
    JSON (``json.dumps(indent=2)``, Python's slow encoder) is built whether or not debug is on.
    The stats collector sends a query to every running guest each sample; that formatting was
    most of the agent's CPU per command. Formatted here only when the logger would print it.
    """

    def _cb_outbound(self, msg: Any) -> Any:
        if self.logger.isEnabledFor(logging.DEBUG):
            self.logger.debug("--> %s", str(msg))
        return msg

    def _cb_inbound(self, msg: Any) -> Any:
        if self.logger.isEnabledFor(logging.DEBUG):
            self.logger.debug("<-- %s", str(msg))
        return msg


class QmpSideChannel:
    """A connection to one guest's side-channel monitor."""

    def __init__(self, path: str | os.PathLike[str], *, name: str = "cna-qmp", timeout: float = 10.0) -> None:
        self.path = str(path)
        self._client = _Client(name)
        self._timeout = timeout
        self._event_task: asyncio.Task[None] | None = None

    async def connect(self) -> None:
        if not os.path.exists(self.path):
            raise Unavailable(f"the guest's side-channel monitor {self.path} does not exist (guest not running, or defined without it)")
        try:
            await asyncio.wait_for(self._client.connect(self.path), self._timeout)
        except (OSError, QMPError, asyncio.TimeoutError) as exc:
            raise Unavailable(f"cannot connect to the side-channel monitor {self.path}: {exc!r}") from None

    async def execute(self, command: str, arguments: Mapping[str, Any] | None = None) -> Any:
        """Run an allowlisted command; anything else is refused before it reaches QEMU."""
        if command not in ALLOWED_COMMANDS:
            raise FailedPrecondition(
                f"QMP command {command!r} is not allowed on the side channel: libvirt owns state changes",
                field="command",
            )
        try:
            return await asyncio.wait_for(self._client.execute(command, dict(arguments or {})), self._timeout)
        except asyncio.TimeoutError:
            raise Unavailable(f"QMP {command} did not answer within {self._timeout:.0f}s") from None
        except QMPError as exc:
            raise Unavailable(f"QMP {command} failed: {exc}") from None

    async def status(self) -> dict[str, Any]:
        return await self.execute("query-status")

    async def dirty_rate(self, seconds: int = 1) -> dict[str, Any]:
        """Measure the guest's memory dirty rate (MiB/s) over ``seconds``."""
        if not 1 <= seconds <= 60:
            raise InvalidArgument("seconds", f"{seconds} is not in 1..60")
        await self.execute("calc-dirty-rate", {"calc-time": seconds})
        deadline = asyncio.get_running_loop().time() + seconds + self._timeout
        while True:
            result = await self.execute("query-dirty-rate")
            if result.get("status") == "measured":
                return result
            if asyncio.get_running_loop().time() > deadline:
                raise Unavailable("dirty-rate measurement did not finish in time")
            await asyncio.sleep(0.2)

    def follow_events(self, handler: Callable[[str, dict[str, Any]], Awaitable[None]]) -> None:
        """Call ``handler(name, data)`` for every QMP event until disconnect."""

        async def pump() -> None:
            async for event in self._client.events:
                try:
                    await handler(event["event"], dict(event.get("data", {})))
                except Exception:
                    log.exception("event=qmp.event_handler_failed path=%s", self.path)

        self._event_task = asyncio.get_running_loop().create_task(pump(), name=f"qmp-events-{self.path}")

    async def close(self) -> None:
        if self._event_task is not None:
            self._event_task.cancel()
        try:
            await self._client.disconnect()
        except (QMPError, OSError):
            pass
