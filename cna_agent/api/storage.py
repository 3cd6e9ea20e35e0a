"""StorageService servicer: proto -> StorageService arguments -> proto (nothing else).

Disk attach/detach/resize/QoS on VMs (AttachDisk, DetachDisk, ResizeDisk, SetDiskQos) are
devices of VMs, which compute owns: they go to compute's DiskOperations (compute/disks.py).
"""

from __future__ import annotations

from typing import Any

from cna_agent.api import pb
from cna_agent.api.convert import operation_to_pb
from cna_agent.api.vm import fingerprint
from cna_agent.api.vm_convert import spec_from_pb
from cna_agent.compute.disks import DiskOperations
from cna_agent.compute.spec import IoQos
from cna_agent.compute.disk_move import DiskMoves
from cna_agent.errors import FailedPrecondition, InvalidArgument
from cna_agent.storage.service import DatastoreStatus, StorageService
from cna_agent.storage.volumes import VolumeInfo

S = pb.storage_pb2
_TYPES = {"dir": S.DATASTORE_TYPE_LOCAL_DIR, "iscsi": S.DATASTORE_TYPE_ISCSI, "fc": S.DATASTORE_TYPE_FC}
_HEALTH = {"ok": pb.common_pb2.HEALTH_OK, "slow": pb.common_pb2.HEALTH_DEGRADED, "unreachable": pb.common_pb2.HEALTH_UNREACHABLE}
FORMATS = {S.VOLUME_FORMAT_QCOW2: "qcow2", S.VOLUME_FORMAT_RAW: "raw", S.VOLUME_FORMAT_VMDK: "vmdk",
           S.VOLUME_FORMAT_VPC: "vpc", S.VOLUME_FORMAT_VHDX: "vhdx"}
_FORMAT_PB = {v: k for k, v in FORMATS.items()}


def volume_to_pb(v: VolumeInfo) -> S.Volume:
    msg = S.Volume(id=v.id, datastore=v.datastore, path=v.relpath, format=_FORMAT_PB.get(v.format, S.VOLUME_FORMAT_UNSPECIFIED),
                   virtual_size_bytes=v.virtual_size, actual_size_bytes=v.actual_size, backing_volume=v.backing_volume,
                   used_by=list(v.used_by), template=v.template)
    if v.check is not None:
        msg.check.CopyFrom(S.VolumeCheck(supported=v.check.supported, corruptions=v.check.corruptions, leaks=v.check.leaks,
                                         check_errors=v.check.check_errors, summary=v.check.summary))
    return msg


def datastore_to_pb(d: DatastoreStatus) -> S.Datastore:
    return S.Datastore(
        name=d.name, type=_TYPES.get(d.type, S.DATASTORE_TYPE_UNSPECIFIED),
        health=_HEALTH.get(d.health.state, pb.common_pb2.HEALTH_UNSPECIFIED), health_reason=d.health.reason,
        capacity_bytes=max(d.capacity_bytes, 0), free_bytes=max(d.free_bytes, 0), allocated_bytes=max(d.allocated_bytes, 0),
        location=d.location, probe_latency_ms=d.health.latency_ms, initiator=d.initiator, direct_io=d.health.direct_io,
        luns=[S.Lun(id=lun.id, size_bytes=lun.size_bytes, vendor=lun.vendor, product=lun.product, device=lun.device,
                    paths=lun.paths, used_by=list(lun.used_by)) for lun in d.luns],
    )


def _format(value: int, field: str, *, allow_unspecified: bool = True) -> str:
    if value == S.VOLUME_FORMAT_UNSPECIFIED and allow_unspecified:
        return ""
    if value not in FORMATS:
        raise InvalidArgument(field, f"unknown volume format {value}")
    return FORMATS[value]


