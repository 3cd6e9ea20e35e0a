"""ApplianceService servicer: proto -> compute's VmAppliances -> proto (nothing else)."""

from __future__ import annotations

from typing import Any, Mapping

from cna_agent.api import pb
from cna_agent.api.convert import operation_to_pb
from cna_agent.api.convert import request_fingerprint as fingerprint
from cna_agent.api.vm_convert import spec_to_pb, vm_to_pb
from cna_agent.compute.appliance_spec import Note
from cna_agent.compute.appliances import ApplianceExport, ApplianceImport, VmAppliances
from cna_agent.errors import FailedPrecondition, InvalidArgument

a = pb.appliance_pb2
S = pb.storage_pb2
_FORMATS = {S.VOLUME_FORMAT_UNSPECIFIED: "qcow2", S.VOLUME_FORMAT_QCOW2: "qcow2", S.VOLUME_FORMAT_RAW: "raw"}


def _notes(notes: tuple[Note, ...] | list[Note]) -> list[Any]:
    return [a.ApplianceNote(item=n.item, action=n.action, detail=n.detail) for n in notes]


def import_to_pb(r: ApplianceImport) -> Any:
    return a.ApplianceImport(vm=vm_to_pb(r.vm), notes=_notes(r.notes), manifest_files=r.manifest_files)


def export_to_pb(r: ApplianceExport) -> Any:
    return a.ApplianceExport(files=list(r.files), bytes=r.bytes, notes=_notes(r.notes))


def _map(m: Mapping[str, str]) -> dict[str, str]:
    out = {}
    for k, v in m.items():
        if not k or len(k) > 255 or any(ord(c) < 32 for c in k):
            raise InvalidArgument("network_map", f"{k[:40]!r} is not a network name")
        out[k] = v
    return out


class ApplianceServicer(pb.appliance_pb2_grpc.ApplianceServiceServicer):
    def __init__(self, appliances: VmAppliances | None) -> None:
        self._a = appliances

    def _svc(self) -> VmAppliances:
        if self._a is None:
            raise FailedPrecondition("appliances are not available on this agent")
        return self._a

    async def InspectAppliance(self, request, context):
        got = await self._svc().inspect(request.source, network_map=_map(request.network_map))
        return a.ApplianceInspection(spec=spec_to_pb(got.plan.spec), notes=_notes(got.plan.notes), networks=list(got.networks),
                                     package_kind=got.package_kind, has_manifest=got.manifest,
                                     disk_file_bytes=list(got.disk_bytes))

    async def ImportAppliance(self, request, context):
        if request.format not in _FORMATS:
            raise InvalidArgument("format", "imported disks are qcow2 or raw volumes")
        return operation_to_pb(await self._svc().import_(
            request.source, datastore=request.datastore, folder=request.folder, name=request.name,
            network_map=_map(request.network_map), fmt=_FORMATS[request.format], keep_macs=request.keep_macs,
            start=request.start, strict=request.strict, request_id=request.request_id, fingerprint=fingerprint(request)))

    async def ExportAppliance(self, request, context):
        return operation_to_pb(await self._svc().export(request.vm, request.destination, request_id=request.request_id,
                                                        fingerprint=fingerprint(request)))
