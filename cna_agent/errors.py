"""Errors services raise; the api layer maps them to gRPC status codes.

Services never import grpc (DESIGN.md), so the code is carried as the gRPC status name and
number here, and every error that is about a caller's input names the field at fault.
"""

from __future__ import annotations

#: gRPC status code numbers (google.rpc.Code), so journalled errors survive without grpc.
CODES: dict[str, int] = {
    "OK": 0,
    "CANCELLED": 1,
    "UNKNOWN": 2,
    "INVALID_ARGUMENT": 3,
    "DEADLINE_EXCEEDED": 4,
    "NOT_FOUND": 5,
    "ALREADY_EXISTS": 6,
    "PERMISSION_DENIED": 7,
    "RESOURCE_EXHAUSTED": 8,
    "FAILED_PRECONDITION": 9,
    "ABORTED": 10,
    "OUT_OF_RANGE": 11,
    "UNIMPLEMENTED": 12,
    "INTERNAL": 13,
    "UNAVAILABLE": 14,
    "DATA_LOSS": 15,
    "UNAUTHENTICATED": 16,
}
CODE_NAMES: dict[int, str] = {v: k for k, v in CODES.items()}


class AgentError(Exception):
    """Base of every error meant for a caller."""

    code = "INTERNAL"

    def __init__(self, message: str, *, field: str = "", fields: tuple[tuple[str, str], ...] = ()) -> None:
        super().__init__(message)
        self.message = message
        self.fields: tuple[tuple[str, str], ...] = fields or (((field, message),) if field else ())

    @property
    def code_number(self) -> int:
        return CODES[self.code]

    @property
    def field(self) -> str:
        return self.fields[0][0] if self.fields else ""


class InvalidArgument(AgentError):
    code = "INVALID_ARGUMENT"

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}", field=field)


class NotFound(AgentError):
    code = "NOT_FOUND"


class AlreadyExists(AgentError):
    code = "ALREADY_EXISTS"


class FailedPrecondition(AgentError):
    code = "FAILED_PRECONDITION"


class ResourceBusy(FailedPrecondition):
    """Another operation holds the resource's lock."""


class ResourceExhausted(AgentError):
    """The host has not enough of a resource left (reserved CPU or memory, slots)."""

    code = "RESOURCE_EXHAUSTED"


class Unavailable(AgentError):
    code = "UNAVAILABLE"


class DeadlineExceeded(AgentError):
    code = "DEADLINE_EXCEEDED"


class OutOfRange(AgentError):
    code = "OUT_OF_RANGE"


class Unimplemented(AgentError):
    code = "UNIMPLEMENTED"


class Aborted(AgentError):
    code = "ABORTED"


class Internal(AgentError):
    code = "INTERNAL"


def make_error(cls: type[AgentError], message: str, fields: tuple[tuple[str, str], ...] = ()) -> AgentError:
    """An instance of ``cls`` with exactly this message and fields, whatever its constructor
    takes (InvalidArgument prefixes its field): for an error raised again in another context."""
    err = cls.__new__(cls)
    Exception.__init__(err, message)
    err.message, err.fields = message, fields
    return err


def error_for(code: str | int, message: str) -> AgentError:
    """The error of gRPC status ``code`` (name or number): an awaited operation's error raised
    again by the operation that waited for it. The general class (FailedPrecondition, not
    ResourceBusy); a code no class has gives a plain AgentError of that code."""
    name = CODE_NAMES.get(code, "INTERNAL") if isinstance(code, int) else code
    cls = next((c for c in AgentError.__subclasses__() if c.code == name), None)
    if cls is not None:
        return make_error(cls, message)
    err = make_error(AgentError, message)
    if name in CODES:
        err.code = name  # an instance attribute: the class's INTERNAL stays for every other
    return err
