"""A dependency-free sd_notify(3) client and an asyncio watchdog loop.

Why our own: the protocol is one AF_UNIX datagram of ``KEY=VALUE`` lines, and the agent needs
exact control over three things libraries get wrong or hide: it must never fail or block for
long because systemd is absent or slow (tests, containers, a manual ``cna-agent serve``); the
watchdog must be tied to the agent's health rather than to a timer thread; and RELOADING=1 must
carry MONOTONIC_USEC= (systemd >= 253 requires it).

Usage in the daemon::

    notifier = SystemdNotifier()
    notifier.status("reconciling domains")
    wd = asyncio.create_task(watchdog_loop(notifier, healthy=agent.is_healthy))
    ...                                  # reconcile, start serving
    notifier.ready(status="serving")
    ...
    notifier.stopping()

Without ``NOTIFY_SOCKET`` every call is a silent no-op that returns False.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import re
import socket
import time
from collections.abc import Awaitable, Callable, Mapping

__all__ = ["SystemdNotifier", "watchdog_loop"]

log = logging.getLogger(__name__)

_KEY_RE = re.compile(r"[A-Z0-9_]+")

#: Watchdog pings go out at this fraction of WATCHDOG_USEC; sd_watchdog_enabled(3) recommends
#: half, which leaves one whole ping of slack for a busy event loop.
_PING_FRACTION = 0.5


def _socket_address(value: str | None) -> bytes | None:
    """Turn a NOTIFY_SOCKET value into a sockaddr_un path, or None when unusable.

    "/path" is a filesystem socket, "@name" a Linux abstract socket (leading NUL). Anything else
    (relative paths, systemd >= 253's "vsock:" form for VMs) is not something this host agent
    is ever handed, so it is treated as "no socket" rather than guessed at.
    """
    if not value:
        return None
    if value.startswith("/"):
        return os.fsencode(value)
    if value.startswith("@") and len(value) > 1:
        return b"\0" + os.fsencode(value[1:])
    log.debug("sd_notify unsupported NOTIFY_SOCKET=%r, notifications disabled", value)
    return None


class SystemdNotifier:
    """Send state changes and watchdog pings to the service manager.

    The environment is read once, at construction (``environ`` defaults to ``os.environ``), so a
    later change to the process environment does not redirect messages. Nothing is removed from
    the environment unless ``unset_environment=True``: children such as helpers or embedded
    QEMU that inherit NOTIFY_SOCKET are already ignored by systemd under ``NotifyAccess=main``,
    and an unset is irreversible for the rest of the process.

    Sending never raises: a notification that cannot be delivered is logged at debug level and
    reported by a False return value, because a missing or busy service manager must never take
    the agent down. Invalid field names do raise ValueError, since they are programming errors
    and should fail the unit tests, not vanish in production.
    """

    def __init__(
        self,
        environ: Mapping[str, str] | None = None,
        *,
        unset_environment: bool = False,
        send_timeout: float = 2.0,
    ) -> None:
        env = os.environ if environ is None else environ
        self._socket_name: str | None = env.get("NOTIFY_SOCKET") or None
        self._address = _socket_address(self._socket_name)
        self._watchdog_usec = env.get("WATCHDOG_USEC")
        self._watchdog_pid = env.get("WATCHDOG_PID")
        # A blocking sendto() on a datagram socket waits when the manager's queue is full; the
        # callers run on the event loop, so bound that wait and drop the message instead.
        self._send_timeout = send_timeout
        if unset_environment and environ is None:
            for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
                os.environ.pop(name, None)

    @property
    def enabled(self) -> bool:
        """True when there is a notification socket to send to."""
        return self._address is not None

    def notify(self, **fields: object) -> bool:
        """Send one datagram with ``KEY=VALUE`` lines; True when it was sent.

        Keys are sd_notify(3) variable names (``READY``, ``STATUS``, ``EXTEND_TIMEOUT_USEC``...).
        Values are converted with str(); True/False become "1"/"0". Newlines in values are
        replaced by spaces so that, e.g., an exception text in STATUS= cannot inject READY=1.
        All fields go in one datagram, so systemd applies them atomically.
        """
        if not fields:
            raise ValueError("notify() needs at least one field")
        lines: list[str] = []
        for key, value in fields.items():
            if not _KEY_RE.fullmatch(key):
                raise ValueError(f"sd_notify field name {key!r} must match [A-Z0-9_]+")
            if isinstance(value, bool):
                text = "1" if value else "0"
            else:
                text = str(value)
            if "\n" in text or "\r" in text:
                text = text.replace("\r\n", " ").replace("\n", " ").replace("\r", " ")
            lines.append(f"{key}={text}")
        if self._address is None:
            return False
        payload = ("\n".join(lines) + "\n").encode("utf-8", "replace")
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.settimeout(self._send_timeout)
                sock.sendto(payload, self._address)
        except OSError as exc:
            log.debug("sd_notify send failed socket=%r fields=%s error=%s", self._socket_name, ",".join(fields), exc)
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        """READY=1: start-up (or a reload) finished; ``systemctl start`` returns only now."""
        if status is None:
            return self.notify(READY=1)
        return self.notify(READY=1, STATUS=status)

    def status(self, text: str) -> bool:
        """STATUS=: one line shown by ``systemctl status`` (e.g. "reconciling 412/1000")."""
        return self.notify(STATUS=text)

    def stopping(self, status: str | None = None) -> bool:
        """STOPPING=1: shutdown began, so systemd does not take the drain for a hang."""
        if status is None:
            return self.notify(STOPPING=1)
        return self.notify(STOPPING=1, STATUS=status)

    def reloading(self, status: str | None = None) -> bool:
        """RELOADING=1 with MONOTONIC_USEC= (CLOCK_MONOTONIC, required by systemd >= 253).

        systemd uses the timestamp to tell this reload from a later one. Send ready() once the
        new configuration is in effect; until then the unit shows as "reloading".
        """
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        if status is None:
            return self.notify(RELOADING=1, MONOTONIC_USEC=usec)
        return self.notify(RELOADING=1, MONOTONIC_USEC=usec, STATUS=status)

    def watchdog(self) -> bool:
        """WATCHDOG=1: one keep-alive ping. Prefer watchdog_loop(), which checks health first."""
        return self.notify(WATCHDOG=1)

    def extend_timeout(self, seconds: float) -> bool:
        """EXTEND_TIMEOUT_USEC=: ask for more start/stop time (e.g. a long reconcile)."""
        return self.notify(EXTEND_TIMEOUT_USEC=max(0, int(seconds * 1_000_000)))

    def watchdog_interval(self) -> float | None:
        """Seconds between watchdog pings, or None when no watchdog applies to this process.

        None when WATCHDOG_USEC is unset, not a positive integer, or when WATCHDOG_PID is set
        and is not this process: a forked child inherits the environment, and it must not ping
        (or believe it is watched) on the parent's behalf. Also None without a usable
        NOTIFY_SOCKET, since pings could not be delivered. The result is half the timeout, as
        sd_watchdog_enabled(3) recommends.
        """
        if self._address is None or not self._watchdog_usec:
            return None
        if self._watchdog_pid:
            try:
                pid = int(self._watchdog_pid)
            except ValueError:
                log.debug("sd_notify ignoring invalid WATCHDOG_PID=%r", self._watchdog_pid)
                return None
            if pid != os.getpid():
                return None
        try:
            usec = int(self._watchdog_usec)
        except ValueError:
            log.debug("sd_notify ignoring invalid WATCHDOG_USEC=%r", self._watchdog_usec)
            return None
        if usec <= 0:
            return None
        return usec / 1_000_000 * _PING_FRACTION


#: healthy() for watchdog_loop: a plain function or a coroutine function answering "am I alive?".
HealthCheck = Callable[[], bool | Awaitable[bool]]


async def _is_healthy(healthy: HealthCheck, timeout: float) -> bool:
    """Run one health check; exceptions and checks slower than ``timeout`` count as unhealthy."""
    try:
        result = healthy()
        if inspect.isawaitable(result):
            result = await asyncio.wait_for(result, timeout)
        return bool(result)
    except asyncio.TimeoutError:
        log.warning("watchdog health check timed out timeout_s=%.3f", timeout)
        return False
    except Exception as exc:  # noqa: BLE001 - any failure of the check means "not healthy"
        log.warning("watchdog health check failed error=%r", exc)
        return False


async def watchdog_loop(
    notifier: SystemdNotifier,
    healthy: Callable[[], bool | Awaitable[bool]],
    *,
    interval: float | None = None,
) -> None:
    """Ping WATCHDOG=1 every ``interval`` seconds, but only while ``healthy()`` says so.

    The point of a watchdog is that systemd restarts a wedged agent. A loop that pings
    unconditionally would hide exactly that: it keeps running while the agent is stuck. So each
    tick first asks ``healthy()`` (a plain function or a coroutine function); when it returns
    false, raises, or (if async) does not answer within one interval, no ping is sent. If the
    agent stays unhealthy for WatchdogSec=, systemd aborts it (SIGABRT, tracebacks via
    faulthandler) and Restart=on-failure starts it again; guests keep running (KillMode=process).
    A check that recovers in time resumes the pings.

    Run this as a task on the agent's main event loop, never in a thread: a blocked event loop
    must stop the pings too. ``healthy()`` should judge the agent's own liveness (the loop turns,
    executors make progress), not its dependencies: libvirtd or a SAN being down is reported to
    the VRM as "degraded", and restarting the agent would not fix it.

    ``interval`` defaults to notifier.watchdog_interval(); when no watchdog is configured this
    returns at once. Otherwise it runs until cancelled.
    """
    period = notifier.watchdog_interval() if interval is None else interval
    if period is None or period <= 0:
        log.debug("watchdog not configured, no pings")
        return
    was_healthy = True
    while True:
        ok = await _is_healthy(healthy, period)
        if ok:
            notifier.watchdog()
            if not was_healthy:
                log.warning("watchdog health restored, pings resumed")
        elif was_healthy:
            log.warning("watchdog agent unhealthy, withholding pings so systemd can restart it")
        was_healthy = ok
        await asyncio.sleep(period)
