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
from typing import Any

import grpc

from cna_agent.api import pb
from cna_agent.api.vm_convert import spec_to_pb, vm_from_pb
from cna_agent.contracts import IncomingPlan
from cna_agent.errors import AgentError, FailedPrecondition, InvalidArgument, NotFound, ResourceBusy, Unavailable

m = pb.migration_pb2
#: Preparing can log in to LUNs and plan placement: allow it time; the rest is quick.
PREPARE_TIMEOUT_S = 120.0
CALL_TIMEOUT_S = 60.0
_STATUS: dict[grpc.StatusCode, type[AgentError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument, grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition, grpc.StatusCode.ALREADY_EXISTS: FailedPrecondition,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceBusy,
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
                what = f"destination {destination}: {exc.details() or exc.code().name}"
                if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
                    raise FailedPrecondition(what, field="destination") from None  # the source's request is ours, not the caller's
                err = _STATUS.get(exc.code())
                if err is not None:
                    raise err(what, field="destination") from None
                raise Unavailable(what) from None

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
