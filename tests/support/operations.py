"""Waiting for the agent's long-running Operations (AIP-151) to finish, for every test tier.

Why one module: tests had a waiter each (tests/support.py's wait_operation, test_vm_lifecycle's
wait_op/ok and private copies in six more modules), watching or polling, with or without an
error check, with their own timeouts and messages. This one follows an operation either way a VRM can: the WatchOperation stream
(the default) or GetOperation polled every 0.2 s (``poll=True``). Both are public API, so the
suite keeps using both: callers that polled before still poll.

``ok`` waits and is the success check: the operation finished, SUCCEEDED and carries no error;
with ``into`` it returns the response unpacked into that message. ``check_ok`` is that check on
an operation already finished (the last of ``history``).

``target`` is a channel or an OperationsServiceStub already made on one.
"""

from __future__ import annotations

import time

from cna_agent.api import pb

ops_pb = pb.operations_pb2

#: How long to wait for an operation unless the caller says otherwise.
TIMEOUT = 180.0
#: Per GetOperation call while polling.
CALL_TIMEOUT = 30.0
POLL_INTERVAL = 0.2


def _stub(target) -> pb.operations_pb2_grpc.OperationsServiceStub:
    if isinstance(target, pb.operations_pb2_grpc.OperationsServiceStub):
        return target
    return pb.operations_pb2_grpc.OperationsServiceStub(target)


def history(target, op: ops_pb.Operation, timeout: float = TIMEOUT) -> list[ops_pb.Operation]:
    """``op`` and every state WatchOperation streams for it; the last one is done."""
    seen = [op, *_stub(target).WatchOperation(ops_pb.WatchOperationRequest(id=op.id), timeout=timeout)]
    assert seen[-1].done, seen[-1]
    return seen


def wait(target, op: ops_pb.Operation, timeout: float = TIMEOUT, *, poll: bool = False) -> ops_pb.Operation:
    """The operation once it is done (whether it succeeded or not), after at most ``timeout`` s."""
    if not poll:
        return history(target, op, timeout)[-1]
    stub = _stub(target)
    deadline = time.monotonic() + timeout
    while not op.done:
        assert time.monotonic() < deadline, f"operation {op.id} ({op.kind}) not done after {timeout}s: {op}"
        time.sleep(POLL_INTERVAL)
        op = stub.GetOperation(ops_pb.GetOperationRequest(id=op.id), timeout=CALL_TIMEOUT)
    return op


def unpack(op: ops_pb.Operation, into):
    """``op``'s response unpacked into the message ``into`` (which must be its type)."""
    assert op.response.Unpack(into), op
    return into


def check_ok(op: ops_pb.Operation, into=None):
    """Assert the finished ``op`` succeeded; return it, or with ``into`` its response."""
    assert op.state == ops_pb.OPERATION_STATE_SUCCEEDED and not op.HasField("error"), f"{op.kind} failed: {op.error}"
    return op if into is None else unpack(op, into)


def ok(target, op: ops_pb.Operation, timeout: float = TIMEOUT, *, poll: bool = False, into=None):
    """Wait for the operation and assert it succeeded; return it, or with ``into`` its response."""
    return check_ok(wait(target, op, timeout, poll=poll), into)
