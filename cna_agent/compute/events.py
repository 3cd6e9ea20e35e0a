"""libvirt domain events -> agent events (vm.lifecycle, vm.reboot, vm.watchdog, vm.io_error,
vm.panic, vm.device_removed, vm.guest_agent), plus wake-ups for operations waiting on a state change,
and the graphics clients that authenticated (``on_graphics_client``: console tickets are one-time).

Callbacks run on libvirt's event thread; they copy the few facts they need (uuid, name,
event ids) and hand them to asyncio with ``call_soon_threadsafe``. One consumer task then
takes whatever is queued as a batch and asks libvirt for each domain's *current* state and
reason (one call for the batch), so the published state is what libvirt says now, not a guess
from the event (a reboot is STOPPED then STARTED); the batch's events are published in one
event-log commit. Callbacks
are registered again after every reconnect (Hypervisor.add_on_connect).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import libvirt

from cna_agent.blocking import BlockingPool
from cna_agent.compute import state as st
from cna_agent.compute.ledger import VmStateLedger
from cna_agent.hypervisor import Hypervisor
from cna_agent.state.eventlog import EventHub
from cna_agent.tasks import cancel_and_wait

log = logging.getLogger(__name__)

#: Events handled together at most (what the callbacks queued while the last batch ran).
BATCH_MAX = 512
#: Deadline of one batch's state read.
EVENT_READ_TIMEOUT_S = 10.0


@dataclass
class _Raw:
    kind: str
    uuid: str
    name: str
    args: tuple[Any, ...] = ()
    time: float = field(default_factory=time.time)
    #: The domain as the callback got it (lifecycle events): the batch's state read asks
    #: libvirt about these objects in one call, without a lookup per domain.
    dom: Any = None


@dataclass(frozen=True)
class GraphicsClient:
    """A VNC/SPICE client that got past authentication (libvirt's GRAPHICS event, phase
    INITIALIZE): who, on which VM, and when the event reached the agent (``time``, time.time())."""
    uuid: str
    name: str
    #: The client's address as "host:port" ("[v6]:port"), from the event's remote info.
    remote: str
    #: The server's auth scheme as libvirt reports it ("vnc", "none", "spice", ...).
    auth_scheme: str
    time: float


def _job(dom: libvirt.virDomain, state: int, reason: int) -> int:
    """The domain's job type when it is paused for an unknown reason (a migration's or a
    snapshot's pause tells that apart from a guest paused on I/O), else 0."""
    if state == libvirt.VIR_DOMAIN_PAUSED and reason == libvirt.VIR_DOMAIN_PAUSED_UNKNOWN:
        try:
            return dom.jobInfo()[0]
        except libvirt.libvirtError:
            pass
    return 0


def _address(addr: Any) -> str:
    """libvirt's graphics address dict ({family, node, service}) as host:port."""
    if not isinstance(addr, dict):
        return ""
    node, service = str(addr.get("node", "")), str(addr.get("service", ""))
    if addr.get("family") == libvirt.VIR_DOMAIN_EVENT_GRAPHICS_ADDRESS_IPV6:
        node = f"[{node}]"
    return f"{node}:{service}" if service else node


