"""The two outside ends of benchmarks.event_rate, each a process of its own.

Why separate processes: the source must drive libvirt at a paced rate without sharing a GIL
with the listeners, and 10 listeners taking 1,000 events per second each would, in the
benchmark's own process, add their parsing to the delay they measure.

``python -m benchmarks._event_load source --uri URI --names FILE --rate R --seconds S --out F``
    suspends and resumes the named domains (each in turn: paused if running, else resumed)
    directly on libvirt at R calls per second for S seconds, from a few threads with a
    connection each; writes every call as [name, event, start, end] (wall clock) and the rate
    achieved.
``python -m benchmarks._event_load watch --sock SOCK --clients N [--rpc WatchEventBatches] --out F``
    opens N WatchEvents (or WatchEventBatches) streams on the agent (vm.lifecycle, from
    now), prints "ready" once all
    are open, and records [name, event, received, event time] per stream; reads the number of
    events each stream must see from stdin, and writes its record once every stream has them,
    or 60 s after stdin said how many.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

#: The source's threads (each with its own libvirt connection): enough for 1,000 calls per
#: second at a remote call's ~0.3 ms without one thread's wait holding up the pace.
SOURCE_THREADS = 4


def source(uri: str, names: list[str], rate: float, seconds: float, out: Path) -> None:
    import libvirt

    libvirt.registerErrorHandler(lambda _c, _e: None, None)
    total = int(rate * seconds)
    calls: list[list[list]] = [[] for _ in range(SOURCE_THREADS)]
    errors: list[str] = []
    conns = [libvirt.open(uri) for _ in range(SOURCE_THREADS)]
    doms = [[c.lookupByName(n) for n in names[i::SOURCE_THREADS]] for i, c in enumerate(conns)]
    paused = [[d.state()[0] == libvirt.VIR_DOMAIN_PAUSED for d in ds] for ds in doms]
    t0 = time.time() + 0.2

    def run(i: int) -> None:
        mine, state, rec = doms[i], paused[i], calls[i]
        k = 0
        for j in range(i, total, SOURCE_THREADS):  # call j is due at t0 + j / rate
            delay = t0 + j / rate - time.time()
            if delay > 0:
                time.sleep(delay)
            d = k % len(mine)
            k += 1
            start = time.time()
            try:
                if state[d]:
                    mine[d].resume()
                else:
                    mine[d].suspend()
            except libvirt.libvirtError as exc:
                errors.append(str(exc))
                continue
            rec.append([mine[d].name(), "resumed" if state[d] else "suspended", start, time.time()])
            state[d] = not state[d]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(SOURCE_THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    flat = sorted((c for cs in calls for c in cs), key=lambda c: c[2])
    span = (flat[-1][3] - flat[0][2]) if len(flat) > 1 else float("nan")
    out.write_text(json.dumps({"calls": flat, "rate": len(flat) / span if span else 0.0, "errors": errors[:10],
                               "error_count": len(errors)}))
    for c in conns:
        c.close()


def watch(sock: str, clients: int, rpc: str, out: Path) -> None:
    import cna_agent  # noqa: F401  (first: gRPC fork support off)
    import grpc
    from cna_agent.api import pb

    ev = pb.events_pb2
    chans = [grpc.insecure_channel(f"unix:{sock}") for _ in range(clients)]
    got: list[list[tuple[bytes, float]]] = [[] for _ in range(clients)]
    want = [0]
    opened = threading.Barrier(clients + 1)
    calls = []

    def listen(i: int) -> None:
        # Bytes in, parsed after the run: the listener's own cost per message is what a
        # client on this 2-core machine takes from the agent it measures.
        stream = chans[i].unary_stream(f"/cna.v1.EventService/{rpc}",
                                       request_serializer=ev.WatchEventsRequest.SerializeToString,
                                       response_deserializer=None)
        call = stream(ev.WatchEventsRequest(from_now=True, types=["vm.lifecycle"]), timeout=3600)
        calls.append(call)
        call.initial_metadata()
        opened.wait()
        mine = got[i]
        now = time.time
        single = rpc == "WatchEvents"
        try:
            count = 0
            for raw in call:
                mine.append((raw, now()))
                count += 1 if single else len(ev.WatchEventBatchesResponse.FromString(raw).events)
                if want[0] and count >= want[0]:
                    break
        except grpc.RpcError:
            pass

    threads = [threading.Thread(target=listen, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    opened.wait()
    print("ready", flush=True)
    want[0] = int(sys.stdin.readline())
    deadline = time.monotonic() + 60
    for t in threads:
        t.join(max(0.1, deadline - time.monotonic()))
    for c in calls:
        c.cancel()
    parsed = []
    for stream in got:
        rows = []
        for raw, received in stream:
            msgs = [ev.Event.FromString(raw)] if rpc == "WatchEvents" else ev.WatchEventBatchesResponse.FromString(raw).events
            for e in msgs:
                rows.append([e.resource_name, e.attributes.get("event", ""), received, e.time.seconds + e.time.nanos / 1e9])
        parsed.append(rows)
    out.write_text(json.dumps(parsed))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("source")
    s.add_argument("--uri", required=True)
    s.add_argument("--names", required=True, type=Path)
    s.add_argument("--rate", type=float, required=True)
    s.add_argument("--seconds", type=float, required=True)
    s.add_argument("--out", required=True, type=Path)
    w = sub.add_parser("watch")
    w.add_argument("--sock", required=True)
    w.add_argument("--clients", type=int, required=True)
    w.add_argument("--rpc", default="WatchEvents", choices=("WatchEvents", "WatchEventBatches"))
    w.add_argument("--out", required=True, type=Path)
    args = ap.parse_args()
    if args.cmd == "source":
        source(args.uri, args.names.read_text().split(), args.rate, args.seconds, args.out)
    else:
        watch(args.sock, args.clients, args.rpc, args.out)


if __name__ == "__main__":
    main()
