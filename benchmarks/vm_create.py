"""VM create+start latency through the agent vs raw libvirt, and ListVms with 100 VMs.

Why: the agent adds validation, journalling, a per-VM lock and metadata to every create; this
measures what that costs against the bare libvirt calls it wraps (target: ratio <= 1.10).

* agent: CreateVm(start=true) over the unix socket, timed until its operation is done
  (the reply comes back done: create waits for quick work).
* libvirt: defineXML + create of the same domain XML (the agent's builder renders it) on a
  separate embedded connection in this process.
* Tiny diskless guests (no OS: only the QEMU process start counts), TCG, interleaved
  agent/libvirt so machine noise hits both; medians. Clean-up is not timed.
* list_100_ms: median ListVms latency with 100 defined (not running) VMs.
* parallel_ratio: ``--parallel`` (20) CreateVm+Start at once from 5 clients, wall time, over
  the same creates done on raw libvirt from 20 threads (issue target <= 1.15); medians of
  ``--parallel-rounds`` interleaved rounds.

Usage: python -m benchmarks.vm_create [--runs N]; the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import threading
import time
import uuid as uuidlib
from concurrent.futures import ThreadPoolExecutor

import cna_agent  # noqa: F401  (first: turns gRPC fork support off before grpc loads; libvirt forks QEMU here)
import grpc

from benchmarks._agent import running_agent
from cna_agent.api import pb
from cna_agent.compute.render import Bindings, RenderContext, build_domain
from cna_agent.compute.spec import ConsoleSpec, VmSpec

v = pb.vm_pb2


def tiny_spec(name: str) -> VmSpec:
    return VmSpec(name=name, uuid=str(uuidlib.uuid4()), arch="x86_64", vcpus=1, memory_mib=32, console=ConsoleSpec(type="none"))


def tiny_pb(name: str):
    return v.VmSpec(name=name, arch=pb.common_pb2.ARCH_X86_64, vcpus=1, memory_mib=32, console=v.ConsoleSpec(type=v.CONSOLE_TYPE_NONE))


def open_raw_libvirt(root: str):
    import libvirt

    from cna_agent.hypervisor import ensure_event_loop

    libvirt.registerErrorHandler(lambda _c, _e: None, None)
    ensure_event_loop()
    from cna_agent.hypervisor import prepare_embedded_root

    prepare_embedded_root(root)  # the same qemu.conf as the agent's embedded root: like for like
    return libvirt.open(f"qemu:///embed?root={root}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--list-calls", type=int, default=10)
    ap.add_argument("--parallel", type=int, default=20, help="creates at once for parallel_ratio")
    ap.add_argument("--parallel-rounds", type=int, default=3)
    args = ap.parse_args()
    raw_root = tempfile.mkdtemp(prefix="cna-bench-raw-")
    os.chmod(raw_root, 0o755)  # like a libvirt-created root: QEMU (dropped privileges) must traverse it
    conn = open_raw_libvirt(raw_root)
    ctx = RenderContext(host_arch="x86_64", virt_type="qemu", state_dir=raw_root, run_dir=os.path.join(raw_root, "run"))
    # The same XML as the agent's includes its QMP side-channel socket; its directory must exist.
    os.makedirs(os.path.join(raw_root, "run", "qmp"), exist_ok=True)
    agent_ms: list[float] = []
    libvirt_ms: list[float] = []
    try:
        with running_agent('[libvirt]\nvirt_type = "qemu"\n') as sock, grpc.insecure_channel(f"unix:{sock}") as ch:
            stub = pb.vm_pb2_grpc.VmServiceStub(ch)

            def agent_once(i: int) -> float:
                t = time.perf_counter()
                op = stub.CreateVm(v.CreateVmRequest(spec=tiny_pb(f"a{i}"), start=True), timeout=120)
                if not op.done:
                    for op in pb.operations_pb2_grpc.OperationsServiceStub(ch).WatchOperation(
                            pb.operations_pb2.WatchOperationRequest(id=op.id), timeout=120):
                        pass
                ms = (time.perf_counter() - t) * 1000
                if op.HasField("error"):
                    raise RuntimeError(f"agent create failed: {op.error.message}")
                stub.DeleteVm(v.DeleteVmRequest(vm=f"a{i}", force=True), timeout=120)
                return ms

            def libvirt_once(i: int) -> float:
                xml = build_domain(tiny_spec(f"l{i}"), Bindings(), ctx).to_xml()
                t = time.perf_counter()
                dom = conn.defineXML(xml)
                dom.create()
                ms = (time.perf_counter() - t) * 1000
                dom.destroy()
                dom.undefine()
                return ms

            def agent_parallel(rnd: int) -> float:
                """``--parallel`` CreateVm+Start at once from 5 clients (channels); wall seconds."""
                chans = [grpc.insecure_channel(f"unix:{sock}") for _ in range(5)]
                names = [f"pa{rnd}-{i}" for i in range(args.parallel)]

                def one(i: int) -> None:
                    c = chans[i % 5]
                    op = pb.vm_pb2_grpc.VmServiceStub(c).CreateVm(v.CreateVmRequest(spec=tiny_pb(names[i]), start=True),
                                                                  timeout=300)
                    if not op.done:
                        for op in pb.operations_pb2_grpc.OperationsServiceStub(c).WatchOperation(
                                pb.operations_pb2.WatchOperationRequest(id=op.id), timeout=300):
                            pass
                    if op.HasField("error"):
                        raise RuntimeError(f"agent create failed: {op.error.message}")

                t = time.perf_counter()
                with ThreadPoolExecutor(args.parallel) as pool:
                    list(pool.map(one, range(args.parallel)))
                took = time.perf_counter() - t
                with ThreadPoolExecutor(5) as pool:
                    list(pool.map(lambda n: stub.DeleteVm(v.DeleteVmRequest(vm=n, force=True), timeout=300), names))
                for c in chans:
                    c.close()
                return took

            def libvirt_parallel(rnd: int) -> float:
                """The same on raw libvirt: defineXML + create from ``--parallel`` threads."""
                xmls = [build_domain(tiny_spec(f"pl{rnd}-{i}"), Bindings(), ctx).to_xml() for i in range(args.parallel)]
                doms = []

                def one(xml: str) -> None:
                    d = conn.defineXML(xml)
                    d.create()
                    doms.append(d)

                t = time.perf_counter()
                with ThreadPoolExecutor(args.parallel) as pool:
                    list(pool.map(one, xmls))
                took = time.perf_counter() - t
                for d in doms:
                    d.destroy()
                    d.undefine()
                return took

            for i in range(2):  # warm-up: QEMU binary and libvirt caches on both sides
                agent_once(1000 + i)
                libvirt_once(1000 + i)
            for i in range(args.runs):
                agent_ms.append(agent_once(i))
                libvirt_ms.append(libvirt_once(i))

            par_agent, par_raw = [], []
            for rnd in range(args.parallel_rounds):  # interleaved, like the single creates
                par_agent.append(agent_parallel(rnd))
                par_raw.append(libvirt_parallel(rnd))

            for i in range(100):
                op = stub.CreateVm(v.CreateVmRequest(spec=tiny_pb(f"list{i:03d}")), timeout=60)
                assert op.done and not op.HasField("error"), op
            list_ms = []
            for _ in range(args.list_calls):
                t = time.perf_counter()
                resp = stub.ListVms(v.ListVmsRequest(), timeout=60)
                list_ms.append((time.perf_counter() - t) * 1000)
                assert len(resp.vms) == 100, len(resp.vms)
    finally:
        try:
            conn.close()
        except Exception:
            pass
        shutil.rmtree(raw_root, ignore_errors=True)
    a, l, lst = statistics.median(agent_ms), statistics.median(libvirt_ms), statistics.median(list_ms)
    print(f"create+start, {args.runs} interleaved runs: agent median {a:.1f} ms, raw libvirt median {l:.1f} ms -> ratio {a / l:.2f}")
    print(f"ListVms with 100 defined VMs: median {lst:.1f} ms over {args.list_calls} calls")
    pa, pl = statistics.median(par_agent), statistics.median(par_raw)
    print(f"{args.parallel} create+start at once ({args.parallel_rounds} rounds): agent {pa:.2f} s (5 clients), raw libvirt "
          f"{pl:.2f} s ({args.parallel} threads) -> parallel_ratio {pa / pl:.2f}")
    print(json.dumps({"agent_ms": round(a, 1), "libvirt_ms": round(l, 1), "ratio": round(a / l, 3), "list_100_ms": round(lst, 1),
                      "runs": args.runs, "parallel": args.parallel, "parallel_agent_s": round(pa, 2),
                      "parallel_libvirt_s": round(pl, 2), "parallel_ratio": round(pa / pl, 3)}))


if __name__ == "__main__":
    main()
