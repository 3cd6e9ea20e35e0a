"""A fresh host under the system libvirtd: QEMU runs as its own unprivileged user and must reach
the side-channel socket directory the agent makes for it.

The agent's run directory here is too deep for a unix socket path, so sockets go to the
fallback root ([state] qmp_fallback_dir, /run/cna-qmp by default). Each test points that root at
a path that does not exist yet, as /run/cna-qmp does not on a machine that never ran the agent
(or after a reboot), and judges from outside the agent: the directory modes and owners on disk,
the QEMU process's uid in /proc, libvirt's domain state, and QEMU answering on the socket.
"""

from __future__ import annotations

import os
import pwd
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path
from typing import Iterator

import grpc
import pytest

from cna_agent.api import pb
from support.operations import ok, wait

vm = pb.vm_pb2
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root and the host's libvirtd")

SYSTEM = '[libvirt]\nuri = "qemu:///system"\n'


@pytest.fixture
def fresh_root() -> Iterator[Path]:
    """A fallback root that does not exist yet, under a short world-traversable directory."""
    top = Path(tempfile.mkdtemp(prefix="cnq-", dir="/tmp"))
    os.chmod(top, 0o755)
    yield top / "cna-qmp"
    shutil.rmtree(top, ignore_errors=True)


def _deep_agent(agent_factory, tmp_path: Path, name: str, fallback: Path):
    """An agent on qemu:///system whose run directory is too deep for socket paths under it."""
    run_dir = tmp_path / name / ("r" * 70) / "run"
    return agent_factory(name, tcp=False, extra_config=SYSTEM,
                         env={"CNA_AGENT_STATE_RUN_DIR": str(run_dir), "CNA_AGENT_STATE_QMP_FALLBACK_DIR": str(fallback)})


def _start(ch, name: str):
    stub = pb.vm_pb2_grpc.VmServiceStub(ch)
    # A BIOS guest with nothing to boot idles in SeaBIOS: enough for QEMU and its monitor.
    spec = vm.VmSpec(name=name, vcpus=1, memory_mib=64, arch=pb.common_pb2.ARCH_X86_64)
    op = stub.CreateVm(vm.CreateVmRequest(spec=spec, start=True), timeout=60)
    return stub, wait(ch, op, 90, poll=True)


def _qemu_uid(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise AssertionError(f"no Uid line for {pid}")


def _domstate(uuid: str) -> str:
    out = subprocess.run(["virsh", "-c", "qemu:///system", "domstate", uuid], capture_output=True, text=True, timeout=30)
    return out.stdout.strip()


def _started_and_reachable(ch, stub, op, fallback: Path) -> str:
    assert not op.HasField("error"), op.error
    created = vm.Vm()
    op.response.Unpack(created)
    uuid = created.uuid
    try:
        assert _domstate(uuid) == "running"
        qemu_user = pwd.getpwuid(_qemu_uid(int(stub.GetVm(vm.GetVmRequest(vm=uuid), timeout=10).status.qemu_pid))).pw_uid
        assert qemu_user != 0  # the point of the test: QEMU is not root
        diag = stub.GetVmDiagnostics(vm.GetVmDiagnosticsRequest(vm=uuid), timeout=30)
        assert diag.qemu_status == "running"  # QEMU answered on the agent's socket
        sock = Path(diag.side_channel_socket)
        assert sock.parent.parent == fallback
        st = os.lstat(fallback)
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, 0, 0o711)
        st = os.lstat(sock.parent)
        assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (qemu_user, 0o700)
        assert stat.S_ISSOCK(os.lstat(sock).st_mode) and os.lstat(sock).st_uid == qemu_user  # QEMU made it
        return uuid
    except BaseException:
        ok(ch, stub.DeleteVm(vm.DeleteVmRequest(vm=uuid, force=True), timeout=60), 60, poll=True)
        raise


@pytest.mark.slow
def test_a_fresh_host_starts_a_vm_whose_qemu_reaches_the_fallback_socket(system_libvirtd, agent_factory, tmp_path, fresh_root):
    assert not fresh_root.exists()
    agent = _deep_agent(agent_factory, tmp_path, "fresh", fresh_root)
    with agent.channel() as ch:
        stub, op = _start(ch, f"rundir-{os.getpid()}")
        uuid = _started_and_reachable(ch, stub, op, fresh_root)
        ok(ch, stub.DeleteVm(vm.DeleteVmRequest(vm=uuid, force=True), timeout=60), 60, poll=True)


@pytest.mark.slow
def test_directories_left_wrong_are_repaired(system_libvirtd, agent_factory, tmp_path, fresh_root):
    agent = _deep_agent(agent_factory, tmp_path, "repair", fresh_root)
    with agent.channel() as ch:
        stub, op = _start(ch, f"rundir-r-{os.getpid()}")
        uuid = _started_and_reachable(ch, stub, op, fresh_root)
        sock_dir = next(fresh_root.iterdir())
        ok(ch, stub.ShutdownVm(vm.ShutdownVmRequest(vm=uuid, hard=True), timeout=30), 60, poll=True)
        # As an earlier embedded-mode run or an admin's mkdir would leave them: root-only root,
        # a root-owned listable socket directory.
        os.chmod(fresh_root, 0o700)
        os.chown(sock_dir, 0, 0)
        os.chmod(sock_dir, 0o755)
        ok(ch, stub.StartVm(vm.VmActionRequest(vm=uuid), timeout=60), 90, poll=True)
        assert _started_and_reachable(ch, stub, op, fresh_root) == uuid
        ok(ch, stub.DeleteVm(vm.DeleteVmRequest(vm=uuid, force=True), timeout=60), 60, poll=True)


@pytest.mark.slow
def test_a_closed_directory_outside_the_agent_is_refused_by_name(system_libvirtd, agent_factory, tmp_path, fresh_root):
    closed = fresh_root.parent / "closed"
    closed.mkdir(mode=0o700)
    fallback = closed / "cna-qmp"
    agent = _deep_agent(agent_factory, tmp_path, "closed", fallback)
    with agent.channel() as ch:
        stub, op = _start(ch, f"rundir-c-{os.getpid()}")
        assert op.HasField("error")
        assert op.error.code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
        assert f"{closed} (mode 0700" in op.error.message, op.error.message
        assert not fallback.exists() and stat.S_IMODE(os.lstat(closed).st_mode) == 0o700
        listed = stub.ListVms(vm.ListVmsRequest(), timeout=10)
        assert [v.name for v in listed.vms if v.name.startswith("rundir-c-")] == []
