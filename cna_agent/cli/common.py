"""What every cna-ctl command module shares: the client, errors, output helpers."""

from __future__ import annotations

import datetime as dt
import os
from typing import Any, Callable

import grpc
from google.protobuf import json_format

from cna_agent.api import pb

DEFAULT_SOCKET = "/run/cna-agent/cna-agent.sock"
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNAVAILABLE = 0, 1, 2, 69


class CliError(Exception):
    def __init__(self, message: str, code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.code = code


#: The keyword that prints fields left at their default: protobuf 5.26 renamed it, and the
#: packages run on the distribution's protobuf (Debian 12: 3.21, which knows only the old name).
_DEFAULTS_KW = ("always_print_fields_with_no_presence"
                if "always_print_fields_with_no_presence" in json_format.MessageToDict.__code__.co_varnames
                else "including_default_value_fields")


def to_json(message: Any) -> dict[str, Any]:
    return json_format.MessageToDict(message, preserving_proto_field_name=True, **{_DEFAULTS_KW: True})


def fmt_time(ts) -> str:
    if ts is None or (ts.seconds == 0 and ts.nanos == 0):
        return "-"
    return dt.datetime.fromtimestamp(ts.seconds + ts.nanos / 1e9).strftime("%Y-%m-%d %H:%M:%S")


class Client:
    """A connection to the local agent with one stub per service."""

    def __init__(self, socket_path: str, timeout: float) -> None:
        self.socket_path = socket_path
        self.timeout = timeout
        if not os.path.exists(socket_path):
            raise CliError(
                f"cannot reach the agent: {socket_path} does not exist (is cna-agent running? "
                "try 'systemctl status cna-agent', or pass --socket)", EXIT_UNAVAILABLE)
        self.channel = grpc.insecure_channel(f"unix:{socket_path}")
        self.host = pb.host_pb2_grpc.HostServiceStub(self.channel)
        self.ops = pb.operations_pb2_grpc.OperationsServiceStub(self.channel)
        self.events = pb.events_pb2_grpc.EventServiceStub(self.channel)
        self.vms = pb.vm_pb2_grpc.VmServiceStub(self.channel)
        self.storage = pb.storage_pb2_grpc.StorageServiceStub(self.channel)
        self.network = pb.network_pb2_grpc.NetworkServiceStub(self.channel)
        self.backups = pb.backup_pb2_grpc.BackupServiceStub(self.channel)
        self.appliances = pb.appliance_pb2_grpc.ApplianceServiceStub(self.channel)

    def call(self, method: Callable, request: Any, **kw: Any) -> Any:
        try:
            return method(request, timeout=kw.pop("timeout", self.timeout), **kw)
        except grpc.RpcError as exc:
            raise rpc_error(exc, self.socket_path) from None


def rpc_error(exc: grpc.RpcError, socket_path: str) -> CliError:
    code = exc.code() if hasattr(exc, "code") else None
    details = exc.details() if hasattr(exc, "details") else str(exc)
    if code == grpc.StatusCode.UNAVAILABLE and ("connect" in (details or "").lower() or "socket" in (details or "").lower()):
        return CliError(f"cannot reach the agent at {socket_path}: {details} (is cna-agent running?)", EXIT_UNAVAILABLE)
    if code == grpc.StatusCode.PERMISSION_DENIED or "Permission denied" in (details or ""):
        return CliError(f"permission denied on {socket_path}: cna-ctl must run as root", EXIT_UNAVAILABLE)
    name = code.name if code else "ERROR"
    return CliError(f"{name}: {details}")
