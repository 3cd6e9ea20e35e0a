"""Incremental against full backup: bytes and time, for a guest that changed 1% of a 1 GiB disk.

Issue 15's target: an incremental backup of a 1% change copies <= 3% of a full backup's bytes
in <= 20% of its time. One running test guest (busybox, TCG) on a 1 GiB qcow2 disk filled from
the host; each round, interleaved so both kinds see the same machine state:

1. a full backup into a new chain directory (StartBackup, every allocated extent of the NBD
   export copied into a qcow2 through qemu-nbd: cna_agent/backup_copy.py, what ``cna-ctl vm
   backup`` runs, then StopBackup),
2. the guest overwrites 1% of its disk (16 runs of 640 KiB spread over the disk, O_DIRECT),
3. an incremental backup from the full one's checkpoint into an overlay.

Times are wall-clock from StartBackup to the end of StopBackup (the whole job as a caller sees
it); bytes are those the copy wrote. The full backup is the baseline, measured in the same run;
medians over the rounds. Each chain is checked: the restored incremental equals the guest's
disk read from the host (qemu-img compare, the guest paused meanwhile).

Then the disk moves live to another datastore (MoveDisk, unthrottled) while the guest runs a
write loop that prints its uptime each turn: ``storage_migration_guest_stall_ms`` is the
longest gap between two turns during the copy and the pivot, against the longest gap over as
long a window without a move (``storage_migration_idle_gap_ms``) in the same run.

    python -m benchmarks.backup [--rounds 3] [--disk-mib 1024]

The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cna_agent  # noqa: F401  (first: turns gRPC fork support off before grpc loads)
import grpc

from benchmarks._agent import running_agent
from cna_agent import backup_copy
from cna_agent.api import pb

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))  # the test support: the busybox guest and its console
from support.console import AgentConsole, SerialLog  # noqa: E402
from support.guests import guest_spec  # noqa: E402

vm, bk, ops_pb = pb.vm_pb2, pb.backup_pb2, pb.operations_pb2
MiB = 1 << 20


def _run(*argv: str) -> str:
    p = subprocess.run(list(argv), capture_output=True, text=True, timeout=1800)
    if p.returncode != 0:
        raise RuntimeError(f"{argv[:3]}: {p.stderr[-500:]}")
    return p.stdout


def _done(ch: grpc.Channel, op: ops_pb.Operation) -> ops_pb.Operation:
    if not op.done:
        for cur in pb.operations_pb2_grpc.OperationsServiceStub(ch).WatchOperation(ops_pb.WatchOperationRequest(id=op.id)):
            op = cur
    if op.HasField("error"):
        raise RuntimeError(f"{op.kind}: {op.error.message}")
    return op


def backup_once(ch: grpc.Channel, uuid: str, directory: Path, since: str, backing: str) -> tuple[int, float, str, str]:
    """(bytes copied, seconds, checkpoint, file name) of one backup of disk vda."""
    stub = pb.backup_pb2_grpc.BackupServiceStub(ch)
    t0 = time.monotonic()
    op = _done(ch, stub.StartBackup(bk.StartBackupRequest(vm=uuid, incremental_from=since), timeout=60))
    info = bk.Backup()
    op.response.Unpack(info)
    (disk,) = info.disks
    name = f"vda.{'inc' if since else 'full'}.qcow2"
    try:
        backup_copy.create_target(str(directory / name), disk.size_bytes, backing)
        stats = backup_copy.copy_export(info.socket, disk.export_name, str(directory / name), dirty_bitmap=disk.dirty_bitmap)
    finally:
        _done(ch, stub.StopBackup(bk.StopBackupRequest(vm=uuid), timeout=60))
    return stats.bytes_copied, time.monotonic() - t0, info.checkpoint, name


def change_one_percent(con: AgentConsole, disk_mib: int, round_no: int) -> None:
    """16 runs of disk/1600 bytes (640 KiB for 1 GiB) at offsets spread over the disk (moved on by
    64 KiB each round)."""
    run_blocks = max(1, disk_mib * 1024 // 1600 // 64)  # 64 KiB blocks per run (10 for 1 GiB)
    step_blocks = disk_mib * 1024 // 16 // 64
    # a short loop, not 16 commands: a long line typed on the serial console loses characters
    cmds = (f"i=0; while [ $i -lt 16 ]; do dd if=/dev/urandom of=/dev/vda bs=64k seek=$((i*{step_blocks}+{round_no}))"
            f" count={run_blocks} oflag=direct conv=notrunc 2>/dev/null; i=$((i+1)); done")
    rc, out = con.run(f"{cmds}; sync; echo changed-$((6*7))", timeout=300)
    if rc != 0 or "changed-42" not in out:
        raise RuntimeError(f"the guest's write failed: {out[-300:]}")


def _ticks(text: str) -> list[float]:
    return [float(t) for t in re.findall(r"^TICK (\d+\.\d+)\r?$", text, re.M)]


def _longest_gap(ticks: list[float]) -> float:
    return max((b - a for a, b in zip(ticks, ticks[1:])), default=float("nan"))


def stall_during_move(ch: grpc.Channel, con: AgentConsole, log: SerialLog, uuid: str, seconds: float) -> tuple[float, float, float]:
    """(longest gap in the guest's write loop while its disk moves to datastore ds2, the
    longest over as long a window without a move, the move's seconds), in ms/ms/s. The loop
    writes 4 KiB with O_DIRECT and prints the guest's uptime (10 ms resolution) each turn."""
    con.send("(i=0; while :; do dd if=/dev/zero of=/dev/vda bs=4k count=1 seek=$((i%4096)) oflag=direct conv=notrunc "
             "2>/dev/null; read u r < /proc/uptime; echo TICK $u; i=$((i+1)); done) &\n")
    log.wait_for(r"^TICK \d+", timeout=60, count=3)
    mark = len(log.text())
    t0 = time.monotonic()
    storage = pb.storage_pb2_grpc.StorageServiceStub(ch)
    _done(ch, storage.MoveDisk(pb.storage_pb2.MoveDiskRequest(vm=uuid, target="vda", destination="ds2/bench/moved.qcow2"),
                               timeout=60))
    move_s = time.monotonic() - t0
    during = _ticks(log.text()[mark:])
    time.sleep(0.5)
    mark = len(log.text())
    time.sleep(max(move_s, seconds))
    idle = _ticks(log.text()[mark:])
    con.send("kill %1\n")
    return _longest_gap(during) * 1000, _longest_gap(idle) * 1000, move_s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--disk-mib", type=int, default=1024)
    args = ap.parse_args()
    ds, ds2 = Path(tempfile.mkdtemp(prefix="cna-bkb-")), Path(tempfile.mkdtemp(prefix="cna-bkm-"))
    (ds2 / "bench").mkdir()
    disk = ds / "bench" / "data.qcow2"
    disk.parent.mkdir()
    _run("qemu-img", "create", "-q", "-f", "qcow2", str(disk), f"{args.disk_mib}M")
    _run("qemu-io", "-f", "qcow2", "-c", f"write -P 0x5a 0 {args.disk_mib}M", str(disk))
    extra = (f'[compute]\nimage_dirs = "{REPO / ".cache" / "guests"}"\n'
             f'[storage.datastores.ds]\ntype = "dir"\npath = "{ds}"\n'
             f'[storage.datastores.ds2]\ntype = "dir"\npath = "{ds2}"\n')
    full_b, full_s, inc_b, inc_s = [], [], [], []
    with running_agent(extra) as sock, grpc.insecure_channel(f"unix:{sock}") as ch:
        vms = pb.vm_pb2_grpc.VmServiceStub(ch)
        spec = guest_spec("x86_64", "bench-bk", memory_mib=128, disks=[vm.DiskSpec(volume="ds/bench/data.qcow2")])
        got = vm.Vm()
        _done(ch, vms.CreateVm(vm.CreateVmRequest(spec=spec, start=True), timeout=120)).response.Unpack(got)
        uuid = got.uuid
        # running_agent's run_dir is <base>/run, beside the socket
        log = SerialLog(Path(sock).parent / "vms" / uuid / "serial.log")
        log.wait_for(r"CNA-GUEST-READY", timeout=300)
        with AgentConsole(ch, uuid) as con:
            con.send("\n")
            con.wait_for(r"cna# ", timeout=60, partial=True)
            for r in range(args.rounds):
                chain = Path(tempfile.mkdtemp(prefix="cna-bkc-"))
                b, s, checkpoint, full_name = backup_once(ch, uuid, chain, "", "")
                full_b.append(b)
                full_s.append(s)
                change_one_percent(con, args.disk_mib, r)
                b, s, _, inc_name = backup_once(ch, uuid, chain, checkpoint, full_name)
                inc_b.append(b)
                inc_s.append(s)
                # the chain restores to the guest's disk now (paused: nothing changes meanwhile)
                _done(ch, vms.PauseVm(vm.VmActionRequest(vm=uuid), timeout=60))
                backup_copy.restore_chain(str(chain / inc_name), str(chain / "restored.qcow2"))
                _run("qemu-img", "compare", "-q", "-U", str(chain / "restored.qcow2"), str(disk))
                _done(ch, vms.ResumeVm(vm.VmActionRequest(vm=uuid), timeout=60))
                print(f"round {r + 1}: full {full_b[-1] / MiB:.0f} MiB in {full_s[-1]:.2f} s, incremental "
                      f"{inc_b[-1] / MiB:.1f} MiB in {inc_s[-1]:.2f} s (restored chain identical)", flush=True)
                shutil.rmtree(chain, ignore_errors=True)
            stall_ms, idle_ms, move_s = stall_during_move(ch, con, log, uuid, 5.0)
            print(f"live storage migration of the {args.disk_mib} MiB disk: {move_s:.2f} s; longest gap in the guest's "
                  f"write loop {stall_ms:.0f} ms (without a move: {idle_ms:.0f} ms)", flush=True)
        _done(ch, vms.DeleteVm(vm.DeleteVmRequest(vm=uuid, force=True), timeout=120))
    med = statistics.median
    result = {
        "benchmark": "backup", "disk_mib": args.disk_mib, "change_pct": 1.0, "rounds": args.rounds,
        "full_bytes": int(med(full_b)), "incremental_bytes": int(med(inc_b)),
        "full_ms": round(med(full_s) * 1000, 1), "incremental_ms": round(med(inc_s) * 1000, 1),
        "bytes_ratio": round(med(inc_b) / med(full_b), 4), "time_ratio": round(med(inc_s) / med(full_s), 4),
        "full_ms_runs": [round(s * 1000) for s in full_s], "incremental_ms_runs": [round(s * 1000) for s in inc_s],
        "storage_migration_guest_stall_ms": round(stall_ms), "storage_migration_idle_gap_ms": round(idle_ms),
        "storage_migration_stall_ratio": round(stall_ms / idle_ms, 2) if idle_ms else None,
        "storage_migration_s": round(move_s, 2),
    }
    result["targets_met"] = result["bytes_ratio"] <= 0.03 and result["time_ratio"] <= 0.20
    shutil.rmtree(ds, ignore_errors=True)
    shutil.rmtree(ds2, ignore_errors=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
