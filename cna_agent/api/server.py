"""Builds the gRPC server: the cna.v1 services, health, reflection, and the two listeners.

* TCP for the VRM: mutual TLS when [tls] is configured; plaintext only on loopback unless
  grpc.allow_insecure_tcp says otherwise (cna_agent/config/validation.py enforces that).
* A unix socket for cna-ctl: created under umask 077 and chmod 0600, root-only.
* grpc.health.v1 (so grpc_health_probe and load balancers work) and server reflection as
  both grpc.reflection.v1 and v1alpha (grpcurl asks v1 first; older clients only know
  v1alpha). grpcio-reflection implements only v1alpha; v1's messages have the same fields and
  numbers, so the same servicer is also mounted under the v1 name.
* SO_REUSEPORT is off: with it, a second agent could bind the same port and silently share
  (steal half of) the VRM's calls instead of failing at start.
"""

from __future__ import annotations

import os
import socket
import stat
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2

from cna_agent.api import pb
from cna_agent.api.interceptors import AccessLogInterceptor, ErrorMappingInterceptor
from cna_agent.api.unimplemented import unimplemented_service
from cna_agent.config import AgentConfig, parse_host_port

REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"


class StartupError(Exception):
    """The server cannot start as configured; the message says which key and why."""


@dataclass(frozen=True)
class TlsMaterial:
    cert: bytes
    key: bytes
    ca: bytes | None


def read_tls(config: AgentConfig) -> TlsMaterial | None:
    if not config.tls.enabled:
        return None
    material: dict[str, bytes] = {}
    for key in ("cert", "key", "ca"):
        path = getattr(config.tls, key)
        if not path:
            continue
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise StartupError(f"tls.{key}: cannot read {path}: {exc.strerror}") from None
        if b"-----BEGIN" not in data:
            raise StartupError(f"tls.{key}: {path} is not a PEM file")
        material[key] = data
    return TlsMaterial(material["cert"], material["key"], material.get("ca"))


def server_options(config: AgentConfig) -> list[tuple[str, int]]:
    g = config.grpc
    return [
        ("grpc.so_reuseport", 0),
        ("grpc.keepalive_time_ms", int(g.keepalive_time_s * 1000)),
        ("grpc.keepalive_timeout_ms", int(g.keepalive_timeout_s * 1000)),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", int(g.min_ping_interval_s * 1000)),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.max_concurrent_streams", g.max_concurrent_streams),
        ("grpc.max_receive_message_length", g.max_message_mib * 1024 * 1024),
        ("grpc.max_send_message_length", g.max_message_mib * 1024 * 1024),
    ]


def _add_reflection(server: grpc.aio.Server, service_names: list[str]) -> None:
    names = [*service_names, health.SERVICE_NAME, reflection.SERVICE_NAME, REFLECTION_V1]
    servicer = reflection.ReflectionServicer(names) if not hasattr(reflection, "aio") else reflection.aio.ReflectionServicer(names)
    server.add_generic_rpc_handlers((
        grpc.method_handlers_generic_handler(reflection.SERVICE_NAME, {
            "ServerReflectionInfo": grpc.stream_stream_rpc_method_handler(
                servicer.ServerReflectionInfo,
                request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
                response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
            )
        }),
        grpc.method_handlers_generic_handler(REFLECTION_V1, {
            "ServerReflectionInfo": grpc.stream_stream_rpc_method_handler(
                servicer.ServerReflectionInfo,
                request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
                response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
            )
        }),
    ))


