"""EventService: list and follow the event log, resumable by sequence number."""

from __future__ import annotations

from typing import AsyncIterator

from cna_agent.api import pb
from cna_agent.api.convert import event_to_pb
from cna_agent.errors import InvalidArgument, OutOfRange
from cna_agent.state.eventlog import EventHub, EventRecord, ResumePointTooOld


class EventServicer(pb.events_pb2_grpc.EventServiceServicer):
    #: Event messages kept for the watchers that have yet to send them (as many as the hub
    #: keeps at least: a watcher further behind than that reads the store anyway).
    CONVERTED_MAX = EventHub.RECENT

    def __init__(self, hub: EventHub) -> None:
        self._hub = hub
        self._converted: dict[int, pb.events_pb2.Event] = {}

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

    async def _watch_from(self, request, context) -> int:
        after = await self._hub.last_sequence() if request.from_now else request.after_sequence
        await self._check_after(after)
        # Headers now, before any event: a client learns that its watch was accepted (and from
        # which point) without waiting for the next event, which may be minutes away.
        await context.send_initial_metadata((("cna-watch-after", str(after)),))
        return after

    def _to_pb(self, event: EventRecord) -> pb.events_pb2.Event:
        """The event's message, made once for every watcher that sends it (a sequence names
        one event for good): 10 watchers of 1,000 events a second converted each 10 times."""
        got = self._converted.get(event.sequence)
        if got is None:
            got = self._converted[event.sequence] = event_to_pb(event)
            if len(self._converted) > self.CONVERTED_MAX:
                del self._converted[next(iter(self._converted))]
        return got

    async def WatchEvents(self, request, context) -> AsyncIterator[pb.events_pb2.Event]:
        after = await self._watch_from(request, context)
        try:
            async for event in self._hub.follow(after, types=tuple(request.types), resource_id=request.resource_id):
                yield self._to_pb(event)
        except ResumePointTooOld as exc:
            raise OutOfRange(str(exc), field="after_sequence") from None

    async def WatchEventBatches(self, request, context) -> AsyncIterator[pb.events_pb2.WatchEventBatchesResponse]:
        after = await self._watch_from(request, context)
        try:
            async for events in self._hub.follow_batches(after, types=tuple(request.types), resource_id=request.resource_id):
                yield pb.events_pb2.WatchEventBatchesResponse(events=[self._to_pb(e) for e in events])
        except ResumePointTooOld as exc:
            raise OutOfRange(str(exc), field="after_sequence") from None
