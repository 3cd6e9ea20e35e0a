"""EventService: list and follow the event log, resumable by sequence number."""

from __future__ import annotations

from typing import AsyncIterator

from cna_agent.api import pb
from cna_agent.api.convert import event_to_pb
from cna_agent.errors import InvalidArgument, OutOfRange
from cna_agent.state.eventlog import EventHub, ResumePointTooOld


class EventServicer(pb.events_pb2_grpc.EventServiceServicer):
    def __init__(self, hub: EventHub) -> None:
        self._hub = hub

    async def _check_after(self, after: int) -> None:
        """A resume point beyond the newest event is refused: it comes from another agent's log
        (a reinstalled host starts a new one) or from a bug, and following it would wait for
        events that may never be numbered that high."""
        newest = await self._hub.last_sequence()
        if after > newest:
            raise OutOfRange(f"after_sequence {after} is beyond the newest event ({newest}); resume from {newest} "
                             "or from_now (the log restarts when the agent's state is reinstalled)", field="after_sequence")

    async def ListEvents(self, request, context):
        limit = request.limit or 100
        if not 0 < limit <= 1000:
            raise InvalidArgument("limit", f"{request.limit} is not in 1..1000")
        await self._check_after(request.after_sequence)
        try:
            events = await self._hub.list(request.after_sequence, types=tuple(request.types), resource_id=request.resource_id, limit=limit)
        except ResumePointTooOld as exc:
            raise OutOfRange(str(exc), field="after_sequence") from None
        return pb.events_pb2.ListEventsResponse(
            events=[event_to_pb(e) for e in events], last_sequence=await self._hub.last_sequence()
        )

    async def WatchEvents(self, request, context) -> AsyncIterator[pb.events_pb2.Event]:
        after = await self._hub.last_sequence() if request.from_now else request.after_sequence
        await self._check_after(after)
        # Headers now, before any event: a client learns that its watch was accepted (and from
        # which point) without waiting for the next event, which may be minutes away.
        await context.send_initial_metadata((("cna-watch-after", str(after)),))
        try:
            async for event in self._hub.follow(after, types=tuple(request.types), resource_id=request.resource_id):
                yield event_to_pb(event)
        except ResumePointTooOld as exc:
            raise OutOfRange(str(exc), field="after_sequence") from None
