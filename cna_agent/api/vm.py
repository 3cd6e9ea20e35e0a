"""VmService servicer: proto -> compute spec/arguments -> compute's parts -> proto (nothing else)."""

from __future__ import annotations

from typing import Any

from cna_agent.api import pb
from cna_agent.api.convert import operation_to_pb
from cna_agent.api.vm_convert import (STATE_NAMES, console_to_pb, customization_from_pb, guest_info_to_pb, migration_policy_from_pb, snapshot_to_pb,
                                     spec_from_pb, vm_to_pb, SpecMessages)
from cna_agent.api.convert import request_fingerprint as fingerprint
from cna_agent.compute.service import Compute
from cna_agent.errors import FailedPrecondition, InvalidArgument




def _seconds(duration: Any, field: str, maximum: float = 86400.0) -> float:
    value = duration.seconds + duration.nanos / 1e9
    if value < 0 or value > maximum:
        raise InvalidArgument(field, f"{value:g}s is not in 0..{maximum:g}s")
    return value


class VmServicer(pb.vm_pb2_grpc.VmServiceServicer):
    def __init__(self, compute: Compute) -> None:
        self._c = compute
        self._life = compute.lifecycle
        self._inv = compute.inventory
        self._snaps = compute.snapshots
        self._spec_msgs = SpecMessages()

    async def _op(self, context: Any, coro: Any) -> Any:
        return operation_to_pb(await coro)

    async def CreateVm(self, request, context):
        if not request.HasField("spec"):
            raise InvalidArgument("spec", "is required")
        customization = customization_from_pb(request.customization) if request.HasField("customization") else None
        if customization is not None and customization.empty():
            customization = None  # an empty message is as good as none (proto3 clients send them)
        # The fingerprint leaves the customization out: the journal keeps no hash of password
        # hashes or user data.
        blank = type(request)()
        blank.CopyFrom(request)
        blank.ClearField("customization")
        return await self._op(context, self._life.create(spec_from_pb(request.spec), start=request.start,
                                                        request_id=request.request_id, fingerprint=fingerprint(blank),
                                                        customization=customization))

    async def GetVm(self, request, context):
        return vm_to_pb(await self._inv.get(request.vm))

    async def ListVms(self, request, context):
        states = []
        for i, s in enumerate(request.states):
            if s not in STATE_NAMES:
                raise InvalidArgument(f"states[{i}]", f"unknown state {s}")
            states.append(STATE_NAMES[s])
        vms = await self._inv.list(states=states, include_unmanaged=request.include_unmanaged, status_only=request.status_only,
                                   recycled=request.recycled)
        msgs = self._spec_msgs
        out = pb.vm_pb2.ListVmsResponse(vms=[vm_to_pb(v, msgs.of(v.uuid, v.spec) if v.spec is not None else None) for v in vms])
        if not states and not request.recycled:
            msgs.keep_only({v.uuid for v in vms})
        return out

    async def MigrateVm(self, request, context):
        return await self._op(context, self._c.migrations.migrate(request.vm, request.destination,
                                                                 migration_policy_from_pb(request.policy),
                                                                 request_id=request.request_id, fingerprint=fingerprint(request),
                                                                 keep_source_volumes=request.keep_source_volumes))

    async def UpdateVm(self, request, context):
        return await self._op(context, self._c.updates.update(request.vm, spec_from_pb(request.spec), list(request.update_mask),
                                                        request_id=request.request_id, fingerprint=fingerprint(request),
                                                        allow_pending=request.allow_pending))

    async def DeleteVm(self, request, context):
        return await self._op(context, self._life.delete(request.vm, delete_disks=request.delete_disks, force=request.force,
                                                        hold_s=request.hold_time_s, request_id=request.request_id,
                                                        fingerprint=fingerprint(request)))

    async def RestoreVm(self, request, context):
        if self._c.recycle_bin is None:
            raise FailedPrecondition("this agent has no recycle bin", field="vm")
        return await self._action(request, context, self._c.recycle_bin.restore)

    async def _action(self, request, context, method):
        lock_timeout = _seconds(request.lock_timeout, "lock_timeout", 3600)
        return await self._op(context, method(request.vm, request_id=request.request_id, fingerprint=fingerprint(request),
                                              lock_timeout=lock_timeout))

    async def HibernateVm(self, request, context):
        if self._c.hibernation is None:
            raise FailedPrecondition("this agent cannot hibernate VMs", field="vm")
        return await self._op(context, self._c.hibernation.hibernate(
            request.vm, request.datastore, request_id=request.request_id, fingerprint=fingerprint(request),
            lock_timeout=_seconds(request.lock_timeout, "lock_timeout", 3600)))

    async def UnhibernateVm(self, request, context):
        if self._c.hibernation is None:
            raise FailedPrecondition("this agent cannot resume hibernated VMs", field="vm")
        return await self._op(context, self._c.hibernation.unhibernate(
            request.vm, request.datastore, request_id=request.request_id, fingerprint=fingerprint(request),
            lock_timeout=_seconds(request.lock_timeout, "lock_timeout", 3600)))

    async def StartVm(self, request, context):
        return await self._action(request, context, self._life.start_vm)

    async def PauseVm(self, request, context):
        return await self._action(request, context, self._life.pause)

    async def ResumeVm(self, request, context):
        return await self._action(request, context, self._life.resume)

    async def ShutdownVm(self, request, context):
        timeout = _seconds(request.timeout, "timeout")
        lock_timeout = _seconds(request.lock_timeout, "lock_timeout", 3600)
        return await self._op(context, self._life.shutdown(request.vm, timeout=timeout, force=request.force, hard=request.hard,
                                                          request_id=request.request_id, fingerprint=fingerprint(request),
                                                          lock_timeout=lock_timeout))

    async def RebootVm(self, request, context):
        lock_timeout = _seconds(request.lock_timeout, "lock_timeout", 3600)
        return await self._op(context, self._life.reboot(request.vm, hard=request.hard, request_id=request.request_id,
                                                        fingerprint=fingerprint(request), lock_timeout=lock_timeout))

    async def GetConsole(self, request, context):
        return console_to_pb(await self._c.tickets.issue(request.vm, request.ticket_validity_s))

    async def GetVmDiagnostics(self, request, context):
        d = await self._c.diagnostics(request.vm, dirty_rate_seconds=request.dirty_rate_seconds)
        return pb.vm_pb2.VmDiagnostics(
            qemu_status=d.qemu_status, qemu_running=d.qemu_running, dirty_rate_measured=d.dirty_rate_measured,
            dirty_rate_mib_s=d.dirty_rate_mib_s, panic_info=d.panic_info, side_channel_socket=d.socket,
            qemu_version=d.qemu_version,
            vcpu_threads=[pb.vm_pb2.VcpuThread(cpu_index=i, thread_id=t, qom_path=q) for i, t, q in d.vcpu_threads])

    async def GetGuestInfo(self, request, context):
        if self._c.guest_agents is None:
            raise FailedPrecondition("this agent reads no guest agents")
        return guest_info_to_pb(await self._c.guest_agents.info(request.vm, max_age_s=request.max_age_s))

    async def SetGuestPassword(self, request, context):
        if self._c.guest_passwords is None:
            raise FailedPrecondition("this agent sets no guest passwords")
        # The fingerprint leaves the password out: the journal keeps no hash of a secret.
        blank = type(request)()
        blank.CopyFrom(request)
        blank.password = ""
        return await self._op(context, self._c.guest_passwords.set_password(
            request.vm, request.user, request.password, crypted=request.crypted, request_id=request.request_id,
            fingerprint=fingerprint(blank)))

    async def ConvertVmToTemplate(self, request, context):
        return await self._op(context, self._templates().convert(request.vm, request_id=request.request_id,
                                                                 fingerprint=fingerprint(request),
                                                                 lock_timeout=_seconds(request.lock_timeout, "lock_timeout", 3600)))

    async def DeployVm(self, request, context):
        # an empty element (proto3 clients send them) is no customization for that VM, as in CreateVm
        customizations = [None if c.empty() else c for c in (customization_from_pb(m) for m in request.customizations)]
        # The fingerprint leaves the customizations out (no hash of password hashes or user data).
        blank = type(request)()
        blank.CopyFrom(request)
        blank.ClearField("customizations")
        return await self._op(context, self._templates().deploy(
            request.template, list(request.names), linked=request.linked, datastore=request.datastore, start=request.start,
            customizations=customizations, request_id=request.request_id, fingerprint=fingerprint(blank)))

    def _templates(self) -> Any:
        if self._c.templates is None:
            raise FailedPrecondition("this agent has no templates (no storage subsystem)")
        return self._c.templates

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
        session = await self._c.open_console(first.vm, force=first.force)

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
        return await self._op(context, self._snaps.create(request.vm, request.name, description=request.description,
                                                                 quiesce=request.quiesce, memory=request.memory,
                                                                 request_id=request.request_id,
                                                                 fingerprint=fingerprint(request)))

    async def ListSnapshots(self, request, context):
        infos = await self._snaps.list(request.vm)
        return pb.vm_pb2.ListSnapshotsResponse(snapshots=[snapshot_to_pb(i) for i in infos])

    async def RevertSnapshot(self, request, context):
        return await self._op(context, self._snaps.revert(request.vm, request.snapshot, request_id=request.request_id,
                                                                 fingerprint=fingerprint(request)))

    async def DeleteSnapshot(self, request, context):
        return await self._op(context, self._snaps.delete(request.vm, request.snapshot, request_id=request.request_id,
                                                                 fingerprint=fingerprint(request)))
