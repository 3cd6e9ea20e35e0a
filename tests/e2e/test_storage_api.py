"""StorageService through the real daemon over gRPC, and cna-ctl volume/datastore against it.

The agent runs as a process with two directory datastores; volumes are made by the real
qemu-img. Hostile requests must fail with INVALID_ARGUMENT naming the field and leave no file.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from cna_agent.api import pb
from support.operations import check_ok, history, ok, wait
from support.procs import qemu_img_converting

S = pb.storage_pb2
MiB = 1024**2


def _files(root: Path) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs if not f.startswith(".cna-probe"))


@pytest.fixture()
def stor(agent_factory, tmp_path):
    ds, imp = tmp_path / "ds", tmp_path / "imp"
    ds.mkdir()
    imp.mkdir()
    extra = (f'[storage]\nprobe_interval_s = 1.0\n[storage.datastores.ds]\ntype = "dir"\npath = "{ds}"\n'
             f'[storage.datastores.imp]\ntype = "dir"\npath = "{imp}"\n')
    agent = agent_factory(extra_config=extra, tcp=False)
    ch = agent.channel()
    yield agent, S and pb.storage_pb2_grpc.StorageServiceStub(ch), pb.operations_pb2_grpc.OperationsServiceStub(ch), ds, imp
    ch.close()


def test_datastores_volumes_and_clones_over_grpc(stor):
    agent, st, ops, ds, imp = stor
    listed = {d.name: d for d in st.ListDatastores(S.ListDatastoresRequest(), timeout=10).datastores}
    assert listed["ds"].type == S.DATASTORE_TYPE_LOCAL_DIR
    assert listed["ds"].health == pb.common_pb2.HEALTH_OK and listed["ds"].capacity_bytes > 0
    assert listed["ds"].location == str(ds)

    op = st.CreateVolume(S.CreateVolumeRequest(request_id="c1", datastore="ds", path="tpl/base.qcow2",
                                               format=S.VOLUME_FORMAT_QCOW2, size_bytes=32 * MiB), timeout=30)
    base = ok(ops, op, 120, into=S.Volume())
    assert base.id == "ds/tpl/base.qcow2" and base.virtual_size_bytes == 32 * MiB
    # the same request id returns the same operation, nothing is created twice
    again = st.CreateVolume(S.CreateVolumeRequest(request_id="c1", datastore="ds", path="tpl/base.qcow2",
                                                  format=S.VOLUME_FORMAT_QCOW2, size_bytes=32 * MiB), timeout=30)
    assert again.id == op.id

    clone = ok(ops, st.CloneVolume(S.CloneVolumeRequest(source=base.id, datastore="ds", path="vm1/root.qcow2",
                                                        linked=True), timeout=30), 120, into=S.Volume())
    assert clone.backing_volume == base.id
    assert st.GetVolume(S.GetVolumeRequest(id=base.id), timeout=10).template
    copy = ok(ops, st.CloneVolume(S.CloneVolumeRequest(source=base.id, datastore="ds", path="vm2/root.raw",
                                                       format=S.VOLUME_FORMAT_RAW), timeout=30), 120, into=S.Volume())
    assert copy.format == S.VOLUME_FORMAT_RAW and not copy.backing_volume

    grown = ok(ops, st.ResizeVolume(S.ResizeVolumeRequest(id=copy.id, new_size_bytes=64 * MiB), timeout=30), 120, into=S.Volume())
    assert grown.virtual_size_bytes == 64 * MiB
    shrink = wait(ops, st.ResizeVolume(S.ResizeVolumeRequest(id=copy.id, new_size_bytes=16 * MiB), timeout=30), 120)
    assert shrink.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert shrink.error.field_violations[0].field == "new_size_bytes"

    refused = wait(ops, st.DeleteVolume(S.DeleteVolumeRequest(id=base.id), timeout=30), 120)
    assert refused.error.code == grpc.StatusCode.FAILED_PRECONDITION.value[0] and "linked clone" in refused.error.message
    ids = {v.id for v in st.ListVolumes(S.ListVolumesRequest(datastore="ds"), timeout=10).volumes}
    assert ids == {"ds/tpl/base.qcow2", "ds/vm1/root.qcow2", "ds/vm2/root.raw"}


@pytest.mark.parametrize("req, field", [
    (S.CreateVolumeRequest(datastore="ds", path="../imp/x.qcow2", format=S.VOLUME_FORMAT_QCOW2, size_bytes=MiB), "path"),
    (S.CreateVolumeRequest(datastore="ds", path="/etc/x.qcow2", format=S.VOLUME_FORMAT_QCOW2, size_bytes=MiB), "path"),
    (S.CreateVolumeRequest(datastore="ds", path="x.qcow2", format=S.VOLUME_FORMAT_QCOW2, size_bytes=0), "size_bytes"),
    (S.CreateVolumeRequest(datastore="ds", path="x.qcow2", format=S.VOLUME_FORMAT_QCOW2, size_bytes=1024**6), "size_bytes"),
    (S.CreateVolumeRequest(datastore="ds", path="x.qcow2", format=99, size_bytes=MiB), "format"),
    (S.CreateVolumeRequest(datastore="ds", path="x.vmdk", format=S.VOLUME_FORMAT_VMDK, size_bytes=MiB), "format"),
])
def test_hostile_requests_are_refused_naming_the_field(stor, req, field):
    agent, st, ops, ds, imp = stor
    with pytest.raises(grpc.RpcError) as exc:
        st.CreateVolume(req, timeout=10)
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert exc.value.details().startswith(field + ":"), exc.value.details()
    assert _files(ds) == [] and _files(imp) == []


def test_vmdk_import_with_progress_and_corrupt_qcow2_refused(stor):
    agent, st, ops, ds, imp = stor
    raw = imp / "seed.raw"
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(raw), "48M"], check=True, timeout=30)
    subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0x42 0 40M", str(raw)], check=True, timeout=60, capture_output=True)
    subprocess.run(["qemu-img", "convert", "-O", "vmdk", "-f", "raw", str(raw), str(imp / "disk.vmdk")], check=True, timeout=60)
    op = st.ImportVolume(S.ImportVolumeRequest(source="imp/disk.vmdk", datastore="ds", path="imported.qcow2"), timeout=30)
    updates = history(ops, op, 120)
    v = check_ok(updates[-1], into=S.Volume())
    assert v.format == S.VOLUME_FORMAT_QCOW2 and v.virtual_size_bytes == 48 * MiB
    assert v.check.supported and v.check.summary == "no errors"
    assert updates[-1].progress.percent == 100

    bad = imp / "bad.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(bad), "4M"], check=True, timeout=30)
    data = bytearray(bad.read_bytes())
    data[0x30:0x38] = (0x7FFFFFFF00000).to_bytes(8, "big")
    bad.write_bytes(bytes(data))
    failed = wait(ops, st.ImportVolume(S.ImportVolumeRequest(source="imp/bad.qcow2", datastore="ds", path="bad.qcow2"), timeout=30), 120)
    assert failed.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert failed.error.field_violations[0].field == "source"
    assert _files(ds) == ["imported.qcow2"]


def test_cna_ctl_volume_and_datastore(stor):
    agent, st, ops, ds, imp = stor
    ctl = [sys.executable, "-m", "cna_agent.cli.main", "--socket", str(agent.socket)]
    p = subprocess.run([*ctl, "volume", "create", "ds/a.qcow2", "--size", "16M"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert "ds/a.qcow2" in p.stdout and "16.0 MiB" in p.stdout
    p = subprocess.run([*ctl, "--json", "volume", "clone", "ds/a.qcow2", "ds/b.qcow2"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.strip().splitlines()
    progress = [json.loads(line) for line in lines if line.startswith('{"operation"')]
    assert progress and progress[-1]["percent"] == 100
    p = subprocess.run([*ctl, "volume", "create", "ds/../x.qcow2", "--size", "1M"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 1 and "INVALID_ARGUMENT: path:" in p.stderr
    p = subprocess.run([*ctl, "datastore", "list"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and "ds" in p.stdout and " ok " in p.stdout, p.stdout


def test_a_cancelled_import_kills_qemu_img_and_leaves_no_file(stor):
    """CancelOperation (through cna-ctl ops cancel) on an import whose qemu-img is stuck (SIGSTOP,
    as on storage that stopped answering): the process is gone from /proc, no temporary or
    final file is left in the datastore, the operation ends CANCELLED, and the same volume can
    be imported at once (its lock was released only after the work ended)."""
    agent, st, ops, ds, imp = stor
    chunk = os.urandom(MiB)
    with open(imp / "big.raw", "wb") as fh:  # non-zero data: qemu-img really copies it
        for _ in range(384):
            fh.write(chunk)
    # the agent answers a quick operation only once it is done (or after 5 s): watch meanwhile
    call = st.ImportVolume.future(S.ImportVolumeRequest(request_id="imp-cancel", source="imp/big.raw", datastore="ds",
                                                        path="vm/root.qcow2"), timeout=30)
    deadline = time.monotonic() + 60
    while not (pids := qemu_img_converting(ds)):
        assert not call.done() and time.monotonic() < deadline, f"qemu-img convert never seen running: {call.result()}"
        time.sleep(0.002)
    try:
        _stop_once_writing(pids, ds)
        _cancel_and_check(agent, st, ops, ds, call.result(), pids)
    finally:
        for pid in qemu_img_converting(ds):  # a stopped qemu-img a failed run left behind
            os.kill(pid, signal.SIGKILL)


def _stop_once_writing(pids: list[int], ds: Path, timeout: float = 30) -> None:
    """SIGSTOP qemu-img, letting it run in short steps until its temporary target exists (it
    may be caught before it created it)."""
    deadline = time.monotonic() + timeout
    while True:
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        if any(".cna-tmp-" in f for f in _all_files(ds)):
            return
        assert time.monotonic() < deadline, f"qemu-img made no temporary file: {_all_files(ds)}"
        for pid in pids:
            os.kill(pid, signal.SIGCONT)
        time.sleep(0.01)


def _cancel_and_check(agent, st, ops, ds: Path, op, pids: list[int]) -> None:
    assert not op.done, op
    assert any(".cna-tmp-" in f for f in _all_files(ds)), _all_files(ds)  # mid-copy, under a temporary name

    out = subprocess.run([sys.executable, "-m", "cna_agent.cli.main", "--socket", str(agent.socket), "ops", "cancel", op.id],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    done = wait(ops, op, 60)
    assert done.state == pb.operations_pb2.OPERATION_STATE_CANCELLED and done.error.code == grpc.StatusCode.CANCELLED.value[0]
    assert all(not Path(f"/proc/{pid}").exists() for pid in pids)
    assert _all_files(ds) == []
    with pytest.raises(grpc.RpcError) as gone:
        st.GetVolume(S.GetVolumeRequest(id="ds/vm/root.qcow2"), timeout=10)
    assert gone.value.code() == grpc.StatusCode.NOT_FOUND
    # a cancel of what has ended is refused, naming its state
    again = subprocess.run([sys.executable, "-m", "cna_agent.cli.main", "--socket", str(agent.socket), "ops", "cancel", op.id],
                           capture_output=True, text=True, timeout=60)
    assert again.returncode == 1 and "already cancelled" in again.stderr, again

    v = ok(ops, st.ImportVolume(S.ImportVolumeRequest(request_id="imp-again", source="imp/big.raw", datastore="ds",
                                                      path="vm/root.qcow2"), timeout=30), 180, into=S.Volume())
    assert v.virtual_size_bytes == 384 * MiB and _all_files(ds) == ["vm/root.qcow2"]


def _all_files(root: Path) -> list[str]:
    """Every file under ``root``, dot-files (the agent's temporary names) included."""
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs
                  if not f.startswith(".cna-probe"))


