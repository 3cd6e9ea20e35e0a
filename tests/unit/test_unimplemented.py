"""A service this agent build does not implement answers UNIMPLEMENTED naming the method.

In-process grpc.aio server (every cna.v1 service is implemented by the current daemon, so the
real process has none left to show this on).
"""

from __future__ import annotations

import asyncio

import grpc
import pytest

from cna_agent import __version__
from cna_agent.api import pb
from cna_agent.api.unimplemented import unimplemented_service


def test_unary_and_streaming_methods_say_which_method_and_version():
    async def scenario():
        server = grpc.aio.server()
        server.add_generic_rpc_handlers((unimplemented_service("cna.v1.VmService"),))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                stub = pb.vm_pb2_grpc.VmServiceStub(ch)
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await stub.ListVms(pb.vm_pb2.ListVmsRequest(), timeout=10)
                assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
                assert "cna.v1.VmService/ListVms" in info.value.details() and __version__ in info.value.details()
                call = stub.SerialConsole(iter([pb.vm_pb2.SerialConsoleInput(vm="x")]), timeout=10)
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    async for _ in call:
                        pass
                assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
                assert "SerialConsole" in info.value.details()
        finally:
            await server.stop(0)

    asyncio.run(scenario())


def test_unknown_service_name_is_a_programming_error():
    with pytest.raises(KeyError):
        unimplemented_service("cna.v1.NoSuchService")
