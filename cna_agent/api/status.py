"""Turn service errors into gRPC statuses a caller can act on.

The status code says what kind of failure it was; the message says what was wrong, naming
the field; and for bad input the status details carry a google.rpc.BadRequest with the field
paths, so clients using grpcio-status (or any gRPC library's rich error support) get them as
data rather than by parsing text.
"""

from __future__ import annotations

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from cna_agent.errors import AgentError
from cna_agent.state.journal import OperationError


def grpc_code(name: str) -> grpc.StatusCode:
    return getattr(grpc.StatusCode, name, grpc.StatusCode.INTERNAL)


def to_rpc_status(code_number: int, message: str, fields: tuple[tuple[str, str], ...] = ()) -> status_pb2.Status:
    status = status_pb2.Status(code=code_number, message=message)
    if fields:
        detail = any_pb2.Any()
        detail.Pack(error_details_pb2.BadRequest(
            field_violations=[error_details_pb2.BadRequest.FieldViolation(field=f, description=d) for f, d in fields]
        ))
        status.details.append(detail)
    return status


#: Longest message (and field description) sent: errors quote what the caller sent, and a
#: 5 kB value quoted twice (message + BadRequest details) overflows gRPC's 8 KiB metadata limit,
#: which the client would see as RESOURCE_EXHAUSTED instead of the error.
MAX_MESSAGE = 1024


def _clip(text: str) -> str:
    return text if len(text) <= MAX_MESSAGE else text[:MAX_MESSAGE - 20] + f"... ({len(text)} chars)"


async def abort_with(context: grpc.aio.ServicerContext, exc: AgentError) -> None:
    """Abort the RPC with the error's code, message and field details (raises)."""
    fields = tuple((_clip(f), _clip(d)) for f, d in exc.fields)
    await context.abort_with_status(rpc_status.to_status(to_rpc_status(exc.code_number, _clip(exc.message), fields)))


def operation_error_to_status(error: OperationError) -> status_pb2.Status:
    return to_rpc_status(error.code, error.message, error.fields)


assert code_pb2.INVALID_ARGUMENT == 3  # the numbers in cna_agent.errors.CODES follow google.rpc.Code
