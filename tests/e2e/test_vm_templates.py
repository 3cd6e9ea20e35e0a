"""Templates on the real Debian guest: a stopped VM becomes a template (its volume read-only, the
VM refused a start), three VMs are deployed from it as linked clones, each with its own first-boot
customization, and each boots with its own hostname while the template's volume stays unchanged.

Judged from outside the agent: the volume file's mode and SHA-256 on the host, each clone's
backing chain as qemu-img reads it, the guest's own hostname (from its guest agent and cloud-init's
report), and the serial consoles' boot markers.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import grpc
import pytest

from cna_agent.api import pb

from support.agent import AgentProcess
from support.console import SerialLog
from support.debian import TEMPLATE, datastore_dir, debian_agent
from support.tools import load_tool
from support.operations import ok, wait
from support.waiting import wait_for

sha256_file = load_tool("guest_build_util", "guest_build_util.py").sha256_file
vm, st = pb.vm_pb2, pb.storage_pb2
pytestmark = [pytest.mark.slow, pytest.mark.skipif(os.geteuid() != 0, reason="the embedded QEMU driver here needs root")]

NAMES = ["deb-t1", "deb-t2", "deb-t3"]


@pytest.fixture
def template_env(libvirt_caps_cache) -> Iterator[tuple[AgentProcess, dict]]:
    with debian_agent(libvirt_caps_cache, "tp") as env:
        yield env


def _ctl(agent: AgentProcess, *args: str) -> str:
    out = subprocess.run([sys.executable, "-m", "cna_agent.cli.main", "--socket", str(agent.socket), *args],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout


def _backing_chain(path: Path) -> list[str]:
    out = subprocess.run(["qemu-img", "info", "-U", "--backing-chain", "--output=json", str(path)], capture_output=True,
                         text=True, timeout=60, check=True).stdout
    return [image["filename"] for image in json.loads(out)]


def test_three_vms_deployed_from_one_template_boot_with_their_own_hostnames_and_the_template_volume_is_unchanged(
        template_env) -> None:
    agent, guest = template_env
    ds = datastore_dir(agent)
    with agent.channel() as ch:
        vms = pb.vm_pb2_grpc.VmServiceStub(ch)
        storage = pb.storage_pb2_grpc.StorageServiceStub(ch)
        ok(ch, storage.CloneVolume(st.CloneVolumeRequest(request_id="tp-clone", source=TEMPLATE, datastore="ds",
                                                         path="gold/root.qcow2", linked=True), timeout=30))
        spec = vm.VmSpec(
            name="gold", vcpus=1, memory_mib=512, serial_console=True, guest_agent=True,
            arch=pb.common_pb2.ARCH_X86_64, console=vm.ConsoleSpec(type=vm.CONSOLE_TYPE_NONE),
            boot=vm.BootSpec(kernel=guest["kernel"], initrd=guest["initrd"], cmdline=guest["cmdline"]),
            disks=[vm.DiskSpec(volume="ds/gold/root.qcow2")])
        ok(ch, vms.CreateVm(vm.CreateVmRequest(spec=spec), timeout=60))

        # -- the template: read-only volume, refused a start --------------------------------------
        gold = ds / "gold" / "root.qcow2"
        # through the admin's CLI, as `cna-ctl vm template` does it (ConvertVmToTemplate underneath)
        said = _ctl(agent, "vm", "template", "gold")
        assert said.startswith("gold is a template now") and "read-only" in said, said
        assert vms.GetVm(vm.GetVmRequest(vm="gold"), timeout=10).status.template
        assert any(line.split()[:1] == ["gold"] and "template" in line.split() for line in _ctl(agent, "vm", "list").splitlines())
        assert stat.S_IMODE(gold.stat().st_mode) == 0o444
        with pytest.raises(grpc.RpcError) as err:
            vms.StartVm(vm.VmActionRequest(vm="gold"), timeout=30)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "template" in err.value.details()
        before = sha256_file(gold)

        # -- a deploy naming a VM that exists is refused before anything is made ------------------
        with pytest.raises(grpc.RpcError) as err:
            vms.DeployVm(vm.DeployVmRequest(template="gold", names=["deb-new", "gold"], linked=True), timeout=30)
        assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS and "names" in err.value.details()
        assert not (ds / "deb-new").exists()

        # -- three VMs, each customized with its own hostname -------------------------------------
        customizations = [vm.GuestCustomization(hostname=name, users=[vm.GuestUser(name="root", ssh_authorized_keys=[
            f"ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFtZ2c9dVJ8x3pQ6mR1kT7wY4uB0nL5sH2aE8fG6jC1D vrm@{name}"])])
            for name in NAMES]
        op = vms.DeployVm(vm.DeployVmRequest(request_id="tp-deploy", template="gold", names=NAMES, linked=True,
                                             start=True, customizations=customizations), timeout=60)
        result = ok(ch, op, timeout=300, into=vm.DeployVmResponse())
        assert [v.name for v in result.vms] == NAMES and not result.failures, result
        assert len({v.uuid for v in result.vms}) == 3
        for v in result.vms:
            clone = ds / v.name / "root.qcow2"
            assert v.spec.disks[0].volume == f"ds/{v.name}/root.qcow2" and clone.is_file()
            assert _backing_chain(clone)[:2] == [str(clone), str(gold)]
        # a retry of the same request gets the first answer, not three more VMs
        again = vms.DeployVm(vm.DeployVmRequest(request_id="tp-deploy", template="gold", names=NAMES, linked=True,
                                                start=True, customizations=customizations), timeout=60)
        assert again.id == op.id

        for v in result.vms:
            SerialLog(agent.dir / "run" / "vms" / v.uuid / "serial.log").wait_for(r"CNA-GUEST-READY boot=1 os=debian",
                                                                                   timeout=400)
        for v in result.vms:
            status = wait_for(lambda: (s := vms.GetVm(vm.GetVmRequest(vm=v.uuid), timeout=10).status.customization).state
                              != vm.CUSTOMIZATION_STATE_PENDING and s, 120, f"{v.name} customized", interval=2)
            assert status.state == vm.CUSTOMIZATION_STATE_DONE, status.message
            # the guest's own answer, through its guest agent (read again until it has the new name)
            wait_for(lambda: vms.GetGuestInfo(vm.GetGuestInfoRequest(vm=v.uuid, max_age_s=1), timeout=30).hostname == v.name,
                     60, f"{v.name}'s hostname from its guest agent", interval=2)

        # -- the template never changed; it cannot go while its clones stand on it ---------------
        assert sha256_file(gold) == before and stat.S_IMODE(gold.stat().st_mode) == 0o444
        refused = wait(ch, vms.DeleteVm(vm.DeleteVmRequest(vm="gold", delete_disks=True), timeout=60))
        assert refused.error.code == grpc.StatusCode.FAILED_PRECONDITION.value[0] and "linked clone" in refused.error.message
        assert vms.GetVm(vm.GetVmRequest(vm="gold"), timeout=10).status.template