def _prepare_unix_socket(path: str) -> None:
    """Make the socket's directory root-only and clear a stale socket a dead agent left."""
    sock_path = Path(path)
    sock_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    if sock_path.exists() or sock_path.is_symlink():
        if not stat.S_ISSOCK(sock_path.lstat().st_mode):
            raise StartupError(f"grpc.unix_socket: {path} exists and is not a socket; refusing to replace it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(1.0)
        try:
            probe.connect(path)
        except OSError:
            sock_path.unlink()  # nobody listens: a stale socket from a killed agent
        else:
            raise StartupError(f"grpc.unix_socket: {path} is in use (another cna-agent is running?)")
        finally:
            probe.close()


class AgentServer:
    """The grpc.aio server with its services and listeners."""

    def __init__(self, config: AgentConfig, servicers: dict[str, object], *, on_call=None) -> None:
        self.config = config
        self.server = grpc.aio.server(interceptors=[AccessLogInterceptor(on_call), ErrorMappingInterceptor()], options=server_options(config))
        self.health = health.aio.HealthServicer() if hasattr(health, "aio") else health.HealthServicer()
        self.tcp_port: int | None = None
        registrars = {
            "cna.v1.HostService": pb.host_pb2_grpc.add_HostServiceServicer_to_server,
            "cna.v1.OperationsService": pb.operations_pb2_grpc.add_OperationsServiceServicer_to_server,
            "cna.v1.EventService": pb.events_pb2_grpc.add_EventServiceServicer_to_server,
            "cna.v1.VmService": pb.vm_pb2_grpc.add_VmServiceServicer_to_server,
            "cna.v1.StorageService": pb.storage_pb2_grpc.add_StorageServiceServicer_to_server,
            "cna.v1.NetworkService": pb.network_pb2_grpc.add_NetworkServiceServicer_to_server,
            "cna.v1.AgentService": pb.agent_pb2_grpc.add_AgentServiceServicer_to_server,
            "cna.v1.MigrationService": pb.migration_pb2_grpc.add_MigrationServiceServicer_to_server,
            "cna.v1.BackupService": pb.backup_pb2_grpc.add_BackupServiceServicer_to_server,
            "cna.v1.ApplianceService": pb.appliance_pb2_grpc.add_ApplianceServiceServicer_to_server,
        }
        for name in pb.SERVICE_NAMES:
            servicer = servicers.get(name)
            if servicer is not None:
                registrars[name](servicer, self.server)
            else:
                self.server.add_generic_rpc_handlers((unimplemented_service(name),))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        _add_reflection(self.server, list(pb.SERVICE_NAMES))

    async def start(self) -> None:
        cfg = self.config
        if cfg.grpc.listen:
            host, port = parse_host_port(cfg.grpc.listen)
            address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            tls = read_tls(cfg)
            try:
                if tls is not None:
                    creds = grpc.ssl_server_credentials(
                        [(tls.key, tls.cert)], root_certificates=tls.ca, require_client_auth=tls.ca is not None
                    )
                    bound = self.server.add_secure_port(address, creds)
                else:
                    bound = self.server.add_insecure_port(address)
            except RuntimeError as exc:
                raise StartupError(f"grpc.listen: cannot listen on {cfg.grpc.listen}: {_bind_reason(host, port, exc)}") from None
            if not bound:
                raise StartupError(f"grpc.listen: cannot listen on {cfg.grpc.listen}: {_bind_reason(host, port, None)}")
            self.tcp_port = bound
        if cfg.grpc.unix_socket:
            _prepare_unix_socket(cfg.grpc.unix_socket)
            old = os.umask(0o077)
            try:
                bound = self.server.add_insecure_port(f"unix:{cfg.grpc.unix_socket}")
            except RuntimeError as exc:
                raise StartupError(f"grpc.unix_socket: cannot listen on {cfg.grpc.unix_socket}: {exc}") from None
            finally:
                os.umask(old)
            if not bound:
                raise StartupError(f"grpc.unix_socket: cannot listen on {cfg.grpc.unix_socket}")
        await self.server.start()
        if cfg.grpc.unix_socket:
            os.chmod(cfg.grpc.unix_socket, 0o600)

    async def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", *pb.SERVICE_NAMES):
            result = self.health.set(name, status)
            if hasattr(result, "__await__"):
                await result

    async def stop(self, grace: float = 5.0) -> None:
        await self.server.stop(grace)


def preflight(config: AgentConfig) -> None:
    """What would make the server fail to start, found before the agent builds anything: the
    TLS files, and a TCP address something else listens on. The build connects to libvirt and
    probes KVM and QEMU (seconds to tens of seconds on a fresh host); an admin with a typo in
    the certificate path or a port in use gets the one error line at once instead. The real
    bind later still reports a port taken in between."""
    read_tls(config)
    if not config.grpc.listen:
        return
    host, port = parse_host_port(config.grpc.listen)
    if not port:
        return
    probe = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC binds: a TIME_WAIT port is free
    try:
        probe.bind((host, port))
    except OSError as exc:
        raise StartupError(f"grpc.listen: cannot listen on {config.grpc.listen}: {exc.strerror or exc}") from None
    finally:
        probe.close()


def _bind_reason(host: str, port: int, exc: Exception | None) -> str:
    """gRPC says only "failed to bind"; find out why, for the one error line an admin reads."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    try:
        s.bind((host, port))
    except OSError as err:
        return err.strerror or str(err)
    finally:
        s.close()
    return str(exc) if exc else "gRPC could not bind the address"
