"""One bounded pool type for every kind of blocking work (DESIGN.md, "Data flow of one call").

libvirt-python, qemu-img and LUN scans, the OVSDB IDL, netlink, SQLite and sysfs probes all
block. Each of them runs in a :class:`BlockingPool`: a name (its threads' name prefix and the
label in errors, logs and metrics), a fixed number of threads (from config where the work
has a key), a deadline on every call, and counts of the calls that are running, queued, and
stuck past their deadline. Never the event loop's default executor: it is shared by
everything, has no deadline and says nothing about who holds its threads.

What a deadline means: the caller's await ends with DEADLINE_EXCEEDED when the call has not
finished in time, queueing included. A call still waiting for a thread at its deadline is
dropped and never runs. A call already running cannot be interrupted (a thread stuck in the
kernel on a dead SAN stays stuck): it keeps its thread until it returns and counts as
``stuck`` meanwhile, so the pool stays bounded and operators can see why it is full.

A caller that is cancelled drops its call the same way if it has not started yet; when it is
a cancelled operation's, a call already running is waited for (until its deadline, whatever
further cancels come) before the cancellation goes on, so an operation's lock is not released while its work still runs
(cancel.py; the work's cancel hooks are what make it return early). Calls run in a copy of
the caller's context, so that work finds its operation's cancel scope. After
:meth:`BlockingPool.shutdown` new calls get UNAVAILABLE, and so do calls still queued.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import itertools
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

from cna_agent import cancel
from cna_agent.errors import DeadlineExceeded, Unavailable

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class PoolStats:
    """One consistent reading of a pool's counts (metrics, status)."""

    name: str
    size: int
    busy: int
    queued: int
    stuck: int
    #: Calls whose caller got DEADLINE_EXCEEDED since the pool was made.
    deadlines_exceeded: int


@dataclass
class _Running:
    what: str
    started: float
    deadline: float


class _Expired(Exception):
    """A queued call reached a thread after its deadline (its caller has already given up)."""


