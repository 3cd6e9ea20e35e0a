"""cna-ctl's progress line and the summaries of migrate and maintenance, from Operation messages
as the agent sends them (no agent needed; the e2e maintenance test runs the real cna-ctl)."""

from __future__ import annotations

import io
from types import SimpleNamespace

from google.protobuf import any_pb2

from cna_agent.api import pb
from cna_agent.cli.maintenance import report_table
from cna_agent.cli.progress import ProgressLine, fmt_duration, follow
from cna_agent.cli.vm_migrate import migrate_summary

ops_pb, h, v = pb.operations_pb2, pb.host_pb2, pb.vm_pb2
MiB = 1 << 20


def _op(percent: int, stage: str = "", done: int = 0, total: int = 0, *, finished: bool = False, t: float = 0.0):
    o = ops_pb.Operation(id="op-1", kind="vm.migrate", done=finished,
                         state=ops_pb.OPERATION_STATE_SUCCEEDED if finished else ops_pb.OPERATION_STATE_RUNNING,
                         progress=ops_pb.OperationProgress(percent=percent, stage=stage, bytes_done=done, bytes_total=total))
    o.create_time.FromSeconds(1000)
    o.update_time.FromNanoseconds(int((1000 + t) * 1e9))
    if finished:
        o.end_time.FromNanoseconds(int((1000 + t) * 1e9))
    return o


def test_bar_shows_percent_bytes_rate_and_time_left() -> None:
    now = [0.0]
    line = ProgressLine(clock=lambda: now[0])
    first = line.render(10, "migrating", 10 * MiB, 256 * MiB)
    assert first.startswith("[##" + "." * 22 + "]  10%") and "10.0 MiB/256.0 MiB" in first and "/s" not in first
    now[0] = 2.0
    second = line.render(50, "migrating", 110 * MiB, 256 * MiB)
    assert "50.0 MiB/s" in second and "~3s left" in second and second.endswith("migrating")
    assert line.render(150, "") .startswith("[" + "#" * 24 + "] 100%")
    assert line.render(-1, "preparing").startswith("[" + "." * 24 + "]   0% preparing")
    assert (fmt_duration(59), fmt_duration(61), fmt_duration(7322)) == ("59s", "1m01s", "2h02m")


def test_follow_prints_steps_when_not_a_tty_and_returns_the_last_operation() -> None:
    stream = [_op(5, "preparing the destination"), _op(40, "migrating", 100 * MiB, 256 * MiB),
              _op(45, "migrating", 120 * MiB, 256 * MiB), _op(100, "migrating", 256 * MiB, 256 * MiB, finished=True, t=3.2)]
    client = SimpleNamespace(ops=SimpleNamespace(WatchOperation=lambda req: iter(stream)), socket_path="/x")
    out = io.StringIO()
    last = follow(client, _op(0), out=out, tty=False)
    lines = out.getvalue().splitlines()
    assert last.done and last.progress.percent == 100
    assert len(lines) == 3 and "preparing the destination" in lines[0] and lines[-1].startswith("[" + "#" * 24 + "] 100%")
    quick = io.StringIO()
    assert follow(client, stream[-1], out=quick, tty=False) is stream[-1]  # already done: one line, no watch
    assert quick.getvalue().count("\n") == 1 and "100%" in quick.getvalue()
    tty = io.StringIO()
    follow(client, _op(0), out=tty, tty=True)
    assert tty.getvalue().count("\r") == 4 and tty.getvalue().endswith("\n")


def test_migrate_summary_says_where_how_long_and_how_much() -> None:
    op = _op(100, "", 256 * MiB, 256 * MiB, finished=True, t=3.24)
    vm = v.Vm(name="web1", status=v.VmStatus(state=v.VM_STATE_RUNNING))
    packed = any_pb2.Any()
    packed.Pack(vm)
    op.response.CopyFrom(packed)
    assert migrate_summary("web1", "10.0.0.2:7001", op) == "web1 moved to 10.0.0.2:7001 in 3.2 s, 256.0 MiB of memory; running there"
    failed = _op(30, "", finished=True, t=1.0)
    failed.error.message = "destination 10.0.0.2:7001: no free hugepages"
    assert migrate_summary("web1", "10.0.0.2:7001", failed).startswith("web1 did not move to 10.0.0.2:7001 in 1.0 s: destination")


def test_report_table_lists_each_vm_and_the_totals() -> None:
    r = h.EvacuationReport(operation_id="e1", moved=1, not_moved=1, vms=[
        h.EvacuatedVm(vm_name="a", state="running", outcome=h.EVACUATION_OUTCOME_MOVED, destination="b:1", duration_ms=3100),
        h.EvacuatedVm(vm_name="c", state="stopped", outcome=h.EVACUATION_OUTCOME_NOT_MOVED, destination="b:1",
                      error="vm 'c' is not running")])
    text = report_table(r).splitlines()
    assert text[0].split() == ["VM", "STATE", "OUTCOME", "DESTINATION", "TOOK", "WHY"]
    assert text[2].split() == ["a", "running", "moved", "b:1", "3.1s"]
    assert text[3].split()[:5] == ["c", "stopped", "not", "moved", "b:1"] and "not running" in text[3]
    assert text[-1] == "1 moved, 1 not moved"
