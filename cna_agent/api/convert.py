"""Conversions between the agent's records and protobuf messages (the api layer's only job)."""

from __future__ import annotations

import hashlib
import re
from typing import Any

from google.protobuf import any_pb2, timestamp_pb2

from cna_agent.api import pb
from cna_agent.errors import InvalidArgument
from cna_agent.state.eventlog import EventRecord
from cna_agent.state.journal import OperationRecord

_OP_STATES = {
    "pending": pb.operations_pb2.OPERATION_STATE_PENDING,
    "running": pb.operations_pb2.OPERATION_STATE_RUNNING,
    "succeeded": pb.operations_pb2.OPERATION_STATE_SUCCEEDED,
    "failed": pb.operations_pb2.OPERATION_STATE_FAILED,
    "cancelled": pb.operations_pb2.OPERATION_STATE_CANCELLED,
}
_SEVERITIES = {
    "info": pb.events_pb2.EVENT_SEVERITY_INFO,
    "warning": pb.events_pb2.EVENT_SEVERITY_WARNING,
    "error": pb.events_pb2.EVENT_SEVERITY_ERROR,
}


def timestamp(seconds: float | None) -> timestamp_pb2.Timestamp | None:
    if seconds is None:
        return None
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


def operation_to_pb(record: OperationRecord) -> pb.operations_pb2.Operation:
    op = pb.operations_pb2.Operation(
        id=record.id,
        kind=record.kind,
        target=record.target,
        request_id=record.request_id or "",
        state=_OP_STATES.get(record.state, pb.operations_pb2.OPERATION_STATE_UNSPECIFIED),
        done=record.done,
        progress=pb.operations_pb2.OperationProgress(
            percent=record.percent, stage=record.stage, bytes_done=record.bytes_done, bytes_total=record.bytes_total
        ),
        create_time=timestamp(record.create_time),
        update_time=timestamp(record.update_time),
        metadata=dict(record.metadata),
    )
    if record.end_time is not None:
        op.end_time.CopyFrom(timestamp(record.end_time))
    if record.error is not None:
        op.error.CopyFrom(
            pb.common_pb2.Status(
                code=record.error.code,
                message=record.error.message,
                field_violations=[pb.common_pb2.FieldViolation(field=f, description=d) for f, d in record.error.fields],
            )
        )
    elif record.response_type:
        op.response.CopyFrom(any_pb2.Any(type_url=f"type.googleapis.com/{record.response_type}", value=record.response or b""))
    return op


def event_to_pb(event: EventRecord) -> pb.events_pb2.Event:
    return pb.events_pb2.Event(
        sequence=event.sequence,
        time=timestamp(event.time),
        type=event.type,
        severity=_SEVERITIES.get(event.severity, pb.events_pb2.EVENT_SEVERITY_UNSPECIFIED),
        resource_kind=event.resource_kind,
        resource_id=event.resource_id,
        resource_name=event.resource_name,
        message=event.message,
        attributes=dict(event.attributes),
        operation_id=event.operation_id,
    )


#: AIP-155 request ids: a UUID, a ULID or any other token of these characters, at most 128.
REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:~-]{1,128}$")


def request_fingerprint(request: Any) -> str:
    """Hash of a mutating request minus its request_id, for the journal's idempotency check:
    the same id with a different body is refused instead of answered with an unrelated result.
    Every mutating RPC comes through here, so its request_id is checked here too."""
    if request.request_id and not REQUEST_ID_RE.match(request.request_id):
        raise InvalidArgument("request_id", "must be 1-128 characters of A-Z a-z 0-9 . _ : ~ - (a UUID is best)")
    copy = type(request)()
    copy.CopyFrom(request)
    copy.ClearField("request_id")
    return hashlib.sha256(copy.SerializeToString(deterministic=True)).hexdigest()
