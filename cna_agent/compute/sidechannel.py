"""One QMP side-channel connection per running managed VM (see qmp.py for what and why).

A QEMU chardev socket server takes one client at a time, so the agent keeps exactly one
connection per guest and shares it: the event follower (GUEST_PANICKED details become
``vm.panic`` events with ``source=qmp``, beside libvirt's own crashed event) and the
diagnostics queries (GetVmDiagnostics). Connections open when libvirt reports the guest
running (and for running guests at adoption) and close when it stops; a broken connection is
dropped and reopened on next use. Nothing here changes guest state (qmp.ALLOWED_COMMANDS).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

from cna_agent.compute.qmp import QmpSideChannel
from cna_agent.errors import AgentError, Unavailable
from cna_agent.state.eventlog import EventHub

log = logging.getLogger(__name__)

PathLookup = Callable[[str], Awaitable[tuple[str, str]]]  # uuid -> (socket path, vm name)


@dataclass
class Diagnostics:
    qemu_status: str = ""
    qemu_running: bool = False
    dirty_rate_measured: bool = False
    dirty_rate_mib_s: float = 0.0
    panic_info: dict[str, str] = field(default_factory=dict)
    vcpu_threads: list[tuple[int, int, str]] = field(default_factory=list)  # (cpu index, thread id, qom path)
    socket: str = ""
    qemu_version: str = ""


def flatten(prefix: str, value: Any, out: dict[str, str]) -> dict[str, str]:
    """Nested QMP data -> flat string attributes (event attributes are a string map)."""
    if isinstance(value, dict):
        for k, v in value.items():
            flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            flatten(f"{prefix}.{i}", v, out)
    else:
        out[prefix] = str(value).lower() if isinstance(value, bool) else str(value)
    return out


class SideChannels:
    def __init__(self, events: EventHub, lookup: PathLookup) -> None:
        self._events = events
        self._lookup = lookup
        self._conns: dict[str, QmpSideChannel] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._names: dict[str, str] = {}
        #: VMs whose running definition has no side channel (defined by an older agent, or a
        #: hypervisor without QEMU): not looked up again on each resume until they stop.
        self._without: set[str] = set()
        self.panics: dict[str, dict[str, str]] = {}

    async def attach(self, uuid: str) -> QmpSideChannel:
        """The VM's connection, opened (and its event follower started) if needed."""
        async with self._locks.setdefault(uuid, asyncio.Lock()):
            conn = self._conns.get(uuid)
            if conn is not None:
                return conn
            path, name = await self._lookup(uuid)
            if not path:
                self._without.add(uuid)
                raise Unavailable(f"vm {name!r} was defined without the agent's QMP side channel (restart it after a redefine)")
            # One logger name for all: qemu.qmp makes a logger per client name, and Python's
            # logging keeps every logger for ever (the soak saw one per VM ever started).
            conn = QmpSideChannel(path)
            await conn.connect()
            self._names[uuid] = name
            conn.follow_events(lambda ev, data: self._on_event(uuid, ev, data))
            self._conns[uuid] = conn
            log.info("event=qmp.attached vm=%s path=%s", uuid, path)
            return conn

    async def detach(self, uuid: str) -> None:
        conn = self._conns.pop(uuid, None)
        if conn is not None:
            try:
                await conn.close()
            except (EOFError, OSError) as exc:  # QEMU went first (stopped, migrated away): nothing left to close
                log.debug("event=qmp.detached vm=%s after=%r", uuid, exc)

    def state_changed(self, uuid: str, state: str) -> None:
        """Lifecycle hook (called on the event loop): follow running guests, drop stopped ones."""
        loop = asyncio.get_running_loop()
        if state == "running":
            if uuid not in self._conns and uuid not in self._without:
                loop.create_task(self._attach_quietly(uuid), name=f"qmp-attach-{uuid}")
        elif state in ("stopped", "crashed"):
            self._without.discard(uuid)  # its next run may be of a definition that has one
            loop.create_task(self.detach(uuid), name=f"qmp-detach-{uuid}")
        elif state == "deleted":
            loop.create_task(self._forget(uuid), name=f"qmp-forget-{uuid}")

    async def _forget(self, uuid: str) -> None:
        """A VM that is gone: close its connection and drop everything kept for it."""
        await self.detach(uuid)
        self._names.pop(uuid, None)
        self._without.discard(uuid)
        self.panics.pop(uuid, None)
        lock = self._locks.get(uuid)
        if lock is not None and not lock.locked():
            self._locks.pop(uuid, None)

    async def _attach_quietly(self, uuid: str) -> None:
        for delay in (0.0, 0.5, 1.0, 2.0):
            await asyncio.sleep(delay)
            try:
                await self.attach(uuid)
                return
            except AgentError as exc:
                if uuid in self._without:  # no side channel in this run's definition: waiting will not make one
                    log.info("event=qmp.no_side_channel vm=%s", uuid)
                    return
                last = exc
            except Exception as exc:  # libvirt errors: the domain went away meanwhile
                last = exc  # type: ignore[assignment]
        log.warning("event=qmp.attach_failed vm=%s error=%r", uuid, last)

    async def close(self) -> None:
        for uuid in list(self._conns):
            await self.detach(uuid)

    async def _on_event(self, uuid: str, event: str, data: dict[str, Any]) -> None:
        if event != "GUEST_PANICKED":
            return
        name = self._names.get(uuid, "")
        attrs = flatten("", data, {"source": "qmp"})
        attrs["time"] = str(time.time())
        self.panics[uuid] = attrs
        info = data.get("info") or {}
        await self._events.publish(
            "vm.panic", severity="error", resource_kind="vm", resource_id=uuid, resource_name=name,
            message=f"{name}: guest panicked (QEMU action {data.get('action', '?')}, {info.get('type', 'no details from the guest')})",
            attributes=attrs)

    async def _execute(self, uuid: str, command: str, args: dict[str, Any] | None = None) -> Any:
        conn = await self.attach(uuid)
        try:
            return await conn.execute(command, args)
        except Unavailable:
            await self.detach(uuid)  # broken: the next call reconnects
            raise

    async def query(self, uuid: str, command: str, args: dict[str, Any] | None = None) -> Any:
        """One allowlisted command on the VM's side channel (the stats collector's block and
        guest-memory reads, vm_counters.py)."""
        return await self._execute(uuid, command, args)

    async def persistent_bitmaps(self, uuid: str) -> dict[str, set[str]]:
        """Image file -> names of the persistent dirty bitmaps QEMU holds on it now (a bitmap
        made during this QEMU's run is written into the qcow2 only when QEMU closes it, so the
        file itself cannot say)."""
        out: dict[str, set[str]] = {}
        for node in await self._execute(uuid, "query-named-block-nodes", {"flat": True}):
            names = {str(b.get("name")) for b in node.get("dirty-bitmaps") or () if b.get("persistent")}
            if names and node.get("file"):
                out.setdefault(str(node["file"]), set()).update(names)
        return out

    async def diagnostics(self, uuid: str, dirty_rate_seconds: int = 0) -> Diagnostics:
        status = await self._execute(uuid, "query-status")
        out = Diagnostics(qemu_status=str(status.get("status", "")), qemu_running=bool(status.get("running")),
                          socket=self._conns[uuid].path if uuid in self._conns else "")
        ver = await self._execute(uuid, "query-version")
        q = ver.get("qemu", {})
        out.qemu_version = f"{q.get('major')}.{q.get('minor')}.{q.get('micro')}{ver.get('package', '')}"
        for cpu in await self._execute(uuid, "query-cpus-fast"):
            out.vcpu_threads.append((int(cpu.get("cpu-index", 0)), int(cpu.get("thread-id", 0)), str(cpu.get("qom-path", ""))))
        if dirty_rate_seconds:
            conn = await self.attach(uuid)
            rate = await conn.dirty_rate(dirty_rate_seconds)
            out.dirty_rate_measured = True
            out.dirty_rate_mib_s = float(rate.get("dirty-rate", 0))
        out.panic_info = dict(self.panics.get(uuid, {}))
        return out
