"""The destination agent, as the source's migration reaches it (contracts.MigrationPeer over
gRPC). Why here: the peer-agent client is one of the two gRPC clients the agent has (the VRM link
is the other), and protobuf stays in api/.

The channel uses the agent's own mutual-TLS identity (the ``[vrm]`` certificate, key and CA:
one identity for the cloud's control plane) when one is configured, plaintext otherwise (tests
on loopback). Every call has a deadline; an error the destination returned keeps its status
and message, so a refusal there ("no free hugepages on node 0") reaches the VRM as it was said.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, AsyncIterator, Mapping

import grpc

from cna_agent.api import pb
from cna_agent.api.vm_convert import spec_to_pb, vm_from_pb
from cna_agent.contracts import FileIdentity, IncomingPlan, ReceivePlan, TransferChunk
from cna_agent.errors import Aborted, AgentError, FailedPrecondition, InvalidArgument, NotFound, ResourceBusy, Unavailable

m = pb.migration_pb2
#: Preparing can log in to LUNs and plan placement: allow it time; the rest is quick.
PREPARE_TIMEOUT_S = 120.0
CALL_TIMEOUT_S = 60.0
#: A volume stream's deadline: this much, plus the file at a floor rate of 5 MiB/s (the whole
#: stream is one call; a stalled one ends here instead of hanging the operation).
PUSH_BASE_S = 300.0
PUSH_FLOOR_RATE = 5 << 20
_STATUS: dict[grpc.StatusCode, type[AgentError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument, grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition, grpc.StatusCode.ALREADY_EXISTS: FailedPrecondition,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceBusy, grpc.StatusCode.ABORTED: Aborted,
}


class GrpcMigrationPeer:
    def __init__(self, *, cert: str = "", key: str = "", ca: str = "") -> None:
        self._creds = None
        if cert or ca:
            def read(path: str) -> bytes | None:
                return Path(path).read_bytes() if path else None

            self._creds = grpc.ssl_channel_credentials(root_certificates=read(ca), private_key=read(key),
                                                       certificate_chain=read(cert))

    def _channel(self, destination: str) -> grpc.aio.Channel:
        # A channel per call, each with its own subchannels: gRPC otherwise shares one
        # connection per address across channels, and one that failed while the destination
        # was down (restarting) stays in back-off, failing the next calls at once with the old
        # "connection refused" although the destination is back.
        options = [("grpc.max_receive_message_length", 16 << 20), ("grpc.max_send_message_length", 16 << 20),
                   ("grpc.use_local_subchannel_pool", 1)]
        if self._creds is not None:
            return grpc.aio.secure_channel(destination, self._creds, options=options)
        return grpc.aio.insecure_channel(destination, options=options)

    async def _call(self, destination: str, method: str, request: Any, timeout: float) -> Any:
        async with self._channel(destination) as ch:
            stub = pb.migration_pb2_grpc.MigrationServiceStub(ch)
            try:
                return await getattr(stub, method)(request, timeout=timeout)
            except grpc.aio.AioRpcError as exc:
                raise _mapped(destination, exc) from None

    async def prepare(self, destination: str, migration_id: str, spec: Any, domain_xml: str, source_host_uuid: str, *,
                      post_copy: bool = False) -> IncomingPlan:
        req = m.PrepareIncomingRequest(migration_id=migration_id, spec=spec_to_pb(spec), domain_xml=domain_xml,
                                       source_host_uuid=source_host_uuid, post_copy=post_copy)
        resp = await self._call(destination, "PrepareIncoming", req, PREPARE_TIMEOUT_S)
        return IncomingPlan(libvirt_uri=resp.libvirt_uri, migrate_uri=resp.migrate_uri, domain_xml=resp.domain_xml,
                            ttl_s=resp.ttl_seconds)

    async def finish(self, destination: str, migration_id: str, completed: bool) -> Any:
        resp = await self._call(destination, "FinishIncoming",
                                m.FinishIncomingRequest(migration_id=migration_id, completed=completed), CALL_TIMEOUT_S)
        return vm_from_pb(resp.vm) if resp.HasField("vm") else None

    async def abort(self, destination: str, migration_id: str, reason: str) -> None:
        await self._call(destination, "AbortIncoming", m.AbortIncomingRequest(migration_id=migration_id, reason=reason[:512]),
                         CALL_TIMEOUT_S)

    # -- cold migration (contracts.ColdMigrationPeer) -------------------------------------------------

    async def prepare_cold(self, destination: str, migration_id: str, spec: Any, disks: Mapping[int, FileIdentity],
                           source_host_uuid: str) -> dict[int, ReceivePlan]:
        req = m.PrepareColdIncomingRequest(migration_id=migration_id, spec=spec_to_pb(spec), source_host_uuid=source_host_uuid,
                                           disks=[m.ColdDiskIdentity(index=i, size_bytes=d.size, allocated_bytes=d.allocated,
                                                                     inode=d.inode, mtime_ns=d.mtime_ns, head_sha256=d.head_sha256,
                                                                     has_backing=d.has_backing)
                                                  for i, d in sorted(disks.items())])
        resp = await self._call(destination, "PrepareColdIncoming", req, PREPARE_TIMEOUT_S)
        plans = {d.index: ReceivePlan(path=d.path, copy=d.copy) for d in resp.disks}
        if sorted(plans) != sorted(disks):
            raise FailedPrecondition(f"destination {destination} answered for disks {sorted(plans)}, not {sorted(disks)}",
                                     field="destination")
        return plans

    async def push_volume(self, destination: str, migration_id: str, disk_index: int, size: int,
                          chunks: AsyncIterator[TransferChunk]) -> int:
        async def requests() -> AsyncIterator[Any]:
            yield m.PushVolumeRequest(migration_id=migration_id, disk_index=disk_index, size_bytes=size)
            async for c in chunks:
                yield m.PushVolumeRequest(offset=c.offset, data=c.data, sha256=c.sha256)

        async with self._channel(destination) as ch:
            stub = pb.migration_pb2_grpc.MigrationServiceStub(ch)
            try:
                resp = await stub.PushVolume(requests(), timeout=PUSH_BASE_S + size / PUSH_FLOOR_RATE)
            except grpc.aio.AioRpcError as exc:
                raise _mapped(destination, exc) from None
        return resp.bytes_written

    async def finish_cold(self, destination: str, migration_id: str) -> Any:
        resp = await self._call(destination, "FinishColdIncoming", m.FinishColdIncomingRequest(migration_id=migration_id),
                                CALL_TIMEOUT_S)
        return vm_from_pb(resp.vm) if resp.HasField("vm") else None

    async def abort_cold(self, destination: str, migration_id: str, reason: str) -> None:
        await self._call(destination, "AbortColdIncoming",
                         m.AbortIncomingRequest(migration_id=migration_id, reason=reason[:512]), CALL_TIMEOUT_S)


def _mapped(destination: str, exc: grpc.aio.AioRpcError) -> AgentError:
    """The destination's refusal as this agent's error, its status and message kept."""
    what = f"destination {destination}: {exc.details() or exc.code().name}"
    if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
        return FailedPrecondition(what, field="destination")  # the source's request is ours, not the caller's
    err = _STATUS.get(exc.code())
    if err is not None:
        return err(what, field="destination")
    return Unavailable(what)
