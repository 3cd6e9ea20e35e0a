"""EventService.WatchEventBatches on an in-process grpc.aio server over the real event log:
caught up, each message holds the one new event; a burst published while the watcher waits
arrives as few messages holding every event in sequence order; and the batches carry the
same events, field for field, as WatchEvents sends one by one."""

from __future__ import annotations

import asyncio

import grpc

from cna_agent.api import pb
from cna_agent.api.events import EventServicer
from cna_agent.state.eventlog import EventHub, EventLog
from cna_agent.state.store import StateStore

ev = pb.events_pb2


def test_batches_hold_what_is_ready_and_match_watch_events(tmp_path):
    store = StateStore(tmp_path / "agent.db")

    async def scenario():
        hub = EventHub(store, EventLog(store))
        for i in range(3):
            await hub.publish("vm.lifecycle", resource_name=f"v{i}", attributes={"state": "running"})
        server = grpc.aio.server()
        pb.events_pb2_grpc.add_EventServiceServicer_to_server(EventServicer(hub), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                stub = pb.events_pb2_grpc.EventServiceStub(ch)
                batches = stub.WatchEventBatches(ev.WatchEventsRequest(after_sequence=0, types=["vm."]), timeout=30)
                singles = stub.WatchEvents(ev.WatchEventsRequest(after_sequence=0, types=["vm."]), timeout=30)
                first = await batches.read()  # the three stored events, in one message
                await asyncio.sleep(0.2)  # caught up: waiting for the next publish
                await hub.publish("vm.lifecycle", resource_name="alone")
                alone = await batches.read()
                burst = [("vm.lifecycle", dict(resource_name=f"b{i}", attributes={"event": "suspended"})) for i in range(200)]
                burst.insert(100, ("host.note", dict(message="filtered out")))
                await hub.publish_many(burst)
                later: list[ev.Event] = []
                messages = 0
                while len(later) < 200:
                    later.extend((await batches.read()).events)
                    messages += 1
                one_by_one = [await singles.read() for _ in range(3 + 1 + 200)]
                batches.cancel()
                singles.cancel()
        finally:
            await server.stop(0)
        return first, alone, later, messages, one_by_one

    first, alone, later, messages, one_by_one = asyncio.run(scenario())
    store.close()
    assert [e.sequence for e in first.events] == [1, 2, 3]
    assert [e.resource_name for e in alone.events] == ["alone"]
    assert [e.resource_name for e in later] == [f"b{i}" for i in range(200)]
    assert [e.sequence for e in later] == list(range(5, 105)) + list(range(106, 206))  # 105: the filtered host.note
    assert messages == 1, messages  # one publish of 201 events: one message, not 200
    assert [*first.events, *alone.events, *later] == one_by_one
