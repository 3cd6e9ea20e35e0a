"""Datastore health: a periodic direct-I/O probe per datastore, never blocking anyone.

Why direct I/O: a read served from the page cache says nothing about the SAN; O_DIRECT goes to
the device. Why a thread of its own per probe, with a deadline: a read from a dead LUN or NFS
server sleeps uninterruptibly; the monitor then reports "unreachable" at the deadline and does
not start another probe on that datastore until the stuck one returns (so stuck threads are
bounded by the number of datastores). Results are kept in memory: ListDatastores answers
from them at once.

Health: ok; slow (the probe took longer than ``slow_after_s``); unreachable (error or no
answer within ``timeout``). A change publishes a ``datastore.health`` event.
"""

from __future__ import annotations

import asyncio
import logging
import mmap
import os
import threading
import time
from dataclasses import dataclass
from typing import Awaitable, Callable, Mapping

log = logging.getLogger(__name__)

OK, SLOW, UNREACHABLE = "ok", "slow", "unreachable"
PROBE_FILE = ".cna-probe"
BLOCK = 4096


@dataclass(frozen=True)
class Health:
    state: str
    reason: str = ""
    latency_ms: float = 0.0
    checked_at: float = 0.0
    direct_io: bool = True


#: A probe returns (direct_io_used, detail) or raises; it runs in its own thread.
Probe = Callable[[], tuple[bool, str]]


def direct_read_probe(path: str) -> tuple[bool, str]:
    """Read one aligned block from ``path`` with O_DIRECT (buffered if the fs refuses O_DIRECT)."""
    buf = mmap.mmap(-1, BLOCK)  # page-aligned, as O_DIRECT needs
    try:
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECT", 0))
            direct = True
        except OSError as exc:
            if exc.errno != 22:  # EINVAL: tmpfs and some FUSE file systems have no O_DIRECT
                raise
            fd = os.open(path, os.O_RDONLY)
            direct = False
        try:
            os.readv(fd, [buf])
        finally:
            os.close(fd)
        return direct, ""
    finally:
        buf.close()


def dir_probe(root: str) -> Probe:
    """Probe a directory datastore through a small file the agent owns in it."""

    def probe() -> tuple[bool, str]:
        target = os.path.join(root, PROBE_FILE)
        if not os.path.isdir(root):
            raise FileNotFoundError(f"{root} does not exist or is not a directory")
        if not os.path.exists(target):
            tmp = target + ".new"
            with open(tmp, "wb") as fh:
                fh.write(b"\0" * BLOCK)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, target)
        return direct_read_probe(target)

    return probe


class DatastoreMonitor:
    def __init__(self, probes: Mapping[str, Probe], *, interval: float, timeout: float,
                 on_change: Callable[[str, Health, Health | None], Awaitable[None]] | None = None,
                 slow_after_s: float | None = None) -> None:
        self.probes = dict(probes)
        self.interval = interval
        self.timeout = timeout
        self.slow_after_s = slow_after_s if slow_after_s is not None else max(timeout / 5, 0.5)
        self.on_change = on_change
        self.health: dict[str, Health] = {}
        #: name -> (probe thread, when it started, its result) of the latest probe.
        self._inflight: dict[str, tuple[threading.Thread, float, "asyncio.Future[tuple[bool, str, float]]"]] = {}
        self._task: asyncio.Task[None] | None = None

    def get(self, name: str) -> Health:
        return self.health.get(name, Health("unknown", "not probed yet"))

    async def probe(self, name: str) -> Health:
        """Probe one datastore now. A probe still running from before is waited for until its
        own deadline (a slow answer is not a dead datastore); one stuck past it is reported."""
        loop = asyncio.get_running_loop()
        earlier = self._inflight.get(name)
        if earlier is not None and earlier[0].is_alive():
            thread, started, fut = earlier
            stuck_s = time.monotonic() - started
            if stuck_s >= self.timeout:
                return await self._set(name, Health(UNREACHABLE, f"an earlier probe has not returned for {stuck_s:.0f}s "
                                                    f"(deadline {self.timeout:g}s)", self.timeout * 1000, time.time()))
            return await self._finish(name, fut, self.timeout - stuck_s)
        fut: asyncio.Future[tuple[bool, str, float]] = loop.create_future()
        # A probe that answers after its deadline still delivers; nobody awaits it then.
        fut.add_done_callback(lambda f: f.cancelled() or f.exception())
        probe = self.probes[name]

        def run() -> None:
            t0 = time.monotonic()
            try:
                direct, detail = probe()
                res: tuple[bool, str, float] | BaseException = (direct, detail, (time.monotonic() - t0) * 1000)
            except BaseException as exc:  # reported as unreachable
                res = exc
            def deliver() -> None:
                if fut.done():
                    return
                if isinstance(res, BaseException):
                    fut.set_exception(res)
                else:
                    fut.set_result(res)
            try:
                loop.call_soon_threadsafe(deliver)
            except RuntimeError:
                pass  # loop closed meanwhile

        t = threading.Thread(target=run, name=f"ds-probe-{name}", daemon=True)
        self._inflight[name] = (t, time.monotonic(), fut)
        t.start()
        return await self._finish(name, fut, self.timeout)

    async def _finish(self, name: str, fut: "asyncio.Future[tuple[bool, str, float]]", wait: float) -> Health:
        try:
            direct, detail, ms = await asyncio.wait_for(asyncio.shield(fut), wait)
        except asyncio.TimeoutError:
            return await self._set(name, Health(UNREACHABLE, f"no answer to a direct-I/O read within {self.timeout:g}s",
                                                self.timeout * 1000, time.time()))
        except Exception as exc:
            reason = getattr(exc, "message", None) or getattr(exc, "strerror", None) or str(exc)
            return await self._set(name, Health(UNREACHABLE, f"probe failed: {reason}", 0.0, time.time()))
        if ms > self.slow_after_s * 1000:
            return await self._set(name, Health(SLOW, f"a direct-I/O read took {ms:.0f} ms", ms, time.time(), direct))
        return await self._set(name, Health(OK, detail, ms, time.time(), direct))

    async def _set(self, name: str, h: Health) -> Health:
        old = self.health.get(name)
        self.health[name] = h
        if (old is None or old.state != h.state) and self.on_change is not None:
            try:
                await self.on_change(name, h, old)
            except Exception:
                log.exception("event=datastore.health_callback_failed datastore=%s", name)
        return h

    async def probe_all(self) -> None:
        await asyncio.gather(*(self.probe(n) for n in self.probes), return_exceptions=True)

    async def _loop(self) -> None:
        while True:
            await self.probe_all()
            await asyncio.sleep(self.interval)

    def start(self) -> None:
        if self._task is None and self.probes:
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="datastore-monitor")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
            self._task = None
