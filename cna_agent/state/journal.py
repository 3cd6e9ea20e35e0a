"""The operation journal: what the agent was asked to do, and how it ended.

Every mutating call becomes a row before any work starts ("pending"), is updated as it runs,
and is closed with its result. That gives three things:

* idempotency by request id (AIP-155): a repeated request finds the row and gets the same
  operation back instead of acting twice; a *different* request reusing an id is refused;
* polling and watching of long operations (AIP-151);
* recovery: on start, rows still open were cut short by a crash; the agent checks each against
  the hypervisor and closes it, rather than redoing it blindly.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field, replace
from typing import Mapping, Sequence

from cna_agent.errors import CODES, InvalidArgument
from cna_agent.state.store import StateStore

PENDING = "pending"
RUNNING = "running"
SUCCEEDED = "succeeded"
FAILED = "failed"
CANCELLED = "cancelled"
STATES = (PENDING, RUNNING, SUCCEEDED, FAILED, CANCELLED)
FINAL_STATES = (SUCCEEDED, FAILED, CANCELLED)


@dataclass(frozen=True)
class OperationError:
    #: A gRPC status code number (grpc.StatusCode.X.value[0]).
    code: int
    message: str
    fields: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class OperationRecord:
    id: str
    kind: str
    target: str
    request_id: str | None
    state: str
    create_time: float
    update_time: float
    end_time: float | None = None
    percent: int = -1
    stage: str = ""
    bytes_done: int = 0
    bytes_total: int = 0
    error: OperationError | None = None
    #: Fully-qualified protobuf type name and serialized bytes of the result message.
    response_type: str | None = None
    response: bytes | None = None
    metadata: Mapping[str, str] = field(default_factory=dict)
    fingerprint: str = ""

    @property
    def done(self) -> bool:
        return self.state in FINAL_STATES

    def to_dict(self) -> dict[str, object]:
        return {
            "id": self.id,
            "kind": self.kind,
            "target": self.target,
            "request_id": self.request_id,
            "state": self.state,
            "done": self.done,
            "create_time": self.create_time,
            "update_time": self.update_time,
            "end_time": self.end_time,
            "progress": {"percent": self.percent, "stage": self.stage, "bytes_done": self.bytes_done, "bytes_total": self.bytes_total},
            "error": None if self.error is None else {"code": self.error.code, "message": self.error.message, "fields": [list(f) for f in self.error.fields]},
            "response_type": self.response_type,
            "metadata": dict(self.metadata),
        }


class RequestIdConflict(InvalidArgument):
    """A request id was reused for a different request: the caller's error (INVALID_ARGUMENT
    naming request_id), whichever service submitted the operation."""

    def __init__(self, request_id: str, existing: OperationRecord) -> None:
        super().__init__("request_id", f"{request_id!r} was already used for a different request "
                                       f"(operation {existing.id}, {existing.kind} on {existing.target or '-'})")
        self.existing = existing


class OperationJournal:
    """Synchronous journal access (call through StateStore.run from async code)."""

    def __init__(self, store: StateStore) -> None:
        self._store = store

    def begin(
        self,
        kind: str,
        target: str = "",
        *,
        request_id: str | None = None,
        fingerprint: str = "",
        metadata: Mapping[str, str] | None = None,
    ) -> tuple[OperationRecord, bool]:
        """Open an operation, or find the one a previous identical request opened.

        Returns ``(record, created)``. The look-up and the insert are one transaction, so two
        concurrent requests with the same id cannot both act.
        """
        request_id = request_id or None

        def txn(conn) -> tuple[OperationRecord, bool]:
            if request_id is not None:
                row = conn.execute("SELECT * FROM operations WHERE request_id = ?", (request_id,)).fetchone()
                if row is not None:
                    existing = _row_to_record(row)
                    if existing.kind != kind or existing.target != target or existing.fingerprint != fingerprint:
                        raise RequestIdConflict(request_id, existing)
                    return existing, False
            now = time.time()
            record = OperationRecord(
                id=str(uuid.uuid4()),
                kind=kind,
                target=target,
                request_id=request_id,
                state=PENDING,
                create_time=now,
                update_time=now,
                metadata=dict(metadata or {}),
                fingerprint=fingerprint,
            )
            conn.execute(
                "INSERT INTO operations(id, kind, target, request_id, fingerprint, state, create_time,"
                " update_time, metadata) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (record.id, kind, target, request_id, fingerprint, PENDING, now, now, json.dumps(record.metadata)),
            )
            return record, True

        return self._store.transaction(txn)

    def update(
        self,
        op_id: str,
        *,
        state: str | None = None,
        percent: int | None = None,
        stage: str | None = None,
        bytes_done: int | None = None,
        bytes_total: int | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> OperationRecord:
        current = self.get(op_id)
        if current is None:
            raise KeyError(op_id)
        if current.done:
            return current
        if state is not None and state not in (PENDING, RUNNING):
            raise ValueError("use finish() to end an operation")
        changed = replace(
            current,
            state=state or current.state,
            percent=current.percent if percent is None else max(-1, min(100, percent)),
            stage=current.stage if stage is None else stage,
            bytes_done=current.bytes_done if bytes_done is None else bytes_done,
            bytes_total=current.bytes_total if bytes_total is None else bytes_total,
            metadata={**current.metadata, **(metadata or {})},
            update_time=time.time(),
        )
        self._store.execute(
            "UPDATE operations SET state=?, percent=?, stage=?, bytes_done=?, bytes_total=?, metadata=?,"
            " update_time=? WHERE id=? AND end_time IS NULL",
            (changed.state, changed.percent, changed.stage, changed.bytes_done, changed.bytes_total,
             json.dumps(dict(changed.metadata)), changed.update_time, op_id),
        )
        return changed

    def finish(
        self,
        op_id: str,
        *,
        error: OperationError | None = None,
        cancelled: bool = False,
        response_type: str | None = None,
        response: bytes | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> OperationRecord:
        """Close an operation; closing an already closed one changes nothing."""
        current = self.get(op_id)
        if current is None:
            raise KeyError(op_id)
        if current.done:
            return current
        now = time.time()
        if cancelled and error is None:
            # AIP-151: a cancelled operation carries the CANCELLED status as its error, so every
            # finished operation has exactly one of error or response.
            error = OperationError(CODES["CANCELLED"], "cancelled by the caller")
        state = CANCELLED if cancelled else FAILED if error is not None else SUCCEEDED
        done = replace(
            current,
            state=state,
            end_time=now,
            update_time=now,
            percent=100 if state == SUCCEEDED else current.percent,
            error=error,
            response_type=response_type,
            response=response,
            metadata={**current.metadata, **(metadata or {})},
        )
        self._store.execute(
            "UPDATE operations SET state=?, end_time=?, update_time=?, percent=?, error_code=?, error_message=?,"
            " error_fields=?, response_type=?, response=?, metadata=? WHERE id=? AND end_time IS NULL",
            (state, now, now, done.percent,
             None if error is None else error.code,
             None if error is None else error.message,
             None if error is None else json.dumps([list(f) for f in error.fields]),
             response_type, response, json.dumps(dict(done.metadata)), op_id),
        )
        return done

    def get(self, op_id: str) -> OperationRecord | None:
        rows = self._store.query("SELECT * FROM operations WHERE id = ?", (op_id,))
        return _row_to_record(rows[0]) if rows else None

    def by_request_id(self, request_id: str) -> OperationRecord | None:
        rows = self._store.query("SELECT * FROM operations WHERE request_id = ?", (request_id,))
        return _row_to_record(rows[0]) if rows else None

    def list(
        self,
        *,
        kinds: Sequence[str] = (),
        target: str = "",
        active_only: bool = False,
        limit: int = 100,
        before: float | None = None,
    ) -> list[OperationRecord]:
        """Newest first; ``before`` (a create_time) pages backwards."""
        sql = "SELECT * FROM operations WHERE 1=1"
        params: list[object] = []
        if kinds:
            sql += " AND kind IN (" + ",".join("?" * len(kinds)) + ")"
            params += list(kinds)
        if target:
            sql += " AND target = ?"
            params.append(target)
        if active_only:
            sql += " AND end_time IS NULL"
        if before is not None:
            sql += " AND create_time < ?"
            params.append(before)
        sql += " ORDER BY create_time DESC, rowid DESC LIMIT ?"
        params.append(max(1, min(limit, 1000)))
        return [_row_to_record(r) for r in self._store.query(sql, tuple(params))]

    def unfinished(self) -> list[OperationRecord]:
        rows = self._store.query("SELECT * FROM operations WHERE end_time IS NULL ORDER BY create_time")
        return [_row_to_record(r) for r in rows]

    def prune(self, older_than_s: float) -> int:
        """Forget finished operations (and their request ids) older than the retention."""
        cutoff = time.time() - older_than_s
        cur = self._store.execute("DELETE FROM operations WHERE end_time IS NOT NULL AND end_time < ?", (cutoff,))
        return cur.rowcount

    def count(self) -> int:
        return int(self._store.query("SELECT COUNT(*) AS n FROM operations")[0]["n"])


def _row_to_record(row) -> OperationRecord:
    error = None
    if row["error_code"] is not None:
        error = OperationError(
            code=row["error_code"],
            message=row["error_message"] or "",
            fields=tuple(tuple(f) for f in json.loads(row["error_fields"] or "[]")),
        )
    return OperationRecord(
        id=row["id"],
        kind=row["kind"],
        target=row["target"],
        request_id=row["request_id"],
        state=row["state"],
        create_time=row["create_time"],
        update_time=row["update_time"],
        end_time=row["end_time"],
        percent=row["percent"],
        stage=row["stage"],
        bytes_done=row["bytes_done"],
        bytes_total=row["bytes_total"],
        error=error,
        response_type=row["response_type"],
        response=row["response"],
        metadata=json.loads(row["metadata"]),
        fingerprint=row["fingerprint"],
    )
