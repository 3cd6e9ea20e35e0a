"""Cross-cutting RPC concerns: an access log line per call with the caller's identity.

Identity: on the TCP listener with mutual TLS it is the client certificate's common name
(the VRM); on the unix socket the caller is local root (the socket is 0600 root in a 0700
directory, which is the access control, as with libvirt's and containerd's sockets).
"""

from __future__ import annotations

import logging
import time
from typing import Any, Awaitable, Callable

import grpc

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
