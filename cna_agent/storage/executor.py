"""The storage subsystem's own bounded thread pool, with a deadline on every call.

Why separate from libvirt's pool: qemu-img on a SAN LUN, an iSCSI login or a SCSI scan can
hang for minutes when the array stops answering. Those calls get ``[storage]
executor_threads`` threads of their own, so VM list/get/stats (libvirt's pool, the event loop)
keep answering. The caller's await ends at the deadline with DEADLINE_EXCEEDED even when the
thread itself is still stuck in the kernel; a stuck thread occupies one slot until it returns,
and ``busy``/``stuck`` say how many there are (the datastore monitor reports them).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from typing import Callable, TypeVar

from cna_agent.errors import DeadlineExceeded, Unavailable

T = TypeVar("T")


class StorageExecutor:
    def __init__(self, threads: int, default_timeout: float) -> None:
        self.threads = threads
        self.default_timeout = default_timeout
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix="cna-storage")
        self._lock = threading.Lock()
        self._running: dict[int, float] = {}
        self._seq = 0
        self._closed = False

    @property
    def busy(self) -> int:
        with self._lock:
            return len(self._running)

    def stuck(self, older_than: float) -> int:
        now = time.monotonic()
        with self._lock:
            return sum(1 for t in self._running.values() if now - t > older_than)

    async def run(self, fn: Callable[[], T], *, timeout: float | None = None, what: str = "storage call") -> T:
        """Run ``fn`` in the pool; DEADLINE_EXCEEDED after ``timeout`` (queueing included)."""
        if self._closed:
            raise Unavailable("the storage subsystem is shutting down")
        timeout = self.default_timeout if timeout is None else timeout
        with self._lock:
            self._seq += 1
            key = self._seq

        def wrapped() -> T:
            with self._lock:
                self._running[key] = time.monotonic()
            try:
                return fn()
            finally:
                with self._lock:
                    self._running.pop(key, None)

        fut = asyncio.get_running_loop().run_in_executor(self._pool, wrapped)
        try:
            return await asyncio.wait_for(asyncio.shield(fut), timeout)
        except asyncio.TimeoutError:
            fut.cancel()  # dequeues it if it never started; a running thread finishes on its own
            raise DeadlineExceeded(f"{what} did not finish within {timeout:g}s (storage not answering?)") from None

    def shutdown(self) -> None:
        self._closed = True
        self._pool.shutdown(wait=False, cancel_futures=True)
