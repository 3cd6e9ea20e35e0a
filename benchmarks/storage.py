"""Storage benchmark: linked clone vs full copy, and VM listing latency while the SAN hangs.

Through the real daemon over its unix socket:

1. a qcow2 template (256 MiB virtual, 64 MiB written) is cloned linked (qcow2 overlay) and
   fully copied, each several times; medians of the end-to-end operation time (request ->
   operation done) are reported, with their ratio;
2. the p99 latency of ListVms (a cheap VM call answered from libvirt) is measured with the
   iSCSI datastore healthy, then again while tgtd is SIGSTOPped and storage calls on that
   datastore are in flight (they hang until their deadline). The ratio shows whether a hung
   SAN leaks into VM calls (DESIGN.md: storage work has its own executor).

Needs root and tgtd (tools/testbed.py starts a private one). Ends with one JSON line:
{"linked_clone_ms", "full_copy_ms", "list_p99_healthy_ms", "list_p99_hung_ms", ...}.

    python -m benchmarks.storage [--rounds 5] [--calls 300]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from benchmarks._agent import running_agent

REPO = Path(__file__).resolve().parent.parent
IQN = "iqn.2024-01.bench.cna:storage"
MiB = 1024**2


def _testbed():
    spec = importlib.util.spec_from_file_location("cna_testbed", REPO / "tools" / "testbed.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _p99(samples: list[float]) -> float:
    s = sorted(samples)
    return s[min(len(s) - 1, int(round(0.99 * (len(s) - 1))))]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5, help="clones of each kind (default 5)")
    ap.add_argument("--calls", type=int, default=300, help="ListVms calls per latency run (default 300)")
    a = ap.parse_args(argv)

    import grpc

    from cna_agent.api import pb

    S = pb.storage_pb2
    work = Path(tempfile.mkdtemp(prefix="cna-bench-storage-"))
    tb_mod = _testbed()
    tb = tb_mod.Testbed(work / "tb")
    tb.up(["tgtd"])
    tgt_pids = tb.status()["tgtd"]["started_pids"]
    try:
        lun = work / "lun1.img"
        with open(lun, "wb") as fh:
            fh.truncate(64 * MiB)
        tb.iscsi_create_target(IQN, [lun])
        ds = work / "ds"
        ds.mkdir()
        extra = (f'[storage]\nprobe_interval_s = 1.0\nprobe_timeout_s = 2.0\nexecutor_threads = 4\n'
                 f'[storage.datastores.local]\ntype = "dir"\npath = "{ds}"\n'
                 f'[storage.datastores.san1]\ntype = "iscsi"\nportals = ["127.0.0.1:3260"]\ntarget_iqn = "{IQN}"\n'
                 f'initiator = "libiscsi"\nscan_timeout_s = 3.0\n'
                 f'[libvirt]\nuri = "qemu:///embed?root={work / "libvirt"}"\n')
        with running_agent(extra) as sock:
            ch = grpc.insecure_channel(f"unix:{sock}")
            st = pb.storage_pb2_grpc.StorageServiceStub(ch)
            ops = pb.operations_pb2_grpc.OperationsServiceStub(ch)
            vms = pb.vm_pb2_grpc.VmServiceStub(ch)

            def run_op(op) -> None:
                last = op
                if not op.done:
                    for last in ops.WatchOperation(pb.operations_pb2.WatchOperationRequest(id=op.id), timeout=600):
                        pass
                if last.HasField("error"):
                    raise RuntimeError(f"{last.kind}: {last.error.message}")

            run_op(st.CreateVolume(S.CreateVolumeRequest(datastore="local", path="tpl/base.qcow2", format=S.VOLUME_FORMAT_QCOW2,
                                                         size_bytes=256 * MiB), timeout=60))
            subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x3c 0 64M", str(ds / "tpl" / "base.qcow2")],
                           check=True, capture_output=True, timeout=120)

            def timed_clone(i: int, linked: bool) -> float:
                t0 = time.perf_counter()
                run_op(st.CloneVolume(S.CloneVolumeRequest(source="local/tpl/base.qcow2", datastore="local",
                                                           path=f"{'l' if linked else 'f'}{i}/root.qcow2", linked=linked), timeout=600))
                return (time.perf_counter() - t0) * 1000

            full = [timed_clone(i, False) for i in range(a.rounds)]
            linked = [timed_clone(i, True) for i in range(a.rounds)]
            linked_ms, full_ms = statistics.median(linked), statistics.median(full)
            print(f"linked clone: median {linked_ms:.1f} ms  full copy: median {full_ms:.1f} ms  "
                  f"(full/linked = {full_ms / linked_ms:.1f}x, {a.rounds} rounds each)")

            def list_latencies() -> list[float]:
                out = []
                for _ in range(a.calls):
                    t0 = time.perf_counter()
                    vms.ListVms(pb.vm_pb2.ListVmsRequest(), timeout=30)
                    out.append((time.perf_counter() - t0) * 1000)
                return out

            list_latencies()[:10]  # warm-up
            healthy = list_latencies()
            hung_ok = bool(tgt_pids)
            hung: list[float] = []
            stuck: list[float] = []
            alive_at_end = 0
            if hung_ok:
                def storage_call() -> None:
                    # a LUN listing on the SAN datastore: iscsi-ls hangs on the stopped target
                    # until the storage deadline (scan_timeout_s) ends it
                    ch2 = grpc.insecure_channel(f"unix:{sock}")
                    t0 = time.perf_counter()
                    try:
                        pb.storage_pb2_grpc.StorageServiceStub(ch2).GetDatastore(S.GetDatastoreRequest(name="san1"), timeout=60)
                    except grpc.RpcError:
                        pass
                    stuck.append(time.perf_counter() - t0)
                    ch2.close()

                os.kill(tgt_pids[0], signal.SIGSTOP)
                threads = [threading.Thread(target=storage_call, daemon=True) for _ in range(3)]
                try:
                    for t in threads:
                        t.start()
                    time.sleep(0.3)  # the storage calls are now stuck in the SAN
                    hung = list_latencies()
                    alive_at_end = sum(t.is_alive() for t in threads)
                finally:
                    for t in threads:
                        t.join(timeout=60)
                    health = st.GetDatastore(S.GetDatastoreRequest(name="san1"), timeout=30).health
                    os.kill(tgt_pids[0], signal.SIGCONT)
                print(f"while tgtd was stopped: {len(threads)} storage calls in flight, {alive_at_end} still stuck when the "
                      f"ListVms run ended, each took {statistics.median(stuck):.1f} s (ended by the storage deadline); "
                      f"san1 health after them: {pb.common_pb2.Health.Name(health)}")
            ch.close()
        p99_h = _p99(healthy)
        p99_x = _p99(hung) if hung else float("nan")
        print(f"ListVms p99: healthy {p99_h:.2f} ms, SAN hung {p99_x:.2f} ms (hung/healthy = {p99_x / p99_h:.2f}x, "
              f"{a.calls} calls each; medians {statistics.median(healthy):.2f} / {statistics.median(hung) if hung else float('nan'):.2f} ms)")
        print(json.dumps({
            "linked_clone_ms": round(linked_ms, 2), "full_copy_ms": round(full_ms, 2),
            "full_over_linked": round(full_ms / linked_ms, 2),
            "list_p99_healthy_ms": round(p99_h, 3), "list_p99_hung_ms": round(p99_x, 3),
            "hung_over_healthy": round(p99_x / p99_h, 3) if hung else None,
            "storage_calls_stuck_during_run": alive_at_end,
            "rounds": a.rounds, "calls": a.calls,
        }))
        return 0
    finally:
        try:
            tb.iscsi_delete_target(IQN)
        except Exception:
            pass
        tb.down()
        import shutil

        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