class StorageServicer(pb.storage_pb2_grpc.StorageServiceServicer):
    def __init__(self, service: StorageService, disks: DiskOperations, moves: "DiskMoves | None" = None) -> None:
        self._svc = service
        self._disks = disks
        self._moves = moves

    async def _op(self, context: Any, make: Any) -> Any:
        return operation_to_pb(await make())

    async def ListDatastores(self, request, context):
        return S.ListDatastoresResponse(datastores=[datastore_to_pb(d) for d in await self._svc.list_datastores()])

    async def GetDatastore(self, request, context):
        return datastore_to_pb(await self._svc.get_datastore(request.name))

    async def RescanDatastore(self, request, context):
        return await self._op(context, lambda: self._svc.rescan_datastore(request.name, request_id=request.request_id,
                                                                          fingerprint=fingerprint(request)))

    async def ListVolumes(self, request, context):
        return S.ListVolumesResponse(volumes=[volume_to_pb(v) for v in await self._svc.list_volumes(request.datastore)])

    async def GetVolume(self, request, context):
        return volume_to_pb(await self._svc.get_volume(request.id))

    async def CreateVolume(self, request, context):
        async def make():
            fmt = _format(request.format, "format", allow_unspecified=False)
            return await self._svc.create_volume(request.datastore, request.path, fmt, request.size_bytes,
                                                 preallocate=request.preallocate, request_id=request.request_id,
                                                 fingerprint=fingerprint(request))
        return await self._op(context, make)

    async def ResizeVolume(self, request, context):
        return await self._op(context, lambda: self._svc.resize_volume(request.id, request.new_size_bytes, request_id=request.request_id,
                                                                       fingerprint=fingerprint(request)))

    async def DeleteVolume(self, request, context):
        return await self._op(context, lambda: self._svc.delete_volume_op(request.id, request_id=request.request_id,
                                                                          fingerprint=fingerprint(request)))

    async def CloneVolume(self, request, context):
        async def make():
            return await self._svc.clone_volume(request.source, request.datastore, request.path, linked=request.linked,
                                                fmt=_format(request.format, "format"), request_id=request.request_id,
                                                fingerprint=fingerprint(request))
        return await self._op(context, make)

    async def ImportVolume(self, request, context):
        async def make():
            return await self._svc.import_volume(request.source, _format(request.source_format, "source_format"),
                                                 request.datastore, request.path, _format(request.format, "format"),
                                                 request_id=request.request_id, fingerprint=fingerprint(request))
        return await self._op(context, make)

    async def ExportVolume(self, request, context):
        async def make():
            return await self._svc.export_volume(request.id, request.datastore, request.path, _format(request.format, "format"),
                                                 request_id=request.request_id, fingerprint=fingerprint(request))
        return await self._op(context, make)

    # -- disks on VMs: compute's device operations ---------------------------------------------------

    async def AttachDisk(self, request, context):
        # The one proto->spec conversion for disks lives in vm_convert (it converts whole
        # VmSpecs); a spec holding only this disk reuses it.
        disk = spec_from_pb(pb.vm_pb2.VmSpec(disks=[request.disk])).disks[0]
        return await self._op(context, lambda: self._disks.attach(request.vm, disk, request_id=request.request_id,
                                                                  fingerprint=fingerprint(request)))

    async def DetachDisk(self, request, context):
        return await self._op(context, lambda: self._disks.detach(request.vm, request.target, request_id=request.request_id,
                                                                  fingerprint=fingerprint(request)))

    async def ResizeDisk(self, request, context):
        return await self._op(context, lambda: self._disks.resize(request.vm, request.target, request.new_size_bytes,
                                                                  request_id=request.request_id, fingerprint=fingerprint(request)))

    async def MoveDisk(self, request, context):
        if self._moves is None:
            raise FailedPrecondition("this agent cannot move disks", field="vm")
        return await self._op(context, lambda: self._moves.move(request.vm, request.target, request.destination,
                                                                bandwidth_mib_s=request.bandwidth_mib_s,
                                                                keep_source=request.keep_source,
                                                                request_id=request.request_id, fingerprint=fingerprint(request)))

    async def SetDiskQos(self, request, context):
        q = request.qos
        qos = IoQos(q.read_bytes_sec, q.write_bytes_sec, q.total_bytes_sec, q.read_iops_sec, q.write_iops_sec, q.total_iops_sec)
        return await self._op(context, lambda: self._disks.set_qos(request.vm, request.target, qos, request_id=request.request_id,
                                                                   fingerprint=fingerprint(request)))
