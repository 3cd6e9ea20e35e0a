"""VM lifecycle end to end: the real daemon, over gRPC, booting the real test guest under TCG.

Each test starts ``cna-agent serve`` (embedded libvirt in its own state dir) and calls it as
the VRM would. "The VM runs" is observed on the guest's serial log (the agent logs the
serial console to <run_dir>/vms/<uuid>/serial.log), not assumed from libvirt's state.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
from google.protobuf import duration_pb2

from cna_agent.api import pb
from support.agent import start_agent
from support.guests import guest_spec, serial_log
from support.libvirt import live_vnc
from support.operations import ok, wait

vm = pb.vm_pb2
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the embedded QEMU driver here needs root")

def start_vm_agent(factory):
    return factory()


class EventStream:
    """A WatchEvents stream collected in a thread (so tests can wait for an event)."""

    def __init__(self, ch, **req) -> None:
        self.q: "queue.Queue" = queue.Queue()
        self.call = pb.events_pb2_grpc.EventServiceStub(ch).WatchEvents(pb.events_pb2.WatchEventsRequest(**req))
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            for ev in self.call:
                self.q.put(ev)
        except grpc.RpcError:
            pass

    def wait(self, pred, timeout: float = 60):
        deadline = time.monotonic() + timeout
        seen = []
        while time.monotonic() < deadline:
            try:
                ev = self.q.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                break
            seen.append(ev)
            if pred(ev):
                return ev
        raise AssertionError(f"event not seen within {timeout}s; saw {[(e.type, dict(e.attributes)) for e in seen]}")

    def close(self) -> None:
        self.call.cancel()


@pytest.mark.slow
def test_x86_64_guest_define_start_reboot_shutdown_delete(vm_agent_factory, system_mode) -> None:
    # Under libvirtd only (production); the embedded driver's lifecycle is the Debian guest's
    # (tests/e2e/test_guest_agent.py) and every embedded test's own.
    libvirt_mode = system_mode
    agent = vm_agent_factory(mode=libvirt_mode)
    with agent.channel() as ch:
        stub = pb.vm_pb2_grpc.VmServiceStub(ch)
        op = ok(ch, stub.CreateVm(vm.CreateVmRequest(request_id="create-x86", spec=guest_spec("x86_64", "guest-x86")), timeout=60))
        created = vm.Vm()
        op.response.Unpack(created)
        uuid = created.uuid
        assert created.managed and created.status.state == vm.VM_STATE_STOPPED
        # the same request id returns the first operation, not a second VM
        again = stub.CreateVm(vm.CreateVmRequest(request_id="create-x86", spec=guest_spec("x86_64", "guest-x86")), timeout=60)
        assert again.id == op.id

        events = EventStream(ch, from_now=True, resource_id=uuid)
        ok(ch, stub.StartVm(vm.VmActionRequest(vm="guest-x86"), timeout=60))
        log = serial_log(agent, uuid)
        log.wait_for(r"CNA-GUEST-READY boot=", timeout=120)
        events.wait(lambda e: e.type == "vm.lifecycle" and e.attributes["state"] == "running")
        got = stub.GetVm(vm.GetVmRequest(vm=uuid), timeout=10)
        assert got.status.state == vm.VM_STATE_RUNNING and got.status.qemu_pid.isdigit()
        assert got.spec.boot.kernel.endswith("vmlinuz") and got.spec.uuid == uuid
        # GetConsole hands out a ticket: a fresh 8-character VNC password with an expiry, set on
        # the live graphics device (libvirt's own XML says so), audited without the secret;
        # GetVm shows no password at all
        t0 = time.time()
        console = stub.GetConsole(vm.GetConsoleRequest(vm="guest-x86", ticket_validity_s=120), timeout=10)
        assert console.type == vm.CONSOLE_TYPE_VNC and console.host == "127.0.0.1" and console.port >= 5900
        assert len(console.password) == 8 and console.password != "pw123"
        assert t0 + 115 <= console.password_expire_time.seconds <= time.time() + 121
        again = stub.GetConsole(vm.GetConsoleRequest(vm="guest-x86"), timeout=10)
        assert again.password != console.password and again.password_expire_time.seconds <= time.time() + 61
        graphics = live_vnc(agent, libvirt_mode, "guest-x86")
        assert graphics.get("passwd") == again.password
        assert graphics.get("passwdValidTo") == time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(again.password_expire_time.seconds))
        assert not stub.GetVm(vm.GetVmRequest(vm=uuid), timeout=10).status.console.password
        issued = pb.events_pb2_grpc.EventServiceStub(ch).ListEvents(
            pb.events_pb2.ListEventsRequest(types=["console.ticket_issued"], resource_id=uuid), timeout=10).events
        assert len(issued) == 2 and all(console.password not in str(e) and again.password not in str(e) for e in issued)
        assert again.password not in agent.log_text()
        listed = stub.ListVms(vm.ListVmsRequest(states=[vm.VM_STATE_RUNNING]), timeout=10)
        assert [v.name for v in listed.vms] == ["guest-x86"]
        # The listing's RSS is QEMU's own, as the kernel counts it (the listing reads /proc,
        # not libvirt's monitor-bound balloon group).
        with open(f"/proc/{got.status.qemu_pid}/statm") as fh:
            rss_kib = int(fh.read().split()[1]) * (os.sysconf("SC_PAGE_SIZE") // 1024)
        assert 0.8 * rss_kib <= listed.vms[0].status.memory_rss_kib <= 1.2 * rss_kib, (listed.vms[0].status.memory_rss_kib, rss_kib)
        assert not stub.ListVms(vm.ListVmsRequest(states=[vm.VM_STATE_PAUSED]), timeout=10).vms

        # pause / resume
        ok(ch, stub.PauseVm(vm.VmActionRequest(vm=uuid), timeout=30))
        assert stub.GetVm(vm.GetVmRequest(vm=uuid), timeout=10).status.state == vm.VM_STATE_PAUSED
        ok(ch, stub.ResumeVm(vm.VmActionRequest(vm=uuid), timeout=30))

        # soft reboot (ACPI): the guest comes back and prints its marker again
        ok(ch, stub.RebootVm(vm.RebootVmRequest(vm=uuid), timeout=30))
        log.wait_for(r"CNA-GUEST-READY boot=", count=2, timeout=120)
        events.wait(lambda e: e.type == "vm.reboot" or (e.type == "vm.lifecycle" and e.attributes["event"] == "started"), timeout=60)
        # hard reboot (reset)
        ok(ch, stub.RebootVm(vm.RebootVmRequest(vm=uuid, hard=True), timeout=30))
        log.wait_for(r"CNA-GUEST-READY boot=", count=3, timeout=120)

        # a running VM cannot be deleted without force
        op = wait(ch, stub.DeleteVm(vm.DeleteVmRequest(vm=uuid), timeout=30))
        assert op.error.code == grpc.StatusCode.FAILED_PRECONDITION.value[0]

        # graceful shutdown: the guest sees the power button
        op = ok(ch, stub.ShutdownVm(vm.ShutdownVmRequest(vm=uuid, timeout=duration_pb2.Duration(seconds=90)), timeout=30))
        done = vm.Vm()
        op.response.Unpack(done)
        assert done.status.state == vm.VM_STATE_STOPPED and done.status.state_reason == "shutdown"
        log.wait_for(r"CNA-GUEST-POWEROFF", timeout=5)
        events.wait(lambda e: e.type == "vm.lifecycle" and e.attributes["state"] == "stopped")

        ok(ch, stub.DeleteVm(vm.DeleteVmRequest(vm=uuid), timeout=30))
        with pytest.raises(grpc.RpcError) as err:
            stub.GetVm(vm.GetVmRequest(vm=uuid), timeout=10)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        events.close()


@pytest.mark.slow
def test_killed_qemu_gives_a_crashed_event_on_the_stream(vm_agent_factory) -> None:
    agent = start_vm_agent(vm_agent_factory)
    with agent.channel() as ch:
        stub = pb.vm_pb2_grpc.VmServiceStub(ch)
        op = ok(ch, stub.CreateVm(vm.CreateVmRequest(spec=guest_spec("x86_64", "victim"), start=True), timeout=60))
        created = vm.Vm()
        op.response.Unpack(created)
        serial_log(agent, created.uuid).wait_for(r"CNA-GUEST-READY", timeout=120)
        pid = int(stub.GetVm(vm.GetVmRequest(vm="victim"), timeout=10).status.qemu_pid)
        assert created.uuid in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        events = EventStream(ch, from_now=True, types=["vm.lifecycle"], resource_id=created.uuid)
        time.sleep(0.5)  # the stream is registered before the kill
        os.kill(pid, signal.SIGKILL)
        ev = events.wait(lambda e: e.attributes["state"] in ("crashed", "stopped"), timeout=60)
        assert ev.resource_kind == "vm" and ev.resource_name == "victim" and ev.sequence > 0
        assert ev.attributes["state"] == "crashed"
        # resumable without loss: replaying from before the kill yields the same event
        replay = pb.events_pb2_grpc.EventServiceStub(ch).ListEvents(
            pb.events_pb2.ListEventsRequest(after_sequence=ev.sequence - 1, limit=1), timeout=10)
        assert replay.events[0].sequence == ev.sequence and replay.events[0].type == "vm.lifecycle"
        assert stub.GetVm(vm.GetVmRequest(vm="victim"), timeout=10).status.state == vm.VM_STATE_CRASHED
        events.close()


BAD_SPECS = [
    ("unknown enum", {"os_family": 99}, "spec.os_family"),
    ("zero memory", {"memory_mib": 0}, "spec.memory_mib"),
    ("10,000 vCPUs", {"vcpus": 10_000}, "spec.vcpus"),
    ("name with /", {"name": "a/b"}, "spec.name"),
    ("name with <", {"name": "a<b"}, "spec.name"),
    ("kernel outside the image dirs", {"boot": vm.BootSpec(kernel="/etc/passwd")}, "spec.boot.kernel"),
    ("disk outside the image dirs", {"disks": [vm.DiskSpec(volume="/etc/shadow")]}, "spec.disks[0].volume"),
]


def test_bad_specs_are_invalid_argument_naming_the_field_and_define_nothing(vm_agent_factory) -> None:
    agent = start_vm_agent(vm_agent_factory)
    with agent.channel() as ch:
        stub = pb.vm_pb2_grpc.VmServiceStub(ch)
        for what, changes, field in BAD_SPECS:
            spec = vm.VmSpec(name="bad", vcpus=1, memory_mib=128)
            for k, v in changes.items():
                if k == "disks":
                    spec.disks.extend(v)
                elif isinstance(v, (int, str)):
                    setattr(spec, k, v)
                else:
                    getattr(spec, k).CopyFrom(v)
            with pytest.raises(grpc.RpcError) as err:
                stub.CreateVm(vm.CreateVmRequest(spec=spec), timeout=30)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, what
            assert field in err.value.details(), (what, err.value.details())
        assert not stub.ListVms(vm.ListVmsRequest(include_unmanaged=True), timeout=10).vms


def _wait_until(fn, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = fn()
        if got:
            return got
        time.sleep(0.2)
    raise AssertionError("condition not met")


@pytest.mark.slow
def test_aarch64_guest_taishan_layout_boot_reboot_shutdown_delete(vm_agent_factory) -> None:
    """aarch64 under TCG on an emulated TaiShan-like layout: machine virt, GICv3, 2 NUMA nodes,
    direct kernel boot (no firmware asked for)."""
    agent = start_vm_agent(vm_agent_factory)
    with agent.channel() as ch:
        stub = pb.vm_pb2_grpc.VmServiceStub(ch)
        spec = guest_spec("aarch64", "guest-arm", vcpus=2, memory_mib=256, numa_cells=2)
        op = ok(ch, stub.CreateVm(vm.CreateVmRequest(spec=spec, start=True), timeout=60))
        created = vm.Vm()
        op.response.Unpack(created)
        uuid = created.uuid
        log = serial_log(agent, uuid)
        log.wait_for(r"CNA-GUEST-READY boot=", timeout=180)
        facts = {k: v for k, v in (l.split(" ", 1)[1].split("=", 1) for l in log.text().splitlines() if l.startswith("CNA-FACT "))}
        assert facts["arch"] == "aarch64" and facts["numa_nodes"] == "2" and facts["cpus"] == "2"
        conf = (agent.dir / "state" / "libvirt" / "etc" / "qemu" / "guest-arm.xml").read_text()
        assert "<gic version='3'/>" in conf and "cortex-a57" in conf and "machine='virt" in conf
        ok(ch, stub.RebootVm(vm.RebootVmRequest(vm=uuid), timeout=30))
        log.wait_for(r"CNA-GUEST-READY boot=", count=2, timeout=180)
        op = ok(ch, stub.ShutdownVm(vm.ShutdownVmRequest(vm=uuid, timeout=duration_pb2.Duration(seconds=120)), timeout=30))
        done = vm.Vm()
        op.response.Unpack(done)
        assert done.status.state == vm.VM_STATE_STOPPED
        ok(ch, stub.DeleteVm(vm.DeleteVmRequest(vm=uuid), timeout=30))
        assert not stub.ListVms(vm.ListVmsRequest(include_unmanaged=True), timeout=10).vms


def test_windows_spec_is_accepted_by_libvirt_with_the_hosts_enlightenments_and_updates_while_stopped(vm_agent_factory) -> None:
    """This host runs TCG: the definition has the Hyper-V hints QEMU takes without KVM and not
    the rest (the full set under KVM is tests/unit/test_hyperv_render.py's; the boot is
    test_vm_production.py's)."""
    agent = start_vm_agent(vm_agent_factory)
    with agent.channel() as ch:
        stub = pb.vm_pb2_grpc.VmServiceStub(ch)
        spec = vm.VmSpec(name="win", vcpus=2, memory_mib=512, os_family=vm.OS_FAMILY_WINDOWS, arch=pb.common_pb2.ARCH_X86_64,
                         firmware=vm.FIRMWARE_UEFI, panic_device=True, console=vm.ConsoleSpec(password="12345678"))
        op = ok(ch, stub.CreateVm(vm.CreateVmRequest(spec=spec), timeout=60))
        created = vm.Vm()
        op.response.Unpack(created)
        conf = (agent.dir / "state" / "libvirt" / "etc" / "qemu" / "win.xml").read_text()
        assert "<spinlocks state='on' retries='8191'/>" in conf
        for feature in ("vapic", "vpindex", "runtime", "synic", "stimer", "reset", "frequencies", "tlbflush"):
            assert f"<{feature} " not in conf, feature
        assert "<clock offset='localtime'>" in conf and "hypervclock" not in conf and "<panic model='isa'/>" in conf
        assert any(line.startswith("hyperv: ") for line in created.status.host_limitations), created.status
        assert "firmware='efi'" in conf and str(agent.dir / "state" / "nvram") in conf
        # a second create with the same name is refused, nothing changes
        op = wait(ch, stub.CreateVm(vm.CreateVmRequest(spec=spec), timeout=60))
        assert op.error.code == grpc.StatusCode.ALREADY_EXISTS.value[0] and "spec.name" in [f.field for f in op.error.field_violations]
        # update CPU/memory/QoS of the stopped VM: redefined
        new = vm.VmSpec(vcpus=4, memory_mib=1024, cpu_qos=vm.CpuQos(shares=512))
        op = ok(ch, stub.UpdateVm(vm.UpdateVmRequest(vm="win", spec=new, update_mask=["vcpus", "memory_mib", "cpu_qos"]), timeout=30))
        got = stub.GetVm(vm.GetVmRequest(vm="win"), timeout=10)
        assert (got.spec.vcpus, got.spec.memory_mib, got.spec.cpu_qos.shares) == (4, 1024, 512)
        conf = (agent.dir / "state" / "libvirt" / "etc" / "qemu" / "win.xml").read_text()
        assert "<vcpu placement='static'>4</vcpu>" in conf and "<shares>512</shares>" in conf
        with pytest.raises(grpc.RpcError) as err:
            stub.UpdateVm(vm.UpdateVmRequest(vm="win", spec=vm.VmSpec(name="x"), update_mask=["name"]), timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "update_mask" in err.value.details()
        ok(ch, stub.DeleteVm(vm.DeleteVmRequest(vm="win"), timeout=30))


def test_busy_vm_fails_fast_or_waits_and_restart_adopts_without_touching(vm_agent_factory) -> None:
    """Per-VM serialisation: a second lifecycle call on a busy VM gets FAILED_PRECONDITION at
    once (lock_timeout 0) or waits (lock_timeout). An agent restart adopts the VM as it is."""
    agent = start_vm_agent(vm_agent_factory)
    with agent.channel() as ch:
        stub = pb.vm_pb2_grpc.VmServiceStub(ch)
        # a VM with no OS ignores the ACPI power button: the shutdown holds the VM's lock for
        # its whole timeout, then powers off (force)
        spec = vm.VmSpec(name="busy", vcpus=1, memory_mib=64, console=vm.ConsoleSpec(type=vm.CONSOLE_TYPE_NONE))
        ok(ch, stub.CreateVm(vm.CreateVmRequest(spec=spec, start=True), timeout=60))
        slow = stub.ShutdownVm(vm.ShutdownVmRequest(vm="busy", timeout=duration_pb2.Duration(seconds=8), force=True), timeout=30)
        assert not slow.done
        with pytest.raises(grpc.RpcError) as err:
            stub.PauseVm(vm.VmActionRequest(vm="busy"), timeout=30)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and slow.id in err.value.details()
        waited = stub.StartVm(vm.VmActionRequest(vm="busy", lock_timeout=duration_pb2.Duration(seconds=120)), timeout=180)
        ok(ch, slow)
        ok(ch, waited)
        uuid = stub.GetVm(vm.GetVmRequest(vm="busy"), timeout=10).uuid
        pid = stub.GetVm(vm.GetVmRequest(vm="busy"), timeout=10).status.qemu_pid
    agent.stop()
    again = start_agent(agent.dir, None, config=agent.config)
    try:
        with again.channel() as ch:
            got = pb.vm_pb2_grpc.VmServiceStub(ch).GetVm(vm.GetVmRequest(vm=uuid), timeout=10)
            assert got.managed and got.status.state == vm.VM_STATE_RUNNING and got.status.qemu_pid == pid
    finally:
        again.stop()


def _ctl(agent, *args: str) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("cna-ctl")
    return subprocess.run([str(exe), "--socket", str(agent.socket), *args], capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_cna_ctl_vm_define_from_yaml_list_show_lifecycle_delete(vm_agent_factory, tmp_path: Path) -> None:
    agent = start_vm_agent(vm_agent_factory)
    spec = tmp_path / "vm.yaml"
    spec.write_text("name: cli-vm\nvcpus: 1\nmemory_mib: 64\nos_family: linux\nfirmware: bios\nconsole:\n  type: none\n")
    out = _ctl(agent, "vm", "define", str(spec), "--start")
    assert out.returncode == 0, out.stderr
    assert "cli-vm is running" in out.stdout
    listed = json.loads(_ctl(agent, "--json", "vm", "list").stdout)
    assert [(x["name"], x["status"]["state"]) for x in listed["vms"]] == [("cli-vm", "VM_STATE_RUNNING")]
    show = _ctl(agent, "vm", "show", "cli-vm")
    assert show.returncode == 0 and "running" in show.stdout and "64 MiB" in show.stdout
    assert _ctl(agent, "vm", "pause", "cli-vm").returncode == 0
    assert "paused" in _ctl(agent, "vm", "list").stdout
    assert _ctl(agent, "vm", "resume", "cli-vm").returncode == 0
    assert _ctl(agent, "vm", "stop", "cli-vm", "--hard").returncode == 0
    assert "stopped" in _ctl(agent, "vm", "list").stdout
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"name": "x<y", "vcpus": 1, "memory_mib": 64}))
    out = _ctl(agent, "vm", "define", str(bad))
    assert out.returncode == 1 and "spec.name" in out.stderr
    assert _ctl(agent, "vm", "delete", "cli-vm").returncode == 0
    assert _ctl(agent, "vm", "list").stdout.strip() == "no VMs"
    assert _ctl(agent, "vm", "show", "cli-vm").returncode == 1
