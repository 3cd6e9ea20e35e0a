"""Polling a condition until a deadline, for state that arrives asynchronously (a daemon coming
up, an event stored, a link reconnecting) and has no stream to wait on.

Why one helper: each test had its own loop, with its own failure message; this one always says
what it waited for and for how long.
"""

from __future__ import annotations

import time
from typing import Callable, TypeVar

T = TypeVar("T")


def wait_for(predicate: Callable[[], T], timeout: float, what: str, interval: float = 0.2) -> T:
    """Call ``predicate`` until it returns something true and return that; fail naming ``what``
    after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"timed out waiting for {what} (not within {timeout}s)"
        time.sleep(interval)
    return value
