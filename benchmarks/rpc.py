"""GetCapabilities round-trip latency over the agent's unix socket.

Starts the real daemon, warms up, then interleaves GetCapabilities calls with calls of the
cheapest RPC the server has (grpc.health.v1 Check) on the same channel, so the ratio shows
what the agent's own work costs on top of gRPC itself on this (noisy) machine.

    python -m benchmarks.rpc [--calls N]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from benchmarks._agent import percentile, running_agent
from cna_agent.api import pb


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--calls", type=int, default=500)
    args = ap.parse_args()
    with running_agent() as sock, grpc.insecure_channel(f"unix:{sock}") as ch:
        host = pb.host_pb2_grpc.HostServiceStub(ch)
        health = health_pb2_grpc.HealthStub(ch)
        caps_req = pb.host_pb2.GetCapabilitiesRequest()
        health_req = health_pb2.HealthCheckRequest()
        for _ in range(20):
            host.GetCapabilities(caps_req, timeout=30)
            health.Check(health_req, timeout=30)
        caps_ms: list[float] = []
        health_ms: list[float] = []
        size = 0
        for _ in range(args.calls):
            t = time.perf_counter()
            reply = host.GetCapabilities(caps_req, timeout=30)
            caps_ms.append((time.perf_counter() - t) * 1000)
            t = time.perf_counter()
            health.Check(health_req, timeout=30)
            health_ms.append((time.perf_counter() - t) * 1000)
            size = reply.ByteSize()
    p50, p99 = statistics.median(caps_ms), percentile(caps_ms, 99)
    base50 = statistics.median(health_ms)
    print(f"GetCapabilities over unix socket, {args.calls} calls, reply {size} bytes")
    print(f"  p50 {p50:.3f} ms   p99 {p99:.3f} ms")
    print(f"  baseline health.Check p50 {base50:.3f} ms -> ratio {p50 / base50:.2f}x")
    print(json.dumps({"p50_ms": round(p50, 3), "p99_ms": round(p99, 3), "health_p50_ms": round(base50, 3),
                      "ratio_vs_health": round(p50 / base50, 2), "calls": args.calls, "reply_bytes": size}))


if __name__ == "__main__":
    main()
