"""MigrationService (migration.proto): the destination's half of a live or cold migration, called
by the source agent (never by the VRM). Translation only: proto -> compute's IncomingMigrations
(live) and ColdIncoming (cold)."""

from __future__ import annotations

import re
from typing import Any, AsyncIterator

from google.protobuf import empty_pb2

from cna_agent.api import pb
from cna_agent.api.convert import REQUEST_ID_RE
from cna_agent.api.vm_convert import spec_from_pb, vm_to_pb
from cna_agent.compute.migration_cold_incoming import ColdIncoming
from cna_agent.compute.migration_incoming import IncomingMigrations
from cna_agent.contracts import FileIdentity, TransferChunk
from cna_agent.errors import FailedPrecondition, InvalidArgument

m = pb.migration_pb2
#: A source's definition is a few tens of KiB; far more is not a domain.
MAX_DOMAIN_XML = 1 << 20
HOST_UUID_RE = re.compile(r"^[A-Za-z0-9-]{0,64}$")
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
#: Bounds of a cold migration's file facts: a volume is at most 64 TiB (storage/volumes.py).
MAX_FILE = (64 << 40) + 1
INT63 = (1 << 63) - 1


def _migration_id(value: str) -> str:
    if not value or not REQUEST_ID_RE.match(value):
        raise InvalidArgument("migration_id", "must be 1-128 characters of A-Z a-z 0-9 . _ : ~ - (the source's operation id)")
    return value


def _reason(text: str) -> str:
    """Free text from the source, for this host's log and events: printable and bounded."""
    return "".join(ch if ch.isprintable() else " " for ch in text[:512]) or "no reason given"


class MigrationServicer(pb.migration_pb2_grpc.MigrationServiceServicer):
    def __init__(self, incoming: IncomingMigrations, cold: ColdIncoming | None = None) -> None:
        self._in = incoming
        self._cold = cold

    async def PrepareIncoming(self, request, context):
        mid = _migration_id(request.migration_id)
        if not request.HasField("spec"):
            raise InvalidArgument("spec", "is required")
        if not request.domain_xml or len(request.domain_xml) > MAX_DOMAIN_XML or "\x00" in request.domain_xml:
            raise InvalidArgument("domain_xml", f"must be the source's domain definition (1..{MAX_DOMAIN_XML} bytes)")
        spec = spec_from_pb(request.spec)
        if not spec.uuid:
            raise InvalidArgument("spec.uuid", "an incoming VM keeps its UUID: required")
        plan = await self._in.prepare(mid, spec, request.domain_xml, request.source_host_uuid[:64], post_copy=request.post_copy)
        return m.PrepareIncomingResponse(libvirt_uri=plan.libvirt_uri, migrate_uri=plan.migrate_uri,
                                         domain_xml=plan.domain_xml, ttl_seconds=plan.ttl_s)

    async def FinishIncoming(self, request, context):
        vm = await self._in.finish(_migration_id(request.migration_id), request.completed)
        return m.FinishIncomingResponse(vm=vm_to_pb(vm)) if vm is not None else m.FinishIncomingResponse()

    async def AbortIncoming(self, request, context):
        await self._in.abort(_migration_id(request.migration_id), _reason(request.reason))
        return empty_pb2.Empty()

    # -- cold ----------------------------------------------------------------------------------------

    def _cold_in(self) -> ColdIncoming:
        if self._cold is None:
            raise FailedPrecondition("this host takes no cold migrations", field="destination")
        return self._cold

    async def PrepareColdIncoming(self, request, context):
        cold = self._cold_in()
        mid = _migration_id(request.migration_id)
        if not request.HasField("spec"):
            raise InvalidArgument("spec", "is required")
        spec = spec_from_pb(request.spec)
        if not spec.uuid:
            raise InvalidArgument("spec.uuid", "an incoming VM keeps its UUID: required")
        if not HOST_UUID_RE.match(request.source_host_uuid):
            raise InvalidArgument("source_host_uuid", "must be empty or up to 64 of A-Z a-z 0-9 -")
        disks: dict[int, FileIdentity] = {}
        for n, d in enumerate(request.disks):
            for name, value, high in (("size_bytes", d.size_bytes, MAX_FILE), ("allocated_bytes", d.allocated_bytes, MAX_FILE),
                                      ("inode", d.inode, INT63), ("mtime_ns", d.mtime_ns, INT63)):
                if not 0 <= value < high:
                    raise InvalidArgument(f"disks[{n}].{name}", f"{value} is not in 0..{high - 1}")
            if not SHA256_RE.match(d.head_sha256):
                raise InvalidArgument(f"disks[{n}].head_sha256", "must be 64 lower-case hex digits")
            if d.index in disks or d.index >= len(spec.disks):
                raise InvalidArgument(f"disks[{n}].index", f"{d.index} is repeated or not a disk of the spec")
            disks[d.index] = FileIdentity(size=d.size_bytes, allocated=d.allocated_bytes, inode=d.inode, mtime_ns=d.mtime_ns,
                                          head_sha256=d.head_sha256, has_backing=d.has_backing)
        plans = await cold.prepare(mid, spec, disks, request.source_host_uuid)
        return m.PrepareColdIncomingResponse(
            disks=[m.ColdDiskPlan(index=i, copy=p.copy, path=p.path) for i, p in sorted(plans.items())], ttl_seconds=cold.ttl_s)

    async def PushVolume(self, request_iterator, context):
        cold = self._cold_in()
        it = request_iterator.__aiter__()
        try:
            head = await it.__anext__()
        except StopAsyncIteration:
            raise InvalidArgument("migration_id", "the stream is empty") from None
        mid = _migration_id(head.migration_id)

        async def chunks() -> AsyncIterator[TransferChunk]:
            msg: Any = head
            while True:
                if msg.data or msg.sha256:
                    yield TransferChunk(offset=msg.offset, data=msg.data, sha256=msg.sha256)
                try:
                    msg = await it.__anext__()
                except StopAsyncIteration:
                    return

        written = await cold.receive(mid, head.disk_index, head.size_bytes, chunks())
        return m.PushVolumeResponse(bytes_written=written)

    async def FinishColdIncoming(self, request, context):
        vm = await self._cold_in().finish(_migration_id(request.migration_id))
        return m.FinishIncomingResponse(vm=vm_to_pb(vm))

    async def AbortColdIncoming(self, request, context):
        await self._cold_in().abort(_migration_id(request.migration_id), _reason(request.reason))
        return empty_pb2.Empty()
