"""Serial console sessions over libvirt's console API (virDomainOpenConsole + a virStream).

Why libvirt's API and not the pty or the log file: libvirt owns the pty, tracks who holds it
(one reader at a time, so two typists never interleave), and the same call works on
qemu:///system and the embedded driver. The stream is non-blocking; its callbacks run on
libvirt's event-loop thread (Hypervisor.ensure_event_loop) and only copy bytes into an
asyncio queue with ``call_soon_threadsafe``. Input is written from the hypervisor executor.

A console someone else holds gives FAILED_PRECONDITION naming ``force`` (which takes the
console over, as ``virsh console --force`` does). A console this agent's own last session holds
while it is being released (the client cancelled a moment ago, and the release has not reached
libvirt yet) is not "someone else": :class:`ConsoleSessions` waits for that release and opens.
"""

from __future__ import annotations

import asyncio
import logging
from typing import AsyncIterator

import libvirt

from cna_agent.hypervisor import Hypervisor
from cna_agent.errors import FailedPrecondition, Unavailable

log = logging.getLogger(__name__)

CHUNK = 64 * 1024
_EOF = b""


class ConsoleSession:
    """One open console: ``output()`` yields guest bytes, ``write()`` types into the guest."""

    def __init__(self, hv: Hypervisor, uuid: str, name: str) -> None:
        self._hv = hv
        self.uuid = uuid
        self.name = name
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[bytes] = asyncio.Queue()
        self._stream: libvirt.virStream | None = None
        self._closed = False
        self._closing: asyncio.Future[None] | None = None
        #: Set once libvirt has let go of the console (or it was never opened).
        self.released = asyncio.Event()

    async def open(self, *, force: bool = False) -> None:
        def do(conn: libvirt.virConnect) -> libvirt.virStream:
            dom = conn.lookupByUUIDString(self.uuid)
            if not dom.isActive():
                raise FailedPrecondition(f"vm {self.name!r} is not running; its serial console exists only while it runs", field="vm")
            stream = conn.newStream(libvirt.VIR_STREAM_NONBLOCK)
            flags = libvirt.VIR_DOMAIN_CONSOLE_FORCE if force else libvirt.VIR_DOMAIN_CONSOLE_SAFE
            try:
                dom.openConsole(None, stream, flags)
            except libvirt.libvirtError as exc:
                try:
                    stream.abort()
                except libvirt.libvirtError:
                    pass
                msg = str(exc)
                if "Active console session" in msg or "busy" in msg.lower():
                    raise FailedPrecondition(f"the serial console of vm {self.name!r} is in use by another session; "
                                             "pass force to take it over", field="force") from None
                raise Unavailable(f"cannot open the serial console of vm {self.name!r}: {msg}") from None
            events = libvirt.VIR_STREAM_EVENT_READABLE | libvirt.VIR_STREAM_EVENT_ERROR | libvirt.VIR_STREAM_EVENT_HANGUP
            stream.eventAddCallback(events, self._on_stream, None)
            return stream

        self._stream = await self._hv.call(do, timeout=15)
        log.info("event=console.opened vm=%s force=%s", self.uuid, force)

    # libvirt event-loop thread
    def _on_stream(self, stream: libvirt.virStream, events: int, _opaque: object) -> None:
        if events & libvirt.VIR_STREAM_EVENT_READABLE:
            while True:
                try:
                    data = stream.recv(CHUNK)
                except libvirt.libvirtError:
                    data = _EOF
                if data == -2:  # EAGAIN: drained
                    break
                if not data:
                    self._finish(stream)
                    return
                self._loop.call_soon_threadsafe(self._queue.put_nowait, bytes(data))
        if events & (libvirt.VIR_STREAM_EVENT_ERROR | libvirt.VIR_STREAM_EVENT_HANGUP):
            self._finish(stream)

    def _finish(self, stream: libvirt.virStream) -> None:
        try:
            stream.eventRemoveCallback()
        except libvirt.libvirtError:
            pass
        self._loop.call_soon_threadsafe(self._queue.put_nowait, _EOF)

    async def output(self) -> AsyncIterator[bytes]:
        while True:
            data = await self._queue.get()
            if not data:
                return
            yield data

    async def write(self, data: bytes) -> None:
        if not data or self._stream is None or self._closed:
            return
        stream = self._stream

        def send(_conn: libvirt.virConnect) -> None:
            view = memoryview(data)
            spins = 0
            while view:
                n = stream.send(bytes(view))
                if n == -2:  # EAGAIN: the pty is full; the guest reads slowly under TCG
                    spins += 1
                    if spins > 500:
                        raise Unavailable("the guest is not reading its serial console")
                    import time

                    time.sleep(0.01)
                    continue
                view = view[n:]

        try:
            await self._hv.call(send, timeout=30)
        except libvirt.libvirtError as exc:
            raise Unavailable(f"the serial console of vm {self.name!r} closed: {exc}") from None

    async def close(self) -> None:
        """Release the console; safe to call from several places and from cancelled tasks.

        The release runs as a task of its own and callers wait on it shielded: the RPC handler
        closes from a task that is itself being cancelled (the client went away), and a
        cancelled await must not skip the abort, or libvirt keeps the console "in use".
        """
        if self._stream is None:
            self.released.set()
            return
        self._closed = True
        if self._closing is None:
            self._closing = asyncio.ensure_future(self._release(self._stream))
        await asyncio.shield(self._closing)

    async def _release(self, stream: libvirt.virStream) -> None:
        def close(_conn: libvirt.virConnect) -> None:
            try:
                stream.eventRemoveCallback()
            except libvirt.libvirtError:
                pass
            # abort, not finish: finish waits for the stream to drain, which a console (a pty
            # with no end) never does, so libvirt kept the console "in use" after the client left.
            try:
                stream.abort()
            except libvirt.libvirtError:
                try:
                    stream.finish()
                except libvirt.libvirtError:
                    pass

        try:
            await self._hv.call(close, timeout=10)
        except Exception:
            log.exception("event=console.close_failed vm=%s", self.uuid)
        self._queue.put_nowait(_EOF)
        self.released.set()
        log.info("event=console.closed vm=%s", self.uuid)


