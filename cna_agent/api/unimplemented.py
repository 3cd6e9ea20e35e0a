"""Services the API defines but this agent version does not implement yet.

gRPC's generated base classes already answer UNIMPLEMENTED, but with "Method not
implemented!"; a manager talking to a mixed fleet should learn which method, on which agent
version, and that it is a known gap rather than a broken deployment.
"""

from __future__ import annotations

import grpc

from cna_agent import __version__
from cna_agent.api import pb


def _unimplemented_handler(service: str, method) -> grpc.RpcMethodHandler:
    message = (
        f"{service}/{method.name} is not implemented by cna-agent {__version__} on this host yet; "
        "it is part of the published cna.v1 API and arrives in a later agent release"
    )
    req_cls = pb_message_class(method.input_type.full_name)
    resp_cls = pb_message_class(method.output_type.full_name)

    async def unary(request, context):
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, message)

    async def stream(request_or_iterator, context):
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, message)
        yield  # pragma: no cover - makes this an async generator

    des, ser = req_cls.FromString, resp_cls.SerializeToString
    if method.client_streaming and method.server_streaming:
        return grpc.stream_stream_rpc_method_handler(stream, request_deserializer=des, response_serializer=ser)
    if method.server_streaming:
        return grpc.unary_stream_rpc_method_handler(stream, request_deserializer=des, response_serializer=ser)
    if method.client_streaming:
        return grpc.stream_unary_rpc_method_handler(unary, request_deserializer=des, response_serializer=ser)
    return grpc.unary_unary_rpc_method_handler(unary, request_deserializer=des, response_serializer=ser)


def pb_message_class(full_name: str):
    from google.protobuf import symbol_database

    return symbol_database.Default().GetSymbol(full_name)


def unimplemented_service(full_name: str) -> grpc.GenericRpcHandler:
    """A handler answering every method of ``full_name`` with a clear UNIMPLEMENTED."""
    modules = [getattr(pb, n) for n in dir(pb) if n.endswith("_pb2")]
    for mod in modules:
        for svc in mod.DESCRIPTOR.services_by_name.values():
            if svc.full_name == full_name:
                handlers = {m.name: _unimplemented_handler(full_name, m) for m in svc.methods}
                return grpc.method_handlers_generic_handler(full_name, handlers)
    raise KeyError(full_name)
