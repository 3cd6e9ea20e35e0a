"""The real Debian guest (tools/build-debian-guest.py: systemd, qemu-guest-agent, cloud-init)
through the real agent: first-boot customization from a NoCloud drive (hostname, static IP,
root's password hash, SSH keys, a sudo user; the drive removed once cloud-init reported done),
guest info and tools status from qemu-guest-agent, a guest agent that hangs or is stopped,
quiesced snapshots, a password set through the guest agent, and graceful shutdown through
systemd, asked by the ACPI power button or, when the guest ignores it, through the guest agent.

Two boots serve every check (a Debian boot under TCG is about 15 s). What the agent reports is
held against what the guest itself says on its serial console (``uname -r``, ``hostname``,
``qemu-ga --version``, qemu-ga's own journal lines for fsfreeze and thaw) and against the
hypervisor (the live domain's channel state, the snapshot's overlay file).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Iterator

import grpc
import pytest
from google.protobuf import duration_pb2

from cna_agent.api import pb

from support.agent import AgentProcess, delete_vms_and_stop, start_agent
from support.console import AgentConsole, SerialLog, login_root
from support.debian import TEMPLATE, image_datastore
from support.guests import build_debian_guest
from support.libvirt import domain_xml
from support.operations import ok, wait
from support.waiting import wait_for

vm, st, ev, ops_pb = pb.vm_pb2, pb.storage_pb2, pb.events_pb2, pb.operations_pb2
pytestmark = [pytest.mark.slow, pytest.mark.skipif(os.geteuid() != 0, reason="the embedded QEMU driver here needs root")]

MAC = "52:54:00:6a:11:01"
GUEST_IP = "192.0.2.61"
NEW_PASSWORD = "Gu3st-Pw:set by the agent"
#: First-boot customization: what the NoCloud seed asks for, checked inside the guest.
CUSTOM_HOSTNAME = "deb-custom"
CUSTOM_PASSWORD = "Cust0m-Pw:from the seed"
ROOT_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFtZ2c9dVJ8x3pQ6mR1kT7wY4uB0nL5sH2aE8fG6jC1D vrm@cna-test"
TPM_NV, TPM_SECRET = "0x1500016", "cna-tpm-state-1"
OPS_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIB7qM3nV8cX1zK4jH6gF2dS9aP0oI5uY7tR3eW1qL8mN ops@cna-test"


def _crypt(password: str) -> str:
    """A SHA-512 crypt(3) hash, made the way an admin would (openssl passwd -6)."""
    out = subprocess.run(["openssl", "passwd", "-6", "-stdin"], input=password + "\n", capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == 0 and out.stdout.startswith("$6$"), out.stderr
    return out.stdout.strip()


def _customization(root_hash: str) -> vm.GuestCustomization:
    return vm.GuestCustomization(
        hostname=f"{CUSTOM_HOSTNAME}.example.test", dns_servers=["192.0.2.53"], dns_search=["example.test"],
        users=[vm.GuestUser(name="root", password_hash=root_hash, ssh_authorized_keys=[ROOT_KEY]),
               vm.GuestUser(name="ops", ssh_authorized_keys=[OPS_KEY], sudo=True)],
        nics=[vm.GuestNicConfig(nic_index=0, addresses=[f"{GUEST_IP}/24"], gateway4="192.0.2.1")])


@pytest.fixture
def debian_env(libvirt_caps_cache) -> Iterator[tuple[AgentProcess, Path, dict, str]]:
    """An agent with a dir datastore holding a copy of the Debian image as a template, a Linux
    bridge port group for the guest's NIC, and a short guest-info interval (2 s)."""
    guest = build_debian_guest("x86_64")
    base = Path(tempfile.mkdtemp(prefix="ga", dir="/tmp"))
    ds = base / "ds"
    ds.mkdir(parents=True)
    bridge = f"gab{base.name[-5:].lower()}"
    extra = (f'[compute]\nimage_dirs = "{Path(guest["kernel"]).parent}"\nguest_info_min_interval_s = 2\n'
             f'shutdown_guest_agent_after_s = 4\n'
             f'[storage.datastores.ds]\ntype = "dir"\npath = "{ds}"\n' + image_datastore(guest) +
             f'[network]\nreconcile_interval_s = 0\n[network.bridges.{bridge}]\ntype = "linux"\n'
             f'[network.port_groups.gapg]\nbridge = "{bridge}"\n')
    agent = None
    try:
        agent = start_agent(base / "a", libvirt_caps_cache, tcp=False, extra_config=extra)
        # the network subsystem makes the bridge just after the agent is ready
        wait_for(lambda: Path(f"/sys/class/net/{bridge}").exists(), 60, f"bridge {bridge}")
        yield agent, ds, guest, "gapg"
    finally:
        delete_vms_and_stop(agent)
        subprocess.run(["ip", "link", "del", bridge], capture_output=True, timeout=30)
        shutil.rmtree(base, ignore_errors=True)