class BlockingPool:
    """A bounded thread pool with a deadline per call and stuck-call accounting."""

    def __init__(self, name: str, size: int, timeout: float, *, hint: str = "") -> None:
        """``size`` threads named ``cna-<name>``; ``timeout`` is the default deadline (seconds);
        ``hint`` is appended to deadline errors (e.g. "storage not answering?")."""
        if size < 1:
            raise ValueError(f"blocking pool {name!r}: size {size} is below the minimum 1")
        if timeout <= 0:
            raise ValueError(f"blocking pool {name!r}: timeout must be greater than 0")
        self.name = name
        self.size = size
        self.default_timeout = timeout
        self.hint = hint
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=size, thread_name_prefix=f"cna-{name}")
        self._lock = threading.Lock()
        self._running: dict[int, _Running] = {}
        self._queued: set[int] = set()
        self._seq = itertools.count(1)
        self._closed = False
        self._deadlines_exceeded = 0

    def __repr__(self) -> str:
        s = self.stats()
        return f"<BlockingPool {s.name} size={s.size} busy={s.busy} queued={s.queued} stuck={s.stuck}>"

    # -- counts -----------------------------------------------------------------------------

    @property
    def busy(self) -> int:
        """Threads running a call now (stuck ones included)."""
        with self._lock:
            return len(self._running)

    @property
    def queued(self) -> int:
        """Calls waiting for a thread."""
        with self._lock:
            return len(self._queued)

    @property
    def stuck(self) -> int:
        """Running calls past their deadline: their caller gave up, their thread did not."""
        now = time.monotonic()
        with self._lock:
            return sum(1 for r in self._running.values() if now > r.deadline)

    @property
    def deadlines_exceeded(self) -> int:
        with self._lock:
            return self._deadlines_exceeded

    @property
    def closed(self) -> bool:
        return self._closed

    def stats(self) -> PoolStats:
        now = time.monotonic()
        with self._lock:
            return PoolStats(self.name, self.size, len(self._running), len(self._queued),
                             sum(1 for r in self._running.values() if now > r.deadline), self._deadlines_exceeded)

    def prestart(self, timeout: float = 10.0) -> int:
        """Start every thread of the pool now rather than on the first calls that find the
        others busy; returns how many run. The agent calls it at start-up so that its thread
        count is fixed from then on: one that grows under load is a leak, not a pool filling
        (the soak saw 27 threads in minute 2 and 30 from minute 3 on without it)."""
        barrier = threading.Barrier(self.size + 1)
        started: set[int] = set()

        def hold() -> None:
            started.add(threading.get_ident())
            barrier.wait(timeout)

        for _ in range(self.size):
            # Each holds its thread until all have started: the executor, finding no idle
            # thread at each submit, starts a new one up to its size.
            self._pool.submit(hold)
        try:
            barrier.wait(timeout)
        except threading.BrokenBarrierError:
            log.warning("event=blocking.prestart_incomplete pool=%s size=%d started=%d", self.name, self.size, len(started))
        return len(started)

    # -- calls ------------------------------------------------------------------------------

    def _submit(self, fn: Callable[[], T], limit: float, what: str) -> tuple[int, concurrent.futures.Future[T]]:
        if self._closed:
            raise Unavailable(f"the {self.name} pool is shut down; {what} was not started")
        key = next(self._seq)
        deadline = time.monotonic() + limit

        def call() -> T:
            with self._lock:
                self._queued.discard(key)
                if time.monotonic() > deadline:
                    raise _Expired()
                self._running[key] = entry = _Running(what, time.monotonic(), deadline)
            try:
                return fn()
            finally:
                with self._lock:
                    self._running.pop(key, None)
                took = time.monotonic() - entry.started
                if time.monotonic() > entry.deadline:
                    log.warning("event=blocking.stuck_call_returned pool=%s what=%r took_s=%.1f", self.name, what, took)

        with self._lock:
            self._queued.add(key)
        try:
            cf = self._pool.submit(contextvars.copy_context().run, call)
        except RuntimeError:  # shut down between the check above and here
            with self._lock:
                self._queued.discard(key)
            raise Unavailable(f"the {self.name} pool is shut down; {what} was not started") from None
        # Dequeued by a cancel (deadline, caller gone, shutdown): no longer queued.
        cf.add_done_callback(lambda _f: self._forget_queued(key))
        return key, cf

    def _forget_queued(self, key: int) -> None:
        with self._lock:
            self._queued.discard(key)

    def _expired(self, key: int, cf: concurrent.futures.Future[Any], limit: float, what: str, *,
                 may_complete: bool = False) -> DeadlineExceeded:
        cf.cancel()  # dequeues it if it never started; a running thread finishes on its own
        with self._lock:
            self._deadlines_exceeded += 1
            running = key in self._running
            busy = len(self._running)
        if running:
            where = f"still running in the {self.name} pool"
        else:
            where = f"never started: all {self.size} threads of the {self.name} pool were busy ({busy} running)"
        log.warning("event=blocking.deadline_exceeded pool=%s what=%r timeout_s=%g running=%s", self.name, what, limit, running)
        hint = f"; {self.hint}" if self.hint else ""
        later = "; the change it asked for may still complete" if may_complete and running else ""
        return DeadlineExceeded(f"{what} did not finish within {limit:g}s ({where}{hint}){later}")

    async def run(self, fn: Callable[[], T], *, timeout: float | None = None, what: str = "blocking call",
                  outlast: float = 0.0) -> T:
        """Run ``fn()`` in the pool; DEADLINE_EXCEEDED naming ``what`` and the pool after
        ``timeout`` seconds (default: the pool's), queueing included.

        ``outlast``: for a call that changes something (a device plugged, a snapshot taken),
        which may still complete after its deadline (seen: a LUN hot-plug whose array came back
        after 60 s completed in libvirt after the agent had reported it failed). Once started,
        such a call is waited for that many seconds more and its real outcome returned; only
        one still running after that is DEADLINE_EXCEEDED, saying the change may yet happen."""
        limit = self.default_timeout if timeout is None else timeout
        deadline = time.monotonic() + limit
        key, cf = self._submit(fn, limit, what)
        fut = asyncio.wrap_future(cf)
        # Nobody may be left to read an abandoned call's outcome; read it so asyncio stays quiet.
        fut.add_done_callback(lambda f: f.cancelled() or f.exception())
        try:
            done, _ = await asyncio.wait((fut,), timeout=limit)
            if not done and outlast and self._is_running(key):
                log.warning("event=blocking.outlasting pool=%s what=%r timeout_s=%g outlast_s=%g", self.name, what, limit, outlast)
                deadline += outlast
                done, _ = await asyncio.wait((fut,), timeout=outlast)
                if not done:
                    raise self._expired(key, cf, limit + outlast, what, may_complete=True)
        except asyncio.CancelledError:
            # The caller went away: a call that has not started never will. One that runs for
            # a cancelled operation is outlived, or the operation's lock would be released
            # under it (other cancels - a wait_for timing out, shutdown - do not wait).
            scope = cancel.current()
            if not cf.cancel() and scope is not None and scope.cancelled:
                await self._outlive(fut, deadline, what)
            raise
        if not done:
            raise self._expired(key, cf, limit, what)
        return self._outcome(cf, key, limit, what)

    def _is_running(self, key: int) -> bool:
        with self._lock:
            return key in self._running

    async def _outlive(self, fut: "asyncio.Future[Any]", deadline: float, what: str) -> None:
        """Wait for a running call whose caller was cancelled, until the call's deadline."""
        if fut.done():
            return
        log.info("event=blocking.cancel_waits pool=%s what=%r", self.name, what)
        while not fut.done():
            left = deadline - time.monotonic()
            if left <= 0:
                log.warning("event=blocking.cancel_gave_up pool=%s what=%r", self.name, what)
                return
            try:
                await asyncio.wait((fut,), timeout=left)
            except asyncio.CancelledError:
                continue  # cancelled again: still the same call to outlive

    def run_sync(self, fn: Callable[[], T], *, timeout: float | None = None, what: str = "blocking call") -> T:
        """:meth:`run` for synchronous callers (close paths, scripts). Blocks the calling
        thread: never call it from the event loop or from this pool's own threads."""
        limit = self.default_timeout if timeout is None else timeout
        key, cf = self._submit(fn, limit, what)
        done, _ = concurrent.futures.wait((cf,), timeout=limit)
        if not done:
            raise self._expired(key, cf, limit, what)
        return self._outcome(cf, key, limit, what)

    def _outcome(self, cf: concurrent.futures.Future[T], key: int, limit: float, what: str) -> T:
        if cf.cancelled():
            raise Unavailable(f"the {self.name} pool shut down before {what} started")
        try:
            return cf.result()
        except _Expired:  # reached a thread just after its deadline
            raise self._expired(key, cf, limit, what) from None

    # -- shutdown ---------------------------------------------------------------------------

    def shutdown(self, *, wait: bool = False, cancel_queued: bool = True) -> None:
        """Refuse new calls (UNAVAILABLE). ``cancel_queued`` drops calls that have not started
        (their callers get UNAVAILABLE); ``wait`` blocks until running calls return."""
        self._closed = True
        s = self.stats()
        if s.busy or s.queued:
            log.info("event=blocking.shutdown pool=%s busy=%d queued=%d stuck=%d", s.name, s.busy, s.queued, s.stuck)
        self._pool.shutdown(wait=wait, cancel_futures=cancel_queued)
