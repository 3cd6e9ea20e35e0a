"""CancelOperation against the real runner, real pool threads and real processes (cancel.py):
a kind that cannot be cancelled is refused and runs on; a cancel of running blocking work keeps
the lock until the worker has returned; a cancelled operation's command is killed (judged from
/proc, not from the runner); a cancel past the work's point of no return is refused, and one
that came before it stops the work there."""

from __future__ import annotations

import asyncio
import os
import threading
import time

import pytest

from cna_agent import cancel
from cna_agent.blocking import BlockingPool
from cna_agent.errors import FailedPrecondition
from cna_agent.operations import OperationRunner
from cna_agent.state.eventlog import EventHub, EventLog
from cna_agent.state.journal import OperationJournal
from cna_agent.state.store import StateStore
from cna_agent.storage.runner import SubprocessRunner


def _runner(tmp_path) -> OperationRunner:
    store = StateStore(tmp_path / "ops.db")
    return OperationRunner(store, OperationJournal(store), EventHub(store, EventLog(store)))


async def _until(cond, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "condition not reached"
        await asyncio.sleep(0.01)


def test_a_kind_that_cannot_be_cancelled_is_refused_and_runs_to_its_end(tmp_path) -> None:
    release = asyncio.Event()

    async def scenario():
        runner = _runner(tmp_path)

        async def work(op):
            await release.wait()
            return None

        rec = await runner.submit("vm.delete", "vm-1", work, lock_key="vm/vm-1")
        await asyncio.sleep(0.05)
        with pytest.raises(FailedPrecondition) as refused:
            await runner.cancel(rec.id)
        assert runner.cancel_refusal(rec.id) == str(refused.value)
        assert runner.is_running(rec.id) and runner.locks.holder("vm/vm-1").id == rec.id
        release.set()
        await _until(lambda: not runner.is_running(rec.id))
        return refused.value, await runner.get(rec.id)

    refused, done = asyncio.run(scenario())
    assert refused.code == "FAILED_PRECONDITION" and refused.field == "id"
    assert "vm.delete operations cannot be cancelled" in refused.message
    assert done.state == "succeeded"


def test_the_lock_is_held_until_the_blocking_work_has_returned(tmp_path) -> None:
    pool = BlockingPool("unit-cancel", 1, 30)
    release, entered = threading.Event(), threading.Event()
    ran_after: list[str] = []

    def stubborn() -> None:  # blocking work with no cancel hook: it cannot be stopped early
        entered.set()
        release.wait(20)

    async def scenario():
        runner = _runner(tmp_path)

        async def work(op):
            await pool.run(stubborn, what="stubborn work")
            ran_after.append("after the call")  # never: the coroutine was cancelled meanwhile

        rec = await runner.submit("volume.import", "ds/v", work, lock_key="volume/ds/v", cancellable=True)
        await asyncio.get_running_loop().run_in_executor(None, entered.wait, 5)
        during = await runner.cancel(rec.id, wait=0.3)
        held = runner.locks.holder("volume/ds/v")
        busy = pool.busy
        release.set()
        await _until(lambda: not runner.is_running(rec.id))
        return during, held, busy, await runner.get(rec.id), runner.locks.holder("volume/ds/v")

    try:
        during, held, busy, done, after = asyncio.run(scenario())
    finally:
        pool.shutdown()
    assert not during.done and held is not None and held.id == during.id and busy == 1
    assert done.state == "cancelled" and done.error.code == 1 and after is None
    assert ran_after == []


def _children(argv: list[str]) -> list[int]:
    """Live children of this process running exactly ``argv``, read from /proc."""
    found = []
    want = "\0".join(argv).encode() + b"\0"
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                cmdline = fh.read()
        except OSError:
            continue
        if int(fields[1]) == os.getpid() and cmdline == want and fields[0] != "Z":
            found.append(int(pid))
    return found


def test_a_cancelled_operations_command_is_killed(tmp_path) -> None:
    pool = BlockingPool("unit-proc", 1, 60)

    async def scenario():
        runner = _runner(tmp_path)

        argv = ["sleep", f"61.{os.getpid()}"]  # this test's own command, told apart from any other child

        async def work(op):
            await pool.run(lambda: SubprocessRunner().run(argv, timeout=60), what="sleep")

        rec = await runner.submit("volume.clone", "ds/c", work, cancellable=True)
        await _until(lambda: bool(_children(argv)))
        pids = _children(argv)
        t0 = time.monotonic()
        done = await runner.cancel(rec.id)
        return done, time.monotonic() - t0, pids, _children(argv)

    try:
        done, took, pids, left = asyncio.run(scenario())
    finally:
        pool.shutdown()
    assert len(pids) == 1 and done.state == "cancelled" and took < 5
    assert left == [] and not os.path.exists(f"/proc/{pids[0]}")  # killed and reaped


def test_the_point_of_no_return_refuses_later_cancels_and_stops_earlier_ones(tmp_path) -> None:
    pool = BlockingPool("unit-commit", 1, 30)
    committed, proceed = threading.Event(), threading.Event()

    def makes_then_commits() -> str:
        proceed.wait(10)
        cancel.commit("the volume is being put in place")
        committed.set()
        return "placed"

    async def scenario():
        runner = _runner(tmp_path)

        async def work(op):
            return await pool.run(makes_then_commits, what="make")

        # 1. cancelled before the commit: the commit raises, nothing is placed
        first = await runner.submit("volume.create", "ds/a", work, cancellable=True)
        await asyncio.sleep(0.05)
        cancelling = asyncio.ensure_future(runner.cancel(first.id))
        await asyncio.sleep(0.05)
        proceed.set()
        first_done = await cancelling
        placed_first = committed.is_set()
        # 2. committed: a cancel is refused with the work's reason, and the work completes
        proceed.clear()
        committed.clear()

        hold = asyncio.Event()

        async def commits_then_waits(op):
            await pool.run(lambda: cancel.commit("the volume is being put in place"), what="commit")
            await hold.wait()

        second = await runner.submit("volume.create", "ds/b", commits_then_waits, cancellable=True)
        await _until(lambda: runner.cancel_refusal(second.id) != "")
        with pytest.raises(FailedPrecondition) as refused:
            await runner.cancel(second.id)
        hold.set()
        await _until(lambda: not runner.is_running(second.id))
        return first_done, placed_first, refused.value, await runner.get(second.id)

    try:
        first_done, placed_first, refused, second_done = asyncio.run(scenario())
    finally:
        pool.shutdown()
    assert first_done.state == "cancelled" and not placed_first
    assert refused.message == "the volume is being put in place"
    assert second_done.state == "succeeded"


def test_a_cancel_outside_operations_does_not_wait_for_the_thread() -> None:
    """wait_for timing out or a client going away: the pool does not hold the caller."""
    pool = BlockingPool("unit-free", 1, 30)
    release = threading.Event()

    async def scenario():
        t0 = time.monotonic()
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(pool.run(lambda: release.wait(10)), 0.2)
        return time.monotonic() - t0

    try:
        took = asyncio.run(scenario())
    finally:
        release.set()
        pool.shutdown()
    assert took < 2
