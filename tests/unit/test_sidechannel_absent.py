"""SideChannels and a VM whose running definition has no QMP side channel (one an older agent
defined; every domain of a hypervisor without QEMU): the first resume looks it up once and
gives up without the retries meant for a QEMU still starting, later resumes do not look it up
again, and a stop forgets that (the next run may be of a definition that has one)."""

from __future__ import annotations

import asyncio

from cna_agent.compute.sidechannel import SideChannels


def test_a_vm_without_a_side_channel_is_looked_up_once_per_run():
    lookups: list[str] = []

    async def lookup(uuid: str) -> tuple[str, str]:
        lookups.append(uuid)
        return "", "vm-a"

    async def scenario() -> list[list[str]]:
        channels = SideChannels(events=None, lookup=lookup)  # type: ignore[arg-type]  (no event is published here)
        seen = []
        for state in ("running", "paused", "running", "running"):
            channels.state_changed("u1", state)
            await asyncio.sleep(0.05)
        seen.append(list(lookups))
        await asyncio.sleep(0.6)  # past the first retry's delay: none comes
        seen.append(list(lookups))
        channels.state_changed("u1", "stopped")
        await asyncio.sleep(0.05)
        channels.state_changed("u1", "running")
        await asyncio.sleep(0.05)
        seen.append(list(lookups))
        return seen

    first, after_wait, after_restart = asyncio.run(scenario())
    assert first == ["u1"]
    assert after_wait == ["u1"]
    assert after_restart == ["u1", "u1"]