class DomainEventMonitor:
    def __init__(self, hypervisor: Hypervisor, events: EventHub, *, on_change: Callable[[str, str, str, float], None] | None = None,
                 on_definition_change: Callable[[str], None] | None = None, ledger: VmStateLedger | None = None,
                 pool: BlockingPool | None = None) -> None:
        self._hv = hypervisor
        #: Where the state reads after events run: a thread of their own on the same
        #: connection, so they do not queue behind the operations that cause the events (20
        #: PauseVm/ResumeVm on 500 VMs: a read waited 58 ms at p90 in the shared pool).
        self.pool = pool
        self._events = events
        #: Every state published is recorded, so a restart can tell what changed meanwhile.
        self._ledger = ledger
        self._queue: asyncio.Queue[_Raw] = asyncio.Queue()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._callback_ids: list[int] = []
        self._conn: libvirt.virConnect | None = None
        self._changed: dict[str, asyncio.Event] = {}
        self._on_change = on_change
        self._on_definition_change = on_definition_change
        #: Called with the VM's uuid after each vm.io_error (its reconcile runs at once).
        self.on_io_error: Callable[[str], None] | None = None
        #: Called with (uuid, connected) when a guest agent connects to or leaves its channel.
        self.on_agent: Callable[[str, bool], None] | None = None
        #: Called on the loop when a graphics client has authenticated (console_tickets.py
        #: burns the ticket it used); it must not block: it hands its work to a task.
        self.on_graphics_client: Callable[[GraphicsClient], None] | None = None

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._task = self._loop.create_task(self._consume(), name="vm-events")
        self._hv.add_on_connect(self._register)
        if self._hv.connected:
            await self._hv.call(lambda conn: self._register_sync(conn), timeout=10)

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        conn, ids = self._conn, list(self._callback_ids)
        self._callback_ids.clear()
        if conn is not None and self._hv.connected:
            def unregister(c: libvirt.virConnect) -> None:
                for cid in ids:
                    try:
                        c.domainEventDeregisterAny(cid)
                    except libvirt.libvirtError:
                        pass
            try:
                await self._hv.call(unregister, timeout=5)
            except Exception:
                pass

    # -- waiting ---------------------------------------------------------------------------

    def changed_event(self, uuid: str) -> asyncio.Event:
        """An asyncio.Event set whenever a lifecycle event for ``uuid`` arrives."""
        return self._changed.setdefault(uuid, asyncio.Event())

    # -- registration (libvirt thread / executor) -------------------------------------------

    async def _register(self, conn: libvirt.virConnect) -> None:
        # An on-connect hook gets the new connection itself (Hypervisor.call would pick up
        # whatever is current), so it runs straight in the libvirt pool.
        await self._hv.pool.run(lambda: self._register_sync(conn), timeout=10, what="registering domain event callbacks")

    def _register_sync(self, conn: libvirt.virConnect) -> None:
        if self._conn is conn and self._callback_ids:
            return
        self._callback_ids.clear()
        self._conn = conn
        reg = [
            (libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._cb_lifecycle),
            (libvirt.VIR_DOMAIN_EVENT_ID_REBOOT, self._cb_reboot),
            (libvirt.VIR_DOMAIN_EVENT_ID_WATCHDOG, self._cb_watchdog),
            (libvirt.VIR_DOMAIN_EVENT_ID_IO_ERROR_REASON, self._cb_io_error),
            (libvirt.VIR_DOMAIN_EVENT_ID_DEVICE_REMOVED, self._cb_device_removed),
            (libvirt.VIR_DOMAIN_EVENT_ID_AGENT_LIFECYCLE, self._cb_agent),
            (libvirt.VIR_DOMAIN_EVENT_ID_GRAPHICS, self._cb_graphics),
        ]
        for event_id, cb in reg:
            self._callback_ids.append(conn.domainEventRegisterAny(None, event_id, cb, None))
        log.info("event=vm_events.registered callbacks=%d", len(self._callback_ids))

    def _put(self, raw: _Raw) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, raw)

    def _cb_lifecycle(self, _conn: Any, dom: libvirt.virDomain, event: int, detail: int, _opaque: Any) -> None:
        self._put(_Raw("lifecycle", dom.UUIDString(), dom.name(), (event, detail), dom=dom))

    def _cb_reboot(self, _conn: Any, dom: libvirt.virDomain, _opaque: Any) -> None:
        self._put(_Raw("reboot", dom.UUIDString(), dom.name()))

    def _cb_watchdog(self, _conn: Any, dom: libvirt.virDomain, action: int, _opaque: Any) -> None:
        self._put(_Raw("watchdog", dom.UUIDString(), dom.name(), (action,)))

    def _cb_io_error(self, _conn: Any, dom: libvirt.virDomain, src: str, alias: str, action: int, reason: str, _opaque: Any) -> None:
        self._put(_Raw("io_error", dom.UUIDString(), dom.name(), (src, alias, action, reason)))

    def _cb_device_removed(self, _conn: Any, dom: libvirt.virDomain, alias: str, _opaque: Any) -> None:
        self._put(_Raw("device_removed", dom.UUIDString(), dom.name(), (alias,)))

    def _cb_agent(self, _conn: Any, dom: libvirt.virDomain, state: int, reason: int, _opaque: Any) -> None:
        self._put(_Raw("agent", dom.UUIDString(), dom.name(), (state, reason)))

    def _cb_graphics(self, _conn: Any, dom: libvirt.virDomain, phase: int, _local: Any, remote: Any, auth_scheme: str,
                     _subject: Any, _opaque: Any) -> None:
        # Only INITIALIZE (the client authenticated); CONNECT and DISCONNECT say nothing a
        # ticket needs, and a reconnecting viewer would flood the queue with them.
        if phase == libvirt.VIR_DOMAIN_EVENT_GRAPHICS_INITIALIZE:
            self._put(_Raw("graphics", dom.UUIDString(), dom.name(), (_address(remote), str(auth_scheme or ""))))

    # -- consumer (asyncio) -------------------------------------------------------------------

    async def _consume(self) -> None:
        while True:
            batch = [await self._queue.get()]
            while len(batch) < BATCH_MAX and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            await self._handle_batch(batch)

    async def _handle_batch(self, batch: list[_Raw]) -> None:
        """Everything the callbacks queued meanwhile, in arrival order: each run of lifecycle
        events is read, published and recorded together (one libvirt call, one event-log
        commit, one ledger commit), the rest one by one. One event at a time kept a burst
        waiting: at 100 VMs paused and resumed by 20 callers, each event spent ~5 ms in its
        own state read, publish and ledger write, and the 40th in the queue waited 200 ms."""
        for lifecycle, group in itertools.groupby(batch, key=lambda raw: raw.kind == "lifecycle"):
            runs = [list(group)] if lifecycle else [[raw] for raw in group]
            for run in runs:
                try:
                    await (self._lifecycle(run) if lifecycle else self._handle(run[0]))
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("event=vm_events.handle_failed kind=%s uuid=%s events=%d", run[0].kind, run[0].uuid, len(run))

    async def _current_states(self, doms: dict[str, Any]) -> dict[str, tuple[str, str] | None | Exception]:
        """Each domain's (state, reason) now, for uuid -> the domain object its event came with:
        None for a domain that is gone, the error for one libvirt would not read (that VM's
        events are not published).

        One libvirt call for the batch (virDomainListGetStats, state group: no QEMU job, no
        monitor) on the objects of this connection. A lookup and read per domain only for an
        object of an older connection (the agent reconnected since its event: libvirt would
        answer from the object's own connection) or when that call fails, so one bad domain
        cannot cost the others their events. Per domain, a lookup and a state read are two
        remote calls: 1,000 events a second from a libvirtd outran the reader's one thread.
        """
        def one(conn: libvirt.virConnect, uuid: str) -> tuple[int, int, int] | None | Exception:
            try:
                dom = conn.lookupByUUIDString(uuid)
                s, r = dom.state()
                return s, r, _job(dom, s, r)
            except libvirt.libvirtError as exc:
                return None if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN else exc

        def query(conn: libvirt.virConnect) -> dict[str, tuple[int, int, int] | None | Exception]:
            known = [d for d in doms.values() if d is not None and d.connect() is conn]
            try:
                got = {d.UUIDString(): (d, rec) for d, rec in conn.domainListGetStats(known, libvirt.VIR_DOMAIN_STATS_STATE)} if known else {}
            except libvirt.libvirtError as exc:
                log.info("event=vm_events.bulk_state_failed domains=%d error=%r", len(known), exc)
                return {uuid: one(conn, uuid) for uuid in doms}
            out: dict[str, tuple[int, int, int] | None | Exception] = {}
            for uuid, dom in doms.items():
                if dom is None or dom.connect() is not conn:
                    out[uuid] = one(conn, uuid)
                elif uuid not in got:
                    out[uuid] = None  # libvirt skips a domain that no longer exists
                else:
                    d, rec = got[uuid]
                    s, r = int(rec.get("state.state", 0)), int(rec.get("state.reason", 0))
                    out[uuid] = (s, r, _job(d, s, r))
            return out
        got = await self._hv.call(query, timeout=EVENT_READ_TIMEOUT_S, what=f"state of {len(doms)} domains after their events",
                                  pool=self.pool)
        return {u: (v if v is None or isinstance(v, Exception) else st.map_state(*v)) for u, v in got.items()}

    async def _lifecycle(self, raws: list[_Raw]) -> None:
        """Publish lifecycle events with each domain's state read after them (DESIGN.md
        "Events": the state libvirt gives now, not one guessed from the event). A VM with two
        events in one batch (a reboot: stopped, started) shows the state after both on both,
        as one event at a time did whenever the consumer was behind."""
        for raw in raws:
            if raw.args[0] in (libvirt.VIR_DOMAIN_EVENT_DEFINED, libvirt.VIR_DOMAIN_EVENT_UNDEFINED) and self._on_definition_change:
                self._on_definition_change(raw.uuid)
        states = await self._current_states({raw.uuid: raw.dom for raw in raws})
        events: list[tuple[str, dict[str, Any]]] = []
        decided: list[tuple[_Raw, str, str]] = []
        for raw in raws:
            event, detail = raw.args
            event_name = st.LIFECYCLE_EVENTS.get(event, str(event))
            current = states.get(raw.uuid)
            if isinstance(current, Exception):
                log.warning("event=vm_events.state_unread uuid=%s event=%s error=%r", raw.uuid, event_name, current)
                continue
            if current is None:
                state, reason = ("deleted", "undefined") if event == libvirt.VIR_DOMAIN_EVENT_UNDEFINED else (st.STOPPED, event_name)
            else:
                state, reason = current
            if event == libvirt.VIR_DOMAIN_EVENT_STOPPED and detail in (libvirt.VIR_DOMAIN_EVENT_STOPPED_CRASHED, libvirt.VIR_DOMAIN_EVENT_STOPPED_FAILED):
                state, reason = st.CRASHED, st.STOPPED_DETAILS.get(detail, "failed")
            # The event's time is when libvirt's callback ran, not when it was published after
            # the state read: what a watcher measures its delay from (benchmarks.scale).
            common = dict(resource_kind="vm", resource_id=raw.uuid, resource_name=raw.name, when=raw.time)
            events.append(("vm.lifecycle", dict(severity="error" if state == st.CRASHED else "info",
                                                message=f"{raw.name}: {event_name} -> {state} ({reason})",
                                                attributes={"state": state, "reason": reason, "event": event_name,
                                                            "detail": str(detail)}, **common)))
            if event == libvirt.VIR_DOMAIN_EVENT_CRASHED:
                events.append(("vm.panic", dict(severity="error", message=f"{raw.name}: guest panicked",
                                                attributes={"state": state, "detail": str(detail), "source": "libvirt"}, **common)))
            decided.append((raw, state, reason))
        await self._events.publish_many(events)
        if self._ledger is not None:
            await self._ledger.record_many([(raw.uuid, raw.name, state, reason) for raw, state, reason in decided])
        for raw, state, reason in decided:
            if self._on_change is not None:
                self._on_change(raw.uuid, state, reason, raw.time)
            self.changed_event(raw.uuid).set()
            if state == "deleted":
                # Waiters hold the Event they wait on; the map must not keep one per VM ever
                # defined (the soak's memory growth).
                self._changed.pop(raw.uuid, None)

    async def _handle(self, raw: _Raw) -> None:
        """One event of a kind other than lifecycle."""
        common = dict(resource_kind="vm", resource_id=raw.uuid, resource_name=raw.name, when=raw.time)
        if raw.kind == "reboot":
            await self._events.publish("vm.reboot", message=f"{raw.name}: guest rebooted", **common)
        elif raw.kind == "watchdog":
            (action,) = raw.args
            await self._events.publish("vm.watchdog", severity="warning", message=f"{raw.name}: watchdog fired (action {action})",
                                       attributes={"action": str(action)}, **common)
        elif raw.kind == "io_error":
            src, alias, action, reason = raw.args
            await self._events.publish("vm.io_error", severity="error", message=f"{raw.name}: I/O error on {alias} ({src}): {reason}",
                                       attributes={"source": src, "device": alias, "action": str(action), "reason": reason}, **common)
            self.changed_event(raw.uuid).set()
            if self.on_io_error is not None:
                self.on_io_error(raw.uuid)
        elif raw.kind == "agent":
            state, reason = raw.args
            connected = state == libvirt.VIR_CONNECT_DOMAIN_EVENT_AGENT_LIFECYCLE_STATE_CONNECTED
            why = {libvirt.VIR_CONNECT_DOMAIN_EVENT_AGENT_LIFECYCLE_REASON_CHANNEL: "channel",
                   libvirt.VIR_CONNECT_DOMAIN_EVENT_AGENT_LIFECYCLE_REASON_DOMAIN_STARTED: "domain_started"}.get(reason, "unknown")
            word = "connected" if connected else "disconnected"
            await self._events.publish("vm.guest_agent", message=f"{raw.name}: guest agent {word}",
                                       attributes={"state": word, "reason": why}, **common)
            if self.on_agent is not None:
                self.on_agent(raw.uuid, connected)
        elif raw.kind == "graphics":
            remote, auth_scheme = raw.args
            if self.on_graphics_client is not None:
                self.on_graphics_client(GraphicsClient(raw.uuid, raw.name, remote, auth_scheme, raw.time))
        elif raw.kind == "device_removed":
            (alias,) = raw.args
            await self._events.publish("vm.device_removed", message=f"{raw.name}: device {alias} removed",
                                       attributes={"device": alias}, **common)