def _guest(console: AgentConsole, command: str, timeout: float = 60) -> str:
    rc, out = console.run(command, timeout=timeout)
    assert rc == 0, f"{command}: rc={rc} {out}"
    return out.strip()


def _ctl(agent: AgentProcess, *args: str, stdin: str | None = None) -> str:
    out = subprocess.run([sys.executable, "-m", "cna_agent.cli.main", "--socket", str(agent.socket), *args],
                         capture_output=True, text=True, timeout=120, input=stdin)
    assert out.returncode == 0, out.stderr
    return out.stdout


def _tools(vms, uuid: str) -> int:
    return vms.GetVm(vm.GetVmRequest(vm=uuid), timeout=10).status.tools_status


def test_customization_then_guest_agent_info_hung_agent_quiesce_password_and_shutdown_paths_on_debian(debian_env) -> None:
    agent, ds, guest, pg = debian_env
    with agent.channel() as ch:
        vms = pb.vm_pb2_grpc.VmServiceStub(ch)
        storage = pb.storage_pb2_grpc.StorageServiceStub(ch)
        events = pb.events_pb2_grpc.EventServiceStub(ch)
        ok(ch, storage.CloneVolume(st.CloneVolumeRequest(request_id="ga-clone", source=TEMPLATE, datastore="ds",
                                                         path="g1/root.qcow2", linked=True), timeout=30))
        # cloud-init runs (the seed's command line): the first boot is customized from the drive
        spec = vm.VmSpec(
            name="deb-ga", vcpus=2, memory_mib=768, serial_console=True, guest_agent=True, tpm=True,
            arch=pb.common_pb2.ARCH_X86_64, console=vm.ConsoleSpec(type=vm.CONSOLE_TYPE_NONE),
            boot=vm.BootSpec(kernel=guest["kernel"], initrd=guest["initrd"], cmdline=guest["cmdline"]),
            disks=[vm.DiskSpec(volume="ds/g1/root.qcow2")], nics=[vm.NicSpec(port_group=pg, mac=MAC)])
        root_hash = _crypt(CUSTOM_PASSWORD)
        created = ok(ch, vms.CreateVm(vm.CreateVmRequest(spec=spec, start=True, customization=_customization(root_hash)),
                                      timeout=60), into=vm.Vm())
        uuid = created.uuid
        seed = agent.dir / "state" / "seeds" / f"{uuid}.img"
        assert seed.is_file() and "cna-seed" in domain_xml(agent, "embedded", "deb-ga")
        assert vms.GetVm(vm.GetVmRequest(vm=uuid), timeout=10).status.customization.state == vm.CUSTOMIZATION_STATE_PENDING
        log = SerialLog(agent.dir / "run" / "vms" / uuid / "serial.log")
        log.wait_for(r"CNA-GUEST-READY boot=1 os=debian", timeout=300)

        # -- tools status from the host side: the channel connected, an event said so --------------
        wait_for(lambda: _tools(vms, uuid) == vm.TOOLS_STATUS_RUNNING, 60, "tools status running")
        seen = events.ListEvents(ev.ListEventsRequest(types=["vm.guest_agent"], resource_id=uuid, limit=100), timeout=10).events
        assert any(e.attributes["state"] == "connected" for e in seen), seen

        # -- the guest reported its first boot done: the drive left the guest and the host ---------
        status = wait_for(lambda: (s := vms.GetVm(vm.GetVmRequest(vm=uuid), timeout=10).status.customization).state
                          != vm.CUSTOMIZATION_STATE_PENDING and s, 90, "customization reported", interval=1)
        assert status.state == vm.CUSTOMIZATION_STATE_DONE, status.message
        assert "cloud-init finished" in status.message and status.finish_time.seconds >= status.start_time.seconds
        assert not seed.exists()
        wait_for(lambda: "cna-seed" not in domain_xml(agent, "embedded", "deb-ga"), 30, "the drive unplugged live")
        assert "cna-seed" not in domain_xml(agent, "embedded", "deb-ga", live=False)

        console = AgentConsole(ch, uuid)
        try:
            login_root(console, CUSTOM_PASSWORD)  # root's password hash from the seed
            nic = "eth0"  # the seed's network config names the NIC it matched by MAC
            kernel = _guest(console, "uname -r").splitlines()[-1]
            hostname = _guest(console, "hostname").splitlines()[-1]
            assert hostname == CUSTOM_HOSTNAME
            assert f"inet {GUEST_IP}/24" in _guest(console, f"ip -4 addr show {nic}")
            assert _guest(console, f"cat /sys/class/net/{nic}/address").splitlines()[-1] == MAC
            assert "default via 192.0.2.1" in _guest(console, "ip route")
            assert ROOT_KEY in _guest(console, "cat /root/.ssh/authorized_keys")
            assert OPS_KEY in _guest(console, "cat /home/ops/.ssh/authorized_keys")
            assert "NOPASSWD:ALL" in _guest(console, "cat /etc/sudoers.d/90-cloud-init-users")
            # -- the vTPM: a TPM 2.0 the guest's kernel found; an NV index written now is read on
            #    the next boot (PCRs reset with the machine; the TPM's own state is what persists)
            _guest(console, "test -c /dev/tpm0 && test -c /dev/tpmrm0")
            assert _guest(console, "cat /sys/class/tpm/tpm0/tpm_version_major").splitlines()[-1] == "2"
            assert re.search(r"<tpm model=.tpm-crb.>\s*<backend type=.emulator. version=.2\.0.",
                             domain_xml(agent, "embedded", "deb-ga")), "libvirt runs no swtpm for the VM"
            # swtpm's state, where libvirt keeps it for the VM (its embedded root here)
            assert list((agent.dir / "state" / "libvirt").glob(f"**/swtpm/{uuid}/tpm2/tpm2-00.permall"))
            _guest(console, f"tpm2_nvdefine {TPM_NV} -C o -s {len(TPM_SECRET)} -a 'ownerread|ownerwrite' && "
                            f"printf %s {TPM_SECRET} | tpm2_nvwrite {TPM_NV} -C o -i -")
            _guest(console, "tpm2_pcrextend 16:sha256=" + "ab" * 32)
            assert "0x" in _guest(console, "tpm2_pcrread sha256:16")
            # the unplugged drive is gone from the guest too: only the root disk is left
            wait_for(lambda: _guest(console, "ls /sys/block | grep '^vd' | tr '\\n' ' '").split()[-1:] == ["vda"], 30,
                     "the drive gone from the guest's block devices", interval=1)
            secretless = [agent.log_text(), str(events.ListEvents(ev.ListEventsRequest(limit=1000), timeout=10)),
                          str(pb.operations_pb2_grpc.OperationsServiceStub(ch).ListOperations(ops_pb.ListOperationsRequest(),
                                                                                            timeout=10))]
            assert all(root_hash not in text and CUSTOM_PASSWORD not in text for text in secretless)
            done = events.ListEvents(ev.ListEventsRequest(types=["vm.customization."], resource_id=uuid), timeout=10).events
            assert [e.type for e in done] == ["vm.customization.done"], done
            ga_version = re.search(r"(\d+\.\d+\.\d+)", _guest(console, "qemu-ga --version")).group(1)

            # -- guest info, against what the guest says -------------------------------------------
            def fresh() -> vm.GuestInfo:
                info = vms.GetGuestInfo(vm.GetGuestInfoRequest(vm=uuid), timeout=30)
                return info if any(a.address == GUEST_IP for i in info.interfaces for a in i.addresses) else None

            info = wait_for(fresh, 30, "guest info with the address set in the guest", interval=1)
            assert (info.os_id, info.os_version, info.kernel_release, info.hostname) == ("debian", "12", kernel, hostname)
            assert info.tools_status == vm.TOOLS_STATUS_RUNNING and info.tools_version == ga_version
            assert not info.stale and info.HasField("read_time")
            # "seen in this QEMU process", for an agent restarted later: in the live definition
            # only (it goes with the process), with the version
            assert re.search(rf"<ga:seen [^>]*version=.{re.escape(ga_version)}.", domain_xml(agent, "embedded", "deb-ga"))
            assert "ga:seen" not in domain_xml(agent, "embedded", "deb-ga", live=False)
            (iface,) = [i for i in info.interfaces if i.mac == MAC]
            assert iface.nic_index == 0 and iface.name == nic
            assert [(a.address, a.prefix) for a in iface.addresses if a.type == "ipv4"] == [(GUEST_IP, 24)]
            root = [f for f in info.filesystems if f.mountpoint == "/"]
            assert root and root[0].fstype == "ext4" and list(root[0].disks) == ["vda"], info.filesystems
            assert root[0].total_bytes > 2 * 1024**3 and 0 < root[0].used_bytes < root[0].total_bytes
            assert "root" in info.users
            got = vms.GetVm(vm.GetVmRequest(vm=uuid), timeout=10).status
            assert got.tools_status == vm.TOOLS_STATUS_RUNNING and got.tools_version == ga_version
            # what an admin sees: the same facts, in 80 columns
            shown = _ctl(agent, "vm", "guest-info", "deb-ga")
            assert f"running ({ga_version})" in shown and kernel in shown and f"{GUEST_IP}/24" in shown, shown
            assert MAC in shown and re.search(r"^/\s+ext4\s+\S+\s+\d", shown, re.M), shown
            assert max(len(line) for line in shown.splitlines()) <= 80, shown
            assert f"running ({ga_version})" in _ctl(agent, "vm", "show", "deb-ga")

            # -- a resume sets the guest's clock, which stood still while paused ------------------
            ok(ch, vms.PauseVm(vm.VmActionRequest(vm=uuid), timeout=30))
            time.sleep(5)
            ok(ch, vms.ResumeVm(vm.VmActionRequest(vm=uuid), timeout=30))
            guest_now = float(_guest(console, "date +%s.%N").splitlines()[-1])
            assert abs(guest_now - time.time()) < 3, (guest_now, time.time())

            # -- a password set through the guest agent (used to log in on the second boot) --------
            said = _ctl(agent, "vm", "set-password", "deb-ga", "root", stdin=NEW_PASSWORD + "\n")
            assert "password of root set" in said, said
            shadow = _guest(console, "grep '^root:' /etc/shadow")
            assert guest["root_password"] not in shadow and "$" in shadow  # a new hash in the guest
            refused = wait(ch, vms.SetGuestPassword(vm.SetGuestPasswordRequest(vm=uuid, user="nosuchuser", password="x1"),
                                                    timeout=30), timeout=60)
            assert refused.state == ops_pb.OPERATION_STATE_FAILED and refused.error.code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
            ops_seen = pb.operations_pb2_grpc.OperationsServiceStub(ch).ListOperations(
                ops_pb.ListOperationsRequest(), timeout=10)
            everything = [agent.log_text(), str(ops_seen),
                          str(events.ListEvents(ev.ListEventsRequest(limit=1000), timeout=10))]
            assert all(NEW_PASSWORD not in text for text in everything)  # the secret is nowhere but in the guest
            assert any(e.type == "vm.guest.password_set" and e.attributes["user"] == "root"
                       for e in events.ListEvents(ev.ListEventsRequest(types=["vm.guest."], limit=100), timeout=10).events)

            # -- a hung guest agent delays only guest-info reads ------------------------------------
            _guest(console, "kill -STOP $(pidof qemu-ga)")
            time.sleep(2.5)  # past the read interval: the next read goes to the guest
            result: dict = {}

            def read_info() -> None:
                t0 = time.monotonic()
                result["info"] = vms.GetGuestInfo(vm.GetGuestInfoRequest(vm=uuid), timeout=60)
                result["s"] = time.monotonic() - t0

            reader = threading.Thread(target=read_info)
            reader.start()
            time.sleep(0.5)
            t0 = time.monotonic()
            for _ in range(5):
                vms.GetVm(vm.GetVmRequest(vm=uuid), timeout=10)
            get_s = (time.monotonic() - t0) / 5
            reader.join(60)
            assert get_s < 1.0, f"GetVm took {get_s:.2f}s a call while the guest agent hung"
            stale = result["info"]
            assert stale.stale and stale.error and stale.hostname == hostname, stale
            assert result["s"] < 20, result["s"]
            _guest(console, "kill -CONT $(pidof qemu-ga)")

            # -- a quiesced snapshot freezes and thaws the guest's filesystems ----------------------
            snap = ok(ch, vms.CreateSnapshot(vm.CreateSnapshotRequest(vm=uuid, name="quiet", quiesce=True), timeout=30),
                      timeout=120, into=vm.Snapshot())
            assert snap.name == "quiet"
            journal = _guest(console, "journalctl -b -u qemu-guest-agent --no-pager -o cat")
            assert "guest-fsfreeze called" in journal, journal[-2000:]
            assert _guest(console, "touch /root/after-thaw && echo writable").splitlines()[-1] == "writable"
            overlays = sorted(p.name for p in (ds / "g1").iterdir())
            assert len(overlays) == 2, overlays  # the clone and the snapshot's overlay on top

            # -- with qemu-guest-agent stopped: refused clearly, the VM runs on ---------------------
            _guest(console, "systemctl stop qemu-guest-agent")
            wait_for(lambda: _tools(vms, uuid) == vm.TOOLS_STATUS_NOT_RUNNING, 30, "tools status not running")
            op = vms.CreateSnapshot(vm.CreateSnapshotRequest(vm=uuid, name="quiet2", quiesce=True), timeout=30)
            failed = wait(ch, op, timeout=120)
            assert failed.state == ops_pb.OPERATION_STATE_FAILED
            assert failed.error.code == grpc.StatusCode.FAILED_PRECONDITION.value[0], failed.error
            assert "guest agent" in failed.error.message and "no snapshot was taken" in failed.error.message
            names = [s.name for s in vms.ListSnapshots(vm.ListSnapshotsRequest(vm=uuid), timeout=10).snapshots]
            assert names == ["quiet"]
            assert vms.GetVm(vm.GetVmRequest(vm=uuid), timeout=10).status.state == vm.VM_STATE_RUNNING
            assert _guest(console, "echo alive").splitlines()[-1] == "alive"

            # -- a guest that ignores the power button is stopped through its guest agent ----------
            _guest(console, "systemctl start qemu-guest-agent && mkdir -p /etc/systemd/logind.conf.d && "
                            "printf '[Login]\\nHandlePowerKey=ignore\\n' > /etc/systemd/logind.conf.d/cna-test.conf && "
                            "systemctl restart systemd-logind")
            wait_for(lambda: _tools(vms, uuid) == vm.TOOLS_STATUS_RUNNING, 30, "tools status running again")
        finally:
            console.close()
        _stopped_by(ch, vms, uuid, log, "guest-agent", count=1)

        # -- graceful shutdown goes through systemd's ACPI path -----------------------------------
        # the drop-in stays on the disk: the next boot removes it before the button is pressed
        ok(ch, vms.StartVm(vm.VmActionRequest(vm=uuid), timeout=30), timeout=120)
        log.wait_for(r"CNA-GUEST-READY boot=2 os=debian", timeout=240)
        console = AgentConsole(ch, uuid)
        try:
            login_root(console, NEW_PASSWORD)  # the password set through the guest agent, kept on the disk
            # the customization outlives its drive: cloud-init applies it once per instance
            assert _guest(console, "hostname").splitlines()[-1] == CUSTOM_HOSTNAME
            assert f"inet {GUEST_IP}/24" in _guest(console, "ip -4 addr show eth0")
            # the TPM's state outlived the power-off: the NV index holds what the first boot wrote
            assert _guest(console, f"tpm2_nvread {TPM_NV} -C o -s {len(TPM_SECRET)}").splitlines()[-1] == TPM_SECRET
            _guest(console, "rm /etc/systemd/logind.conf.d/cna-test.conf && systemctl restart systemd-logind")
        finally:
            console.close()
        _stopped_by(ch, vms, uuid, log, "acpi", count=2)


def _stopped_by(ch, vms, uuid: str, log: SerialLog, via: str, count: int) -> None:
    """ShutdownVm without force stops the guest through systemd (its units stopped, then the
    kernel's power-down), asked the way ``via`` says (the operation's shutdown_via)."""
    op = ok(ch, vms.ShutdownVm(vm.ShutdownVmRequest(vm=uuid, timeout=duration_pb2.Duration(seconds=90)), timeout=30),
            timeout=120)
    assert op.metadata["shutdown_via"] == via, op.metadata
    log.wait_for(r"reboot: Power down", timeout=30, count=count)
    text = log.text()
    assert text.count("CNA-GUEST-SYSTEMD-STOP") == count, text[-3000:]
    assert text.rindex("CNA-GUEST-SYSTEMD-STOP") < text.rindex("reboot: Power down")
    assert vms.GetVm(vm.GetVmRequest(vm=uuid), timeout=10).status.state == vm.VM_STATE_STOPPED