def test_volume_operations_cut_short_by_a_kill_are_decided_from_the_datastore(agent_factory, tmp_path):
    """SIGKILL of the agent (1) mid-import, with qemu-img stopped, and (2) right after a created
    volume was put in place (crash point volume.placed): after each restart the operation is
    closed from what the datastore holds, ABORTED with no file left, or SUCCEEDED with the
    volume, and nothing is redone."""
    from support.migration import restart

    ds, imp = tmp_path / "ds", tmp_path / "imp"
    ds.mkdir()
    imp.mkdir()
    extra = (f'[storage.datastores.ds]\ntype = "dir"\npath = "{ds}"\n'
             f'[storage.datastores.imp]\ntype = "dir"\npath = "{imp}"\n')
    agent = agent_factory("kv", extra_config=extra, tcp=False)
    chunk = os.urandom(MiB)
    with open(imp / "big.raw", "wb") as fh:
        for _ in range(384):
            fh.write(chunk)
    with agent.channel() as ch:
        call = S and pb.storage_pb2_grpc.StorageServiceStub(ch).ImportVolume.future(
            S.ImportVolumeRequest(request_id="kill-imp", source="imp/big.raw", datastore="ds", path="k/root.qcow2"), timeout=30)
        deadline = time.monotonic() + 60
        while not (pids := qemu_img_converting(ds)):
            assert not call.done() and time.monotonic() < deadline, "qemu-img convert never seen running"
            time.sleep(0.002)
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        op_id = call.result().id
    agent = restart(agent)  # SIGKILL; the stopped qemu-img is left behind, as after a real crash
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    with agent.channel() as ch:
        ops = pb.operations_pb2_grpc.OperationsServiceStub(ch)
        done = ops.GetOperation(pb.operations_pb2.GetOperationRequest(id=op_id), timeout=10)
        assert done.state == pb.operations_pb2.OPERATION_STATE_FAILED and done.error.code == grpc.StatusCode.ABORTED.value[0]
        assert "was not created" in done.error.message and done.metadata["recovered"] == "true", done
        assert _all_files(ds) == []  # the start-up sweep removed the temporary file
    agent = restart(agent, env={"CNA_FAILPOINTS": "volume.placed"})
    with agent.channel() as ch:
        with pytest.raises(grpc.RpcError):  # the agent dies inside the call
            pb.storage_pb2_grpc.StorageServiceStub(ch).CreateVolume(S.CreateVolumeRequest(
                request_id="kill-new", datastore="ds", path="k/new.qcow2", format=S.VOLUME_FORMAT_QCOW2, size_bytes=8 * MiB),
                timeout=30)
    agent.proc.wait(timeout=30)
    assert _all_files(ds) == ["k/new.qcow2"]
    agent = restart(agent)
    with agent.channel() as ch:
        st = pb.storage_pb2_grpc.StorageServiceStub(ch)
        again = st.CreateVolume(S.CreateVolumeRequest(request_id="kill-new", datastore="ds", path="k/new.qcow2",
                                                      format=S.VOLUME_FORMAT_QCOW2, size_bytes=8 * MiB), timeout=30)
        assert again.done and again.metadata["recovered"] == "true", again  # the first operation, closed from the datastore
        v = S.Volume()
        again.response.Unpack(v)
        assert v.id == "ds/k/new.qcow2" and v.virtual_size_bytes == 8 * MiB
    agent.stop()