class ConsoleSessions:
    """The sessions this agent holds, per VM, so a new session can tell "in use by someone
    else" from "held by our own session that is on its way out".

    Why wait at all: a client that closes a session and opens the next one at once (cna-ctl run
    twice, a VRM console proxy reconnecting) sends the cancel and the new call back to back; the
    new call can reach libvirt before the old session's release does, and was refused as busy.
    The wait is bounded (``grace``): a session whose client is really still there is not
    released in that time, and the refusal stands.
    """

    def __init__(self, *, grace: float = 3.0) -> None:
        self._held: dict[str, list[ConsoleSession]] = {}
        self.grace = grace

    async def open(self, session: ConsoleSession, *, force: bool = False) -> ConsoleSession:
        try:
            await session.open(force=force)
        except FailedPrecondition:
            ours = [s for s in self._held.get(session.uuid, []) if not s.released.is_set()]
            if not ours:
                raise
            try:
                await asyncio.wait_for(asyncio.gather(*(s.released.wait() for s in ours)), self.grace)
            except asyncio.TimeoutError:
                raise FailedPrecondition(f"the serial console of vm {session.name!r} is in use by another session; "
                                         "pass force to take it over", field="force") from None
            await session.open(force=force)
        held = self._held.setdefault(session.uuid, [])
        held.append(session)
        asyncio.ensure_future(self._forget(session))
        return session

    async def _forget(self, session: ConsoleSession) -> None:
        await session.released.wait()
        held = self._held.get(session.uuid, [])
        if session in held:
            held.remove(session)
        if not held:
            self._held.pop(session.uuid, None)

    def held(self, uuid: str) -> int:
        """How many sessions of this agent hold the VM's console now."""
        return sum(1 for s in self._held.get(uuid, []) if not s.released.is_set())
