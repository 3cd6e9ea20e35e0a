"""Cross-cutting RPC concerns: an access log line per call with the caller's identity, and
the one place service errors become gRPC statuses.

Identity: on the TCP listener with mutual TLS it is the client certificate's common name
(the VRM); on the unix socket the caller is local root (the socket is 0600 root in a 0700
directory, which is the access control, as with libvirt's and containerd's sockets).
"""

from __future__ import annotations

import logging
import time
from typing import Any, Awaitable, Callable

import grpc

from cna_agent.api.status import abort_with
from cna_agent.errors import AgentError, Internal

log = logging.getLogger("cna_agent.rpc")


def caller_identity(context: grpc.aio.ServicerContext) -> str:
    try:
        auth = context.auth_context()
    except Exception:
        auth = {}
    names = auth.get("x509_common_name") or []
    if names:
        return "cn=" + names[0].decode(errors="replace")
    peer = context.peer() or ""
    return "local" if peer.startswith("unix:") else peer


class AccessLogInterceptor(grpc.aio.ServerInterceptor):
    """Logs method, caller, status and duration of every unary call (streams: on start)."""

    def __init__(self, on_call: Callable[[str, str, float], None] | None = None) -> None:
        self._on_call = on_call

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]], details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or handler.unary_unary is None:
            if handler is not None:
                log.debug("event=rpc.stream method=%s", details.method)
            return handler
        inner = handler.unary_unary
        method = details.method
        on_call = self._on_call

        async def logged(request: Any, context: grpc.aio.ServicerContext) -> Any:
            start = time.perf_counter()
            code = "OK"
            try:
                return await inner(request, context)
            except grpc.aio.AbortError:
                code = context.code().name if context.code() else "ABORTED"
                raise
            except Exception:
                code = "INTERNAL"
                log.exception("event=rpc.crash method=%s", method)
                raise
            finally:
                elapsed = time.perf_counter() - start
                if on_call is not None:
                    on_call(method, code, elapsed)
                log.info("event=rpc method=%s caller=%s code=%s ms=%.1f", method, caller_identity(context), code, elapsed * 1000)

        return grpc.unary_unary_rpc_method_handler(
            logged, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer
        )


class ErrorMappingInterceptor(grpc.aio.ServerInterceptor):
    """Turns an AgentError raised anywhere under a servicer method into the RPC's status
    (code, message naming the field, BadRequest details: api/status.py), for all four call
    shapes. Servicers just raise; nothing else in the api layer catches AgentError. Anything
    else is a bug: it is logged with its traceback and answered INTERNAL, never as gRPC's
    UNKNOWN with a Python exception text.

    Installed after the access log, so the log sees the mapped code.
    """

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]], details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None:
            return handler
        kw = {"request_deserializer": handler.request_deserializer, "response_serializer": handler.response_serializer}
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(_mapped_unary(handler.unary_unary), **kw)
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(_mapped_unary(handler.stream_unary), **kw)
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(_mapped_stream(handler.unary_stream), **kw)
        if handler.stream_stream is not None:
            return grpc.stream_stream_rpc_method_handler(_mapped_stream(handler.stream_stream), **kw)
        return handler


async def _abort(context: grpc.aio.ServicerContext, exc: Exception) -> None:
    if isinstance(exc, AgentError):
        await abort_with(context, exc)
    log.error("event=rpc.bug error=%r", f"{type(exc).__name__}: {exc}", exc_info=exc)
    await abort_with(context, Internal(f"internal error ({type(exc).__name__}); the agent logged it as event=rpc.bug"))


def _mapped_unary(inner: Callable[..., Any]) -> Callable[..., Any]:
    async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await inner(request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await _abort(context, exc)

    return call


def _mapped_stream(inner: Callable[..., Any]) -> Callable[..., Any]:
    async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            async for item in inner(request, context):
                yield item
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await _abort(context, exc)

    return call
