"""MigrationService (migration.proto): the destination's half of a live migration, called by the
source agent (never by the VRM). Translation only: proto -> compute's IncomingMigrations."""

from __future__ import annotations

from google.protobuf import empty_pb2

from cna_agent.api import pb
from cna_agent.api.convert import REQUEST_ID_RE
from cna_agent.api.vm_convert import spec_from_pb, vm_to_pb
from cna_agent.compute.migration_incoming import IncomingMigrations
from cna_agent.errors import InvalidArgument

m = pb.migration_pb2
#: A source's definition is a few tens of KiB; far more is not a domain.
MAX_DOMAIN_XML = 1 << 20


def _migration_id(value: str) -> str:
    if not value or not REQUEST_ID_RE.match(value):
        raise InvalidArgument("migration_id", "must be 1-128 characters of A-Z a-z 0-9 . _ : ~ - (the source's operation id)")
    return value


class MigrationServicer(pb.migration_pb2_grpc.MigrationServiceServicer):
    def __init__(self, incoming: IncomingMigrations) -> None:
        self._in = incoming

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
        # Free text from the source, for this host's log and events: printable and bounded.
        reason = "".join(ch if ch.isprintable() else " " for ch in request.reason[:512]) or "no reason given"
        await self._in.abort(_migration_id(request.migration_id), reason)
        return empty_pb2.Empty()
