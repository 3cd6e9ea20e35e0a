"""BlockingPool.run with ``outlast`` (blocking.py): a call that changes something and overruns
its deadline is waited for and its real outcome returned, instead of DEADLINE_EXCEEDED while it
still runs (the fault suite's tgtd-kill point: a LUN hot-plug completed in libvirt after the
agent had reported it failed). Real threads and real time, short."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from cna_agent.blocking import BlockingPool
from cna_agent.errors import DeadlineExceeded


def test_a_change_past_its_deadline_is_waited_for_and_its_outcome_returned() -> None:
    pool = BlockingPool("t", 2, 5)

    def slow_change() -> str:
        time.sleep(0.6)
        return "plugged"

    async def run():
        with pytest.raises(DeadlineExceeded) as plain:
            await pool.run(slow_change, timeout=0.2, what="attach")
        outcome = await pool.run(slow_change, timeout=0.2, what="attach", outlast=2.0)
        return plain.value, outcome

    plain, outcome = asyncio.run(run())
    assert outcome == "plugged"
    assert "may still complete" not in plain.message
    pool.shutdown(wait=True)


def test_a_change_still_running_after_outlast_says_it_may_still_complete() -> None:
    pool = BlockingPool("t", 2, 5)
    release = threading.Event()

    async def run():
        with pytest.raises(DeadlineExceeded) as err:
            await pool.run(lambda: release.wait(10), timeout=0.1, what="attach", outlast=0.2)
        return err.value

    err = asyncio.run(run())
    release.set()
    assert "did not finish within 0.3s" in err.message and "may still complete" in err.message, err.message
    pool.shutdown(wait=True)
