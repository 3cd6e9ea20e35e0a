"""Small asyncio helpers shared by the agent's background loops."""

from __future__ import annotations

import asyncio


async def cancel_and_wait(task: asyncio.Task | None) -> None:
    """Cancel a background loop and wait until it has really stopped.

    Why wait: a loop that is only cancelled may still be inside a libvirt or storage call when
    its owner closes the connection or executor under it.
    """
    if task is None:
        return
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass
