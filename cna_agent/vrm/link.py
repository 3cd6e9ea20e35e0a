"""The link to the central manager (VRM): register, then one long-lived stream.

What it guarantees (proto/cna/v1/vrm.proto has the contract):

* Events reach the VRM at least once and in sequence order. The stream always (re)starts
  right after the VRM's last acknowledged sequence, as the VRM states at registration; a VRM
  that keeps no resume point gets the agent's own last ack, which is persisted in the state
  database on every ack, so an agent restart (``kill -9`` included) resumes where the VRM
  left off. Anything sent but not acked is sent again; the VRM drops duplicates by sequence.
* Events pruned before the VRM got them are not silently skipped: the next batch says
  ``pruned_through`` so the VRM resyncs the host.
* Heartbeats carry host stats, the latest VM stats sample and the backlog.
* Failures never leave this module: every error ends the session, is recorded in the status
  (what cna-ctl and metrics show) and is retried with exponential back-off and full jitter
  (AWS's "full jitter": sleep uniform(0, min(max, min * 2**attempt)), so a VRM restart is not
  met by every host at the same instant). The agent keeps running its VMs whatever the VRM
  does: the link only reads the event log and stats; nothing the VRM says changes a guest.
* A VRM that stops answering (hung, SIGSTOPped, a half-open TCP connection) is detected by
  silence: the VRM answers every message with an ack, and a stream that hears nothing for
  three heartbeat intervals is dropped and re-established.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import uuid
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Awaitable, Callable

import grpc

from cna_agent.api import pb
from cna_agent.api.convert import event_to_pb, timestamp
from cna_agent.config import VrmConfig
from cna_agent.state.eventlog import EventHub, EventRecord, ResumePointTooOld
from cna_agent.state.store import StateStore

log = logging.getLogger(__name__)

#: kv key holding the last sequence the VRM acknowledged.
ACK_KEY = "vrm.acked_sequence"
#: kv key holding this event log's identity (made once, with the database).
LOG_ID_KEY = "vrm.event_log_id"
SESSION_METADATA = "x-cna-session"

DISABLED, DISCONNECTED, CONNECTING, CONNECTED = "disabled", "disconnected", "connecting", "connected"


@dataclass(frozen=True)
class LinkStatus:
    state: str
    address: str
    host_uuid: str = ""
    session_id: str = ""
    last_sequence: int = 0
    acked_sequence: int = 0
    last_error: str = ""
    last_error_time: float | None = None
    connected_since: float | None = None
    last_ack_time: float | None = None
    last_heartbeat_time: float | None = None
    next_attempt_time: float | None = None
    connects: int = 0
    failures: int = 0
    events_sent: int = 0
    heartbeats_sent: int = 0
    heartbeat_interval_s: float = 0.0

    @property
    def backlog(self) -> int:
        return max(0, self.last_sequence - self.acked_sequence)


def backoff_delay(attempt: int, minimum: float, maximum: float, rng: random.Random) -> float:
    """Full jitter: uniform over [0, min(maximum, minimum * 2**attempt)]."""
    cap = min(maximum, minimum * (2 ** min(attempt, 30)))
    return rng.uniform(0, cap)


@dataclass(frozen=True)
class _Pruned:
    """Marker in the send queue: events up to ``through`` are gone from the log."""

    through: int


class VrmLink:
    def __init__(
        self,
        config: VrmConfig,
        *,
        store: StateStore,
        events: EventHub,
        register_request: Callable[[], Awaitable[Any]],
        heartbeat: Callable[[], Awaitable[Any]],
        rng: random.Random | None = None,
    ) -> None:
        """``register_request()`` returns a RegisterRequest with the host's identity,
        capabilities and endpoint; ``heartbeat()`` a Heartbeat with host and VM stats (the
        link fills in the sequence fields of both)."""
        self._cfg = config
        self._store = store
        self._events = events
        self._register_request = register_request
        self._heartbeat = heartbeat
        self._rng = rng or random.Random()
        self._task: asyncio.Task | None = None
        self._status = LinkStatus(state=DISABLED if not config.address else DISCONNECTED, address=config.address,
                                  heartbeat_interval_s=config.heartbeat_interval_s)
        self._acked = 0
        self._sent_through = 0
        self._last_heard = 0.0
        self._heard = False
        self._log_id = ""
        self._interval = config.heartbeat_interval_s

    # -- public -------------------------------------------------------------------------

    @property
    def enabled(self) -> bool:
        return bool(self._cfg.address)

    def status(self) -> LinkStatus:
        """Current status (reads the log's last sequence: call off the loop via store.run)."""
        return replace(self._status, last_sequence=self._events.log.last_sequence(), acked_sequence=self._acked,
                       heartbeat_interval_s=self._interval)

    async def start(self) -> None:
        if not self.enabled or self._task is not None:
            return
        self._acked = int(await self._store.run(self._store.get_value, ACK_KEY, "0") or 0)
        self._log_id = await self._store.run(self._event_log_id)
        self._task = asyncio.get_running_loop().create_task(self._run(), name="vrm-link")

    async def stop(self) -> None:
        if self._task is None:
            return
        self._task.cancel()
        try:
            await self._task
        except (asyncio.CancelledError, Exception):
            pass
        self._task = None
        self._set(state=DISCONNECTED)

    def _event_log_id(self) -> str:
        log_id = self._store.get_value(LOG_ID_KEY)
        if not log_id:
            log_id = str(uuid.uuid4())
            self._store.set_value(LOG_ID_KEY, log_id)
        return log_id

    # -- the loop -----------------------------------------------------------------------

    def _set(self, **changes: Any) -> None:
        self._status = replace(self._status, **changes)

    async def _run(self) -> None:
        attempt = 0
        while True:
            self._set(state=CONNECTING, next_attempt_time=None)
            self._heard = False
            try:
                await self._session()
                why = "the VRM closed the stream"
            except asyncio.CancelledError:
                raise
            except grpc.aio.AioRpcError as exc:
                why = f"{exc.code().name}: {exc.details()}"
            except Exception as exc:  # never out of here: the agent must keep running
                why = f"{type(exc).__name__}: {exc}"
            if self._heard:
                attempt = 0  # the VRM worked on this stream: start the back-off over
            delay = backoff_delay(attempt, self._cfg.backoff_min_s, self._cfg.backoff_max_s, self._rng)
            attempt += 1
            now = time.time()
            self._set(state=DISCONNECTED, session_id="", connected_since=None, last_error=why, last_error_time=now,
                      failures=self._status.failures + 1, next_attempt_time=now + delay)
            log.warning("event=vrm.disconnected address=%s error=%r retry_in_s=%.1f", self._cfg.address, why, delay)
            await asyncio.sleep(delay)

    def _channel(self) -> grpc.aio.Channel:
        cfg = self._cfg
        options = [("grpc.max_receive_message_length", 16 * 1024 * 1024), ("grpc.max_send_message_length", 64 * 1024 * 1024),
                   ("grpc.enable_retries", 0)]
        if cfg.ca or cfg.cert:
            def read(path: str) -> bytes | None:
                return Path(path).read_bytes() if path else None

            creds = grpc.ssl_channel_credentials(root_certificates=read(cfg.ca), private_key=read(cfg.key),
                                                 certificate_chain=read(cfg.cert))
            return grpc.aio.secure_channel(cfg.address, creds, options=options)
        return grpc.aio.insecure_channel(cfg.address, options=options)

    async def _session(self) -> None:
        """Register and run one stream until it fails (sets ``_heard`` once the VRM answers)."""
        channel = self._channel()
        try:
            stub = pb.vrm_pb2_grpc.VrmServiceStub(channel)
            request = await self._register_request()
            last, oldest = await self._store.run(lambda: (self._events.log.last_sequence(), self._events.log.oldest_sequence()))
            request.last_sequence, request.oldest_sequence, request.agent_acked_sequence = last, oldest, self._acked
            request.event_log_id = self._log_id
            self._set(host_uuid=request.host_uuid)
            reply = await stub.Register(request, timeout=30)
            if reply.HasField("last_acked_sequence"):
                if reply.last_acked_sequence > last:
                    # Acks for events this log never wrote: a VRM mixing up logs. Skipping
                    # to its number would lose events; keep our own resume point.
                    log.warning("event=vrm.ack_beyond_log vrm_acked=%d last_sequence=%d using=%d",
                                reply.last_acked_sequence, last, min(self._acked, last))
                    await self._persist_ack(min(self._acked, last), force=True)
                else:
                    # The VRM's word wins otherwise: lower = it lost events (send them
                    # again), higher = it got them in a session whose acks we missed.
                    await self._persist_ack(reply.last_acked_sequence, force=True)
            if reply.heartbeat_interval_seconds > 0:
                self._interval = reply.heartbeat_interval_seconds
            after = self._acked
            call = stub.Connect(metadata=((SESSION_METADATA, reply.session_id),))
            now = time.time()
            self._last_heard = asyncio.get_running_loop().time()
            self._sent_through = after
            self._set(state=CONNECTED, session_id=reply.session_id, connected_since=now,
                      connects=self._status.connects + 1)
            log.info("event=vrm.connected address=%s session=%s resume_after=%d last_sequence=%d",
                     self._cfg.address, reply.session_id, after, last)
            queue: asyncio.Queue = asyncio.Queue(maxsize=self._cfg.batch_size * 2)
            tasks = [
                asyncio.create_task(self._feed(queue, after), name="vrm-feed"),
                asyncio.create_task(self._write(call, queue), name="vrm-write"),
                asyncio.create_task(self._read(call), name="vrm-read"),
                asyncio.create_task(self._watchdog(), name="vrm-watchdog"),
            ]
            try:
                done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                for t in done:
                    exc = t.exception()
                    if exc is not None:
                        raise exc
            finally:
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                call.cancel()
        finally:
            await channel.close(grace=None)

    async def _feed(self, queue: asyncio.Queue, after: int) -> None:
        """Event log -> queue, from ``after`` on, forever (the queue bounds what is read ahead)."""
        while True:
            try:
                async for event in self._events.follow(after, batch=self._cfg.batch_size):
                    await queue.put(event)
                    after = event.sequence
                await asyncio.Event().wait()  # the hub closed: the agent is stopping
            except ResumePointTooOld as exc:
                log.warning("event=vrm.events_pruned after=%d oldest=%d", exc.after, exc.oldest)
                after = exc.oldest - 1
                await queue.put(_Pruned(after))

    async def _write(self, call: Any, queue: asyncio.Queue) -> None:
        loop = asyncio.get_running_loop()
        next_beat = loop.time()
        pending: Any = None
        while True:
            item = pending
            pending = None
            if item is None:
                wait = next_beat - loop.time()
                try:
                    item = queue.get_nowait() if wait <= 0 else await asyncio.wait_for(queue.get(), wait)
                except (asyncio.QueueEmpty, asyncio.TimeoutError):
                    item = None
            if item is not None:
                batch = pb.vrm_pb2.EventBatch()
                events: list[EventRecord] = []
                if isinstance(item, _Pruned):
                    batch.pruned_through = item.through
                else:
                    events.append(item)
                while len(events) < self._cfg.batch_size and not queue.empty():
                    nxt = queue.get_nowait()
                    if isinstance(nxt, _Pruned):
                        pending = nxt
                        break
                    events.append(nxt)
                batch.events.extend(event_to_pb(e) for e in events)
                await call.write(pb.vrm_pb2.AgentMessage(time=timestamp(time.time()), events=batch))
                if events:
                    self._sent_through = events[-1].sequence
                self._set(events_sent=self._status.events_sent + len(events))
            if loop.time() >= next_beat:
                beat = await self._heartbeat()
                last = await self._events.last_sequence()
                beat.last_sequence, beat.acked_sequence, beat.backlog = last, self._acked, max(0, last - self._acked)
                await call.write(pb.vrm_pb2.AgentMessage(time=timestamp(time.time()), heartbeat=beat))
                self._set(heartbeats_sent=self._status.heartbeats_sent + 1, last_heartbeat_time=time.time())
                next_beat = loop.time() + self._interval

    async def _read(self, call: Any) -> None:
        loop = asyncio.get_running_loop()
        while True:
            msg = await call.read()
            if msg is grpc.aio.EOF:
                raise ConnectionError("the VRM closed the stream")
            self._last_heard = loop.time()
            self._heard = True
            which = msg.WhichOneof("payload")
            if which == "ack":
                # Never beyond what this session sent: a confused VRM must not make us skip events.
                seq = min(msg.ack.sequence, max(self._sent_through, self._acked))
                if seq > self._acked:
                    await self._persist_ack(seq)
                self._set(last_ack_time=time.time())
            elif which == "settings" and msg.settings.heartbeat_interval_seconds > 0:
                self._interval = max(0.1, msg.settings.heartbeat_interval_seconds)

    async def _watchdog(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            limit = 3 * self._interval + 1
            silent = loop.time() - self._last_heard
            if silent > limit:
                raise TimeoutError(f"no answer from the VRM for {silent:.0f}s")
            await asyncio.sleep(min(1.0, max(0.1, limit - silent)))

    async def _persist_ack(self, seq: int, *, force: bool = False) -> None:
        if seq == self._acked and not force:
            return
        await self._store.run(self._store.set_value, ACK_KEY, str(seq))
        self._acked = seq

