"""BlockingPool against real threads: deadlines (queueing included), stuck-call accounting,
queued calls dropped at their deadline, shutdown, and the names errors carry."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from cna_agent.blocking import BlockingPool
from cna_agent.errors import DeadlineExceeded, Unavailable


def wait_until(cond, timeout: float = 5.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError("condition not reached")
        time.sleep(0.01)


def test_runs_in_named_threads_and_returns_or_raises():
    pool = BlockingPool("unit", 2, 5)

    async def main():
        name = await pool.run(lambda: threading.current_thread().name, what="thread name")
        assert name.startswith("cna-unit")

        def boom():
            raise KeyError("k")

        with pytest.raises(KeyError):
            await pool.run(boom)

    try:
        asyncio.run(main())
        assert pool.stats().deadlines_exceeded == 0
    finally:
        pool.shutdown()


def test_deadline_exceeded_while_the_thread_is_still_stuck():
    pool = BlockingPool("san", 2, 30, hint="storage not answering?")
    release = threading.Event()

    async def main():
        t0 = time.monotonic()
        with pytest.raises(DeadlineExceeded) as exc:
            await pool.run(lambda: release.wait(10), timeout=0.2, what="LUN scan of ds1")
        assert time.monotonic() - t0 < 2
        assert exc.value.code == "DEADLINE_EXCEEDED"
        return str(exc.value)

    try:
        msg = asyncio.run(main())
        assert "LUN scan of ds1 did not finish within 0.2s" in msg
        assert "still running in the san pool" in msg and "storage not answering?" in msg
        # The caller gave up; the thread did not: it is busy and stuck until it returns.
        assert (pool.busy, pool.stuck, pool.queued) == (1, 1, 0)
        s = pool.stats()
        assert (s.name, s.size, s.busy, s.stuck, s.deadlines_exceeded) == ("san", 2, 1, 1, 1)
    finally:
        release.set()
    wait_until(lambda: pool.busy == 0)
    assert pool.stuck == 0
    pool.shutdown()


def test_a_busy_call_within_its_deadline_is_not_stuck():
    pool = BlockingPool("unit", 1, 30)
    release = threading.Event()

    async def main():
        task = asyncio.get_running_loop().create_task(pool.run(lambda: release.wait(10) and "done"))
        await asyncio.sleep(0.1)
        assert (pool.busy, pool.stuck) == (1, 0)
        release.set()
        return await task

    try:
        assert asyncio.run(main()) == "done"
    finally:
        release.set()
        pool.shutdown(wait=True)


def test_queued_call_past_its_deadline_never_runs():
    pool = BlockingPool("ovsdb", 1, 30)
    release = threading.Event()
    ran = threading.Event()

    async def main():
        loop = asyncio.get_running_loop()
        blocker = loop.create_task(pool.run(lambda: release.wait(10), what="slow transaction"))
        await asyncio.sleep(0.1)
        assert pool.busy == 1
        queued = loop.create_task(pool.run(ran.set, timeout=0.2, what="bridge listing"))
        await asyncio.sleep(0.05)
        assert pool.queued == 1
        with pytest.raises(DeadlineExceeded) as exc:
            await queued
        msg = str(exc.value)
        assert "bridge listing did not finish within 0.2s" in msg
        assert "never started" in msg and "ovsdb pool" in msg
        assert pool.queued == 0
        release.set()
        assert await blocker is True
        # Give the freed thread every chance to pick the dropped call up.
        await pool.run(lambda: None)
        await asyncio.sleep(0.1)

    try:
        asyncio.run(main())
    finally:
        release.set()
    assert not ran.is_set()
    assert (pool.busy, pool.queued, pool.stuck, pool.deadlines_exceeded) == (0, 0, 0, 1)
    pool.shutdown()


def test_a_cancelled_caller_drops_its_queued_call():
    pool = BlockingPool("unit", 1, 30)
    release = threading.Event()
    ran = threading.Event()

    async def main():
        loop = asyncio.get_running_loop()
        blocker = loop.create_task(pool.run(lambda: release.wait(10)))
        await asyncio.sleep(0.1)
        queued = loop.create_task(pool.run(ran.set))
        await asyncio.sleep(0.05)
        queued.cancel()
        with pytest.raises(asyncio.CancelledError):
            await queued
        release.set()
        await blocker
        await pool.run(lambda: None)

    try:
        asyncio.run(main())
    finally:
        release.set()
    assert not ran.is_set() and pool.queued == 0
    pool.shutdown()


def test_shutdown_refuses_new_work_and_fails_queued_calls():
    pool = BlockingPool("sqlite", 1, 30)
    release = threading.Event()
    ran = threading.Event()

    async def main():
        loop = asyncio.get_running_loop()
        blocker = loop.create_task(pool.run(lambda: release.wait(10) and "finished"))
        await asyncio.sleep(0.1)
        queued = loop.create_task(pool.run(ran.set, what="event append"))
        await asyncio.sleep(0.05)
        pool.shutdown()
        assert pool.closed
        with pytest.raises(Unavailable) as exc:
            await queued
        assert "sqlite pool shut down before event append started" in str(exc.value)
        with pytest.raises(Unavailable) as exc:
            await pool.run(lambda: None, what="journal write")
        assert str(exc.value) == "the sqlite pool is shut down; journal write was not started"
        # A call already running when the pool shut down still delivers its result.
        release.set()
        assert await blocker == "finished"

    try:
        asyncio.run(main())
    finally:
        release.set()
    assert not ran.is_set()
    with pytest.raises(Unavailable):
        pool.run_sync(lambda: None)


def test_run_sync_has_the_same_deadline_and_accounting():
    pool = BlockingPool("netlink", 1, 30)
    release = threading.Event()
    try:
        assert pool.run_sync(lambda: 42, what="answer") == 42
        with pytest.raises(DeadlineExceeded) as exc:
            pool.run_sync(lambda: release.wait(10), timeout=0.2, what="link lookup of br0")
        assert "link lookup of br0 did not finish within 0.2s (still running in the netlink pool)" == str(exc.value)
        assert (pool.busy, pool.stuck) == (1, 1)
    finally:
        release.set()
    wait_until(lambda: pool.busy == 0)
    pool.shutdown()


def test_default_deadline_and_limits():
    pool = BlockingPool("unit", 1, 0.2)
    release = threading.Event()
    try:
        with pytest.raises(DeadlineExceeded) as exc:
            asyncio.run(pool.run(lambda: release.wait(10)))
        assert "blocking call did not finish within 0.2s" in str(exc.value)
    finally:
        release.set()
        pool.shutdown(wait=True)
    with pytest.raises(ValueError, match="'x'"):
        BlockingPool("x", 0, 1)
    with pytest.raises(ValueError, match="timeout"):
        BlockingPool("x", 1, 0)


def test_the_pool_is_bounded():
    pool = BlockingPool("unit", 2, 30)
    seen: set[str] = set()
    lock = threading.Lock()
    peak = [0, 0]

    def work():
        with lock:
            seen.add(threading.current_thread().name)
            peak[0] += 1
            peak[1] = max(peak)
        time.sleep(0.02)
        with lock:
            peak[0] -= 1

    async def main():
        await asyncio.gather(*(pool.run(work) for _ in range(12)))

    try:
        asyncio.run(main())
    finally:
        pool.shutdown(wait=True)
    assert len(seen) <= 2 and peak[1] <= 2


def test_netlink_pool_size_comes_from_config(tmp_path):
    from cna_agent.config import ConfigError, load_config

    assert load_config(_write(tmp_path / "a.toml", ""), environ={}).network.netlink_threads == 2
    cfg = load_config(_write(tmp_path / "b.toml", "[network]\nnetlink_threads = 3\n"), environ={})
    assert cfg.network.netlink_threads == 3
    with pytest.raises(ConfigError, match="network.netlink_threads"):
        load_config(_write(tmp_path / "c.toml", "[network]\nnetlink_threads = 0\n"), environ={})


def _write(path, text: str):
    path.write_text(text)
    return path


def test_prestart_runs_every_thread_so_load_adds_none() -> None:
    """The agent's thread count is fixed from start-up: counted from threading, by name."""
    def mine() -> int:
        return sum(1 for t in threading.enumerate() if t.name.startswith("cna-pre_"))

    pool = BlockingPool("pre", 4, 5)
    assert mine() == 0  # lazily, none yet
    assert pool.prestart() == 4 and mine() == 4

    async def load() -> list[int]:
        return await asyncio.gather(*(pool.run(lambda i=i: (time.sleep(0.01), i)[1]) for i in range(40)))

    assert asyncio.run(load()) == list(range(40))
    assert mine() == 4
    pool.shutdown()
