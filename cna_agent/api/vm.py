"""VmService servicer: proto -> compute spec/arguments -> VmService -> proto (nothing else)."""

from __future__ import annotations

from typing import Any

from cna_agent.api import pb
from cna_agent.api.convert import operation_to_pb
from cna_agent.api.status import abort_with
from cna_agent.api.vm_convert import STATE_NAMES, console_to_pb, snapshot_to_pb, spec_from_pb, vm_to_pb
from cna_agent.api.convert import request_fingerprint as fingerprint
from cna_agent.compute.service import VmService
from cna_agent.errors import AgentError, InvalidArgument




def _seconds(duration: Any, field: str, maximum: float = 86400.0) -> float:
    value = duration.seconds + duration.nanos / 1e9
    if value < 0 or value > maximum:
        raise InvalidArgument(field, f"{value:g}s is not in 0..{maximum:g}s")
    return value


def _later(method: str) -> str:
    from cna_agent import __version__

    return (f"cna.v1.VmService/{method} is not implemented by cna-agent {__version__} on this host yet; "
            "it is part of the published cna.v1 API and arrives in a later agent release")


class VmServicer(pb.vm_pb2_grpc.VmServiceServicer):
    """Serial console streaming and snapshots land later; until then they answer a clear
    UNIMPLEMENTED naming the method."""

    def __init__(self, service: VmService) -> None:
        self._svc = service

    async def _op(self, context: Any, coro: Any) -> Any:
        try:
            return operation_to_pb(await coro)
        except AgentError as exc:
            await abort_with(context, exc)

    async def CreateVm(self, request, context):
        if not request.HasField("spec"):
            await abort_with(context, InvalidArgument("spec", "is required"))
        return await self._op(context, self._svc.create(spec_from_pb(request.spec), start=request.start,
                                                        request_id=request.request_id, fingerprint=fingerprint(request)))

    async def GetVm(self, request, context):
        try:
            return vm_to_pb(await self._svc.get(request.vm))
        except AgentError as exc:
            await abort_with(context, exc)

    async def ListVms(self, request, context):
        states = []
        for i, s in enumerate(request.states):
            if s not in STATE_NAMES:
                await abort_with(context, InvalidArgument(f"states[{i}]", f"unknown state {s}"))
            states.append(STATE_NAMES[s])
        try:
            vms = await self._svc.list(states=states, include_unmanaged=request.include_unmanaged, status_only=request.status_only)
        except AgentError as exc:
            await abort_with(context, exc)
        return pb.vm_pb2.ListVmsResponse(vms=[vm_to_pb(v) for v in vms])

    async def UpdateVm(self, request, context):
        return await self._op(context, self._svc.update(request.vm, spec_from_pb(request.spec), list(request.update_mask),
                                                        request_id=request.request_id, fingerprint=fingerprint(request)))

    async def DeleteVm(self, request, context):
        return await self._op(context, self._svc.delete(request.vm, delete_disks=request.delete_disks, force=request.force,
                                                        request_id=request.request_id, fingerprint=fingerprint(request)))

    async def _action(self, request, context, method):
        try:
            lock_timeout = _seconds(request.lock_timeout, "lock_timeout", 3600)
        except AgentError as exc:
            await abort_with(context, exc)
        return await self._op(context, method(request.vm, request_id=request.request_id, fingerprint=fingerprint(request),
                                              lock_timeout=lock_timeout))

    async def StartVm(self, request, context):
        return await self._action(request, context, self._svc.start_vm)

    async def PauseVm(self, request, context):
        return await self._action(request, context, self._svc.pause)

    async def ResumeVm(self, request, context):
        return await self._action(request, context, self._svc.resume)

    async def ShutdownVm(self, request, context):
        try:
            timeout = _seconds(request.timeout, "timeout")
            lock_timeout = _seconds(request.lock_timeout, "lock_timeout", 3600)
        except AgentError as exc:
            await abort_with(context, exc)
        return await self._op(context, self._svc.shutdown(request.vm, timeout=timeout, force=request.force, hard=request.hard,
                                                          request_id=request.request_id, fingerprint=fingerprint(request),
                                                          lock_timeout=lock_timeout))

    async def RebootVm(self, request, context):
        try:
            lock_timeout = _seconds(request.lock_timeout, "lock_timeout", 3600)
        except AgentError as exc:
            await abort_with(context, exc)
        return await self._op(context, self._svc.reboot(request.vm, hard=request.hard, request_id=request.request_id,
                                                        fingerprint=fingerprint(request), lock_timeout=lock_timeout))

    async def GetConsole(self, request, context):
        try:
            return console_to_pb(await self._svc.console(request.vm))
        except AgentError as exc:
            await abort_with(context, exc)

    async def GetVmDiagnostics(self, request, context):
        try:
            d = await self._svc.diagnostics(request.vm, dirty_rate_seconds=request.dirty_rate_seconds)
        except AgentError as exc:
            await abort_with(context, exc)
        return pb.vm_pb2.VmDiagnostics(
            qemu_status=d.qemu_status, qemu_running=d.qemu_running, dirty_rate_measured=d.dirty_rate_measured,
            dirty_rate_mib_s=d.dirty_rate_mib_s, panic_info=d.panic_info, side_channel_socket=d.socket,
            qemu_version=d.qemu_version,
            vcpu_threads=[pb.vm_pb2.VcpuThread(cpu_index=i, thread_id=t, qom_path=q) for i, t, q in d.vcpu_threads])

    async def SerialConsole(self, request_iterator, context):
        """First input names the VM (and ``force``); then guest output streams out and input
        bytes are typed in, until either side closes."""
        import asyncio

        first = None
        async for msg in request_iterator:
            first = msg
            break
        if first is None:
            return
        try:
            session = await self._svc.open_console(first.vm, force=first.force)
        except AgentError as exc:
            await abort_with(context, exc)
            return

        # A client that cancels or disconnects does not end this generator: grpc aio leaves it
        # suspended in session.output(), so libvirt kept the console "in use" and the next
        # `cna-ctl vm console` needed --force. Close the session when the RPC terminates.
        loop = asyncio.get_running_loop()

        def rpc_done(_context: object) -> None:
            loop.call_soon_threadsafe(lambda: loop.create_task(session.close()))

        context.add_done_callback(rpc_done)

        async def pump_input() -> None:
            try:
                if first.data:
                    await session.write(first.data)
                async for msg in request_iterator:
                    await session.write(msg.data)
            finally:
                await session.close()  # the client half-closed or went away: end the output too

        writer = asyncio.get_running_loop().create_task(pump_input())
        try:
            async for data in session.output():
                yield pb.vm_pb2.SerialConsoleOutput(data=data)
        finally:
            writer.cancel()
            await session.close()
            try:
                await writer
            except (asyncio.CancelledError, Exception):
                pass

    async def CreateSnapshot(self, request, context):
        return await self._op(context, self._svc.create_snapshot(request.vm, request.name, description=request.description,
                                                                 quiesce=request.quiesce, request_id=request.request_id,
                                                                 fingerprint=fingerprint(request)))

    async def ListSnapshots(self, request, context):
        try:
            infos = await self._svc.list_snapshots(request.vm)
        except AgentError as exc:
            await abort_with(context, exc)
        return pb.vm_pb2.ListSnapshotsResponse(snapshots=[snapshot_to_pb(i) for i in infos])

    async def RevertSnapshot(self, request, context):
        return await self._op(context, self._svc.revert_snapshot(request.vm, request.snapshot, request_id=request.request_id,
                                                                 fingerprint=fingerprint(request)))

    async def DeleteSnapshot(self, request, context):
        return await self._op(context, self._svc.delete_snapshot(request.vm, request.snapshot, request_id=request.request_id,
                                                                 fingerprint=fingerprint(request)))
