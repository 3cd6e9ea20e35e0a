"""BackupService servicer: proto -> compute's VmBackups -> proto (nothing else)."""

from __future__ import annotations

from typing import Any

from cna_agent.api import pb
from cna_agent.api.convert import operation_to_pb, timestamp
from cna_agent.api.convert import request_fingerprint as fingerprint
from cna_agent.compute.backup import BackupInfo, CheckpointInfo, VmBackups
from cna_agent.errors import InvalidArgument

b = pb.backup_pb2


def backup_to_pb(info: BackupInfo) -> Any:
    out = b.Backup(vm_uuid=info.vm_uuid, checkpoint=info.checkpoint, incremental_from=info.incremental_from, socket=info.socket,
                   disks=[b.BackupDisk(target=d.target, export_name=d.export_name, url=d.url, dirty_bitmap=d.dirty_bitmap,
                                       size_bytes=d.size_bytes) for d in info.disks])
    if info.start_time:
        out.start_time.CopyFrom(timestamp(info.start_time))
    return out


def checkpoint_to_pb(c: CheckpointInfo) -> Any:
    out = b.Checkpoint(name=c.name, parent=c.parent, disks=list(c.disks))
    out.creation_time.CopyFrom(timestamp(c.creation_time))
    return out


class BackupServicer(pb.backup_pb2_grpc.BackupServiceServicer):
    def __init__(self, backups: VmBackups) -> None:
        self._b = backups

    async def StartBackup(self, request, context):
        lock = request.lock_timeout.seconds + request.lock_timeout.nanos / 1e9
        if not 0 <= lock <= 3600:
            raise InvalidArgument("lock_timeout", f"{lock:g}s is not in 0..3600s")
        return operation_to_pb(await self._b.start(request.vm, incremental_from=request.incremental_from,
                                                   disks=list(request.disks), quiesce=request.quiesce, request_id=request.request_id,
                                                   fingerprint=fingerprint(request), lock_timeout=lock))

    async def StopBackup(self, request, context):
        return operation_to_pb(await self._b.stop(request.vm, request_id=request.request_id, fingerprint=fingerprint(request)))

    async def GetBackup(self, request, context):
        return backup_to_pb(await self._b.get(request.vm))

    async def ListCheckpoints(self, request, context):
        return b.ListCheckpointsResponse(checkpoints=[checkpoint_to_pb(c) for c in await self._b.checkpoints(request.vm)])
