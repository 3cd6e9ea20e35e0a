"""OperationsService (AIP-151) over the operation runner and its journal."""

from __future__ import annotations

from typing import AsyncIterator

import grpc

from cna_agent.api import pb
from cna_agent.api.convert import operation_to_pb
from cna_agent.errors import FailedPrecondition, InvalidArgument, NotFound
from cna_agent.operations import OperationRunner


class OperationsServicer(pb.operations_pb2_grpc.OperationsServiceServicer):
    def __init__(self, runner: OperationRunner) -> None:
        self._runner = runner

    async def _get(self, op_id: str, context: grpc.aio.ServicerContext):
        if not op_id:
            raise InvalidArgument("id", "is required")
        record = await self._runner.get(op_id)
        if record is None:
            raise NotFound(f"operation {op_id!r} not found (finished operations are kept for the retention period)", field="id")
        return record

    async def GetOperation(self, request, context):
        return operation_to_pb(await self._get(request.id, context))

    async def ListOperations(self, request, context):
        page_size = request.page_size or 100
        if not 0 < page_size <= 1000:
            raise InvalidArgument("page_size", f"{request.page_size} is not in 1..1000")
        before = None
        if request.page_token:
            try:
                before = float(request.page_token)
            except ValueError:
                raise InvalidArgument("page_token", "is not a token this server issued")
        records = await self._runner.list(
            kinds=tuple(request.kinds), target=request.target, active_only=request.active_only, limit=page_size + 1, before=before
        )
        more = len(records) > page_size
        records = records[:page_size]
        return pb.operations_pb2.ListOperationsResponse(
            operations=[operation_to_pb(r) for r in records],
            next_page_token=repr(records[-1].create_time) if more and records else "",
        )

    async def WatchOperation(self, request, context) -> AsyncIterator[pb.operations_pb2.Operation]:
        await self._get(request.id, context)
        async for record in self._runner.watch(request.id):
            yield operation_to_pb(record)

    async def CancelOperation(self, request, context):
        record = await self._get(request.id, context)
        if record.done:
            raise FailedPrecondition(f"operation {record.id} is already {record.state}", field="id")
        if not self._runner.is_running(record.id):
            raise FailedPrecondition(f"operation {record.id} is not running in this agent process", field="id")
        return operation_to_pb(await self._runner.cancel(record.id))
