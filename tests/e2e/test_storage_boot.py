"""Guests that boot from storage volumes: an imported vmdk and a linked clone of a template.

The real daemon over gRPC, the real x86_64 test guest's BIOS boot disk (SYSLINUX on FAT16,
tools/build-test-guest.py --boot-disk) under TCG, firmware BIOS and no direct kernel boot: the
guest prints ``CNA-FACT bootsrc=disk`` only when SeaBIOS loaded it from the disk, so "it boots
from the volume" is observed on the serial log, not assumed. For the linked clone the guest
writes to the disk's unpartitioned scratch area through its console shell, and the test checks
on the host that the bytes landed in the clone while the template stayed bit-for-bit the same.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Iterator

import grpc
import pytest

from cna_agent.api import pb

from support.agent import AgentProcess, delete_vms_and_stop, start_agent
from support.console import AgentConsole, SerialLog
from support.guests import build_guest
from support.tools import load_tool
from support.operations import history, ok, unpack

sha256_file = load_tool("guest_build_util", "guest_build_util.py").sha256_file
vm, st, ops_pb = pb.vm_pb2, pb.storage_pb2, pb.operations_pb2
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the embedded QEMU driver here needs root")

MiB = 1024**2
#: The boot disk's layout (build-test-guest.py): FAT16 partition up to 41 MiB, 64 MiB in all.
DISK_BYTES = 64 * MiB
SCRATCH_MIB = 50  # written by the guest: inside the unpartitioned tail, far from the FAT
SCRATCH_COUNT = 2


def _boot_disk() -> Path:
    """The cached boot disk (read only here: tests convert or copy it, never write it)."""
    disk = Path(build_guest("x86_64", boot_disk=True)["boot_disk"])
    assert disk.stat().st_size == DISK_BYTES
    return disk


def _qemu_img(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    p = subprocess.run(["qemu-img", *args], capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"qemu-img {' '.join(args)}: {p.stderr}"
    return p


def _img_info(path: Path, fmt: str) -> dict:
    return json.loads(_qemu_img("info", "--output=json", "-f", fmt, str(path)).stdout)


def _boot_spec(name: str, volume: str) -> vm.VmSpec:
    """A VM whose only disk is ``volume``, booted by SeaBIOS from it (no kernel in spec.boot)."""
    return vm.VmSpec(name=name, vcpus=1, memory_mib=192, serial_console=True, arch=pb.common_pb2.ARCH_X86_64,
                     firmware=vm.FIRMWARE_BIOS, console=vm.ConsoleSpec(type=vm.CONSOLE_TYPE_NONE),
                     disks=[vm.DiskSpec(volume=volume, boot_order=1)])


def _create_and_boot(agent: AgentProcess, ch: grpc.Channel, spec: vm.VmSpec) -> tuple[str, SerialLog]:
    """Create and start the VM; return its UUID once the guest says it booted from the disk."""
    vms = pb.vm_pb2_grpc.VmServiceStub(ch)
    created = ok(ch, vms.CreateVm(vm.CreateVmRequest(spec=spec, start=True), timeout=60), into=vm.Vm())
    got = vms.GetVm(vm.GetVmRequest(vm=created.uuid), timeout=30)
    assert not got.spec.boot.kernel and got.spec.firmware == vm.FIRMWARE_BIOS
    qemu_argv = Path(f"/proc/{got.status.qemu_pid}/cmdline").read_bytes().split(b"\0")
    assert b"-kernel" not in qemu_argv and b"-initrd" not in qemu_argv, qemu_argv
    assert [(d.volume, d.boot_order) for d in got.spec.disks] == [(spec.disks[0].volume, 1)]
    log = SerialLog(agent.dir / "run" / "vms" / created.uuid / "serial.log")
    src = log.wait_for(r"^CNA-FACT bootsrc=(\S+)", timeout=150)
    assert src.group(1) == "disk", log.text()[-3000:]
    log.wait_for(r"^CNA-GUEST-READY", timeout=60)
    text = log.text()
    assert text.index("CNA-FACT bootsrc=disk") < text.index("CNA-GUEST-READY")
    return created.uuid, log


@pytest.fixture
def boot_env(libvirt_caps_cache, system_mode) -> Iterator[tuple[AgentProcess, Path, Path, Path]]:
    libvirt_mode = system_mode
    """An agent with two dir datastores, "ds" (volumes) and "imp" (uploads), under a short /tmp
    path (QEMU's unix sockets under the embedded root must stay below 108 bytes); once on the
    embedded driver and once on the host's libvirtd, where QEMU runs unprivileged and must reach
    volumes in the datastores' subdirectories (the agent makes those directories itself).

    Teardown deletes every VM through the agent (even after a failed assertion), then stops it
    and removes the whole tree; the session's autouse fixture kills any QEMU left over.
    """
    base = Path(tempfile.mkdtemp(prefix="sb", dir="/tmp"))
    ds, imp = base / "ds", base / "imp"
    ds.mkdir()
    imp.mkdir()
    extra = (f'[storage.datastores.ds]\ntype = "dir"\npath = "{ds}"\n'
             f'[storage.datastores.imp]\ntype = "dir"\npath = "{imp}"\n')
    agent = None
    try:
        agent = start_agent(base / "a", libvirt_caps_cache, tcp=False, extra_config=extra, mode=libvirt_mode)
        yield agent, ds, imp, _boot_disk()
    finally:
        delete_vms_and_stop(agent)
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.slow
def test_imported_vmdk_boots_with_bios_from_the_disk(boot_env) -> None:
    agent, ds, imp, disk = boot_env
    vmdk = imp / "boot.vmdk"
    _qemu_img("convert", "-f", "raw", "-O", "vmdk", str(disk), str(vmdk))
    with agent.channel() as ch:
        storage = pb.storage_pb2_grpc.StorageServiceStub(ch)
        op = storage.ImportVolume(st.ImportVolumeRequest(request_id="imp-boot", source="imp/boot.vmdk", datastore="ds",
                                                         path="vm1/root.qcow2"), timeout=30)
        seen = history(ch, op)
        last = seen[-1]
        assert last.kind == "volume.import" and last.state == ops_pb.OPERATION_STATE_SUCCEEDED, last.error
        # progress was reported: a conversion stage measured against the source's size, ending at 100
        assert last.progress.percent == 100 and last.progress.stage == "converting"
        assert last.progress.bytes_total == vmdk.stat().st_size
        v = unpack(last, st.Volume())
        assert v.id == "ds/vm1/root.qcow2" and v.format == st.VOLUME_FORMAT_QCOW2 and not v.backing_volume
        assert v.virtual_size_bytes == DISK_BYTES
        # qemu-img check findings on the source, as the API reports them
        assert v.check.supported and v.check.corruptions == 0 and v.check.leaks == 0 and v.check.check_errors == 0
        assert v.check.summary == "no errors"
        # the imported volume holds the boot disk's bytes, whatever the container formats
        imported = ds / "vm1" / "root.qcow2"
        _qemu_img("compare", "-f", "raw", "-F", "qcow2", str(disk), str(imported))
        assert _img_info(imported, "qcow2")["format"] == "qcow2"

        uuid, _ = _create_and_boot(agent, ch, _boot_spec("vmdk-boot", v.id))
        assert list(storage.GetVolume(st.GetVolumeRequest(id=v.id), timeout=30).used_by) == [uuid]
        ok(ch, pb.vm_pb2_grpc.VmServiceStub(ch).DeleteVm(vm.DeleteVmRequest(vm=uuid, force=True), timeout=60))
        assert imported.is_file()  # kept: delete_disks was not asked for


@pytest.mark.slow
def test_linked_clone_boots_and_guest_writes_leave_the_template_untouched(boot_env) -> None:
    agent, ds, imp, disk = boot_env
    tpl = ds / "tpl" / "base.qcow2"
    tpl.parent.mkdir()
    _qemu_img("convert", "-f", "raw", "-O", "qcow2", str(disk), str(tpl))
    # qemu-img convert leaves its last writes in the page cache; their later writeback adds an
    # extent block to the file (qemu-img info's actual-size +4 KiB) without any change by the
    # agent or the guest, so the baseline is taken once the file is on disk.
    fd = os.open(tpl, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    tpl_sha, tpl_info = sha256_file(tpl), _img_info(tpl, "qcow2")
    with agent.channel() as ch:
        storage = pb.storage_pb2_grpc.StorageServiceStub(ch)
        vms = pb.vm_pb2_grpc.VmServiceStub(ch)
        clone = ok(ch, storage.CloneVolume(st.CloneVolumeRequest(
            request_id="clone-boot", source="ds/tpl/base.qcow2", datastore="ds", path="vm2/root.qcow2", linked=True),
            timeout=30), into=st.Volume())
        assert clone.id == "ds/vm2/root.qcow2" and clone.backing_volume == "ds/tpl/base.qcow2"
        assert clone.virtual_size_bytes == DISK_BYTES
        assert storage.GetVolume(st.GetVolumeRequest(id="ds/tpl/base.qcow2"), timeout=30).template
        clone_file = ds / "vm2" / "root.qcow2"
        info = _img_info(clone_file, "qcow2")
        assert os.path.realpath(info["full-backing-filename"]) == str(tpl.resolve())
        assert info["backing-filename-format"] == "qcow2"
        allocated_before = storage.GetVolume(st.GetVolumeRequest(id=clone.id), timeout=30).actual_size_bytes

        uuid, log = _create_and_boot(agent, ch, _boot_spec("clone-boot", clone.id))
        shell = AgentConsole(ch, uuid)
        try:
            shell.send("\n")
            rc, out = shell.run(f"dd if=/dev/urandom of=/dev/vda bs=1M seek={SCRATCH_MIB} count={SCRATCH_COUNT} "
                                "conv=fsync 2>&1", timeout=120)
            assert rc == 0, out
            rc, out = shell.run(f"dd if=/dev/vda bs=1M skip={SCRATCH_MIB} count={SCRATCH_COUNT} 2>/dev/null | md5sum",
                                timeout=120)
            assert rc == 0, out
            guest_md5 = out.split()[0]
            assert len(guest_md5) == 32, out
        finally:
            shell.close()
        ok(ch, vms.ShutdownVm(vm.ShutdownVmRequest(vm=uuid, hard=True), timeout=60))

        # the guest's bytes are in the clone's own layer; the template still reads as before
        region = slice(SCRATCH_MIB * MiB, (SCRATCH_MIB + SCRATCH_COUNT) * MiB)
        flat = imp / "clone-view.raw"  # the guest's view of the whole disk, read back on the host
        _qemu_img("convert", "-f", "qcow2", "-O", "raw", str(clone_file), str(flat))
        assert hashlib.md5(flat.read_bytes()[region]).hexdigest() == guest_md5
        flat.unlink()
        extents = json.loads(_qemu_img("map", "--output=json", "-f", "qcow2", str(clone_file)).stdout)
        own = sum(max(0, min(e["start"] + e["length"], region.stop) - max(e["start"], region.start))
                  for e in extents if e["depth"] == 0 and e["data"])
        assert own == region.stop - region.start, extents  # every byte of the region in the clone's layer
        grown = storage.GetVolume(st.GetVolumeRequest(id=clone.id), timeout=30)
        assert grown.actual_size_bytes >= allocated_before + SCRATCH_COUNT * MiB, (allocated_before, grown)
        assert grown.backing_volume == "ds/tpl/base.qcow2"
        assert sha256_file(tpl) == tpl_sha and _img_info(tpl, "qcow2") == tpl_info
        _qemu_img("compare", "-f", "raw", "-F", "qcow2", str(disk), str(tpl))

        # deleting the VM with its disks removes the clone, never the template it is backed by
        ok(ch, vms.DeleteVm(vm.DeleteVmRequest(vm=uuid, delete_disks=True, force=True), timeout=60))
        assert not clone_file.exists()
        with pytest.raises(grpc.RpcError) as err:
            storage.GetVolume(st.GetVolumeRequest(id=clone.id), timeout=30)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        ids = {v.id for v in storage.ListVolumes(st.ListVolumesRequest(datastore="ds"), timeout=30).volumes}
        assert ids == {"ds/tpl/base.qcow2"}
        assert sha256_file(tpl) == tpl_sha and _img_info(tpl, "qcow2") == tpl_info
        _qemu_img("compare", "-f", "raw", "-F", "qcow2", str(disk), str(tpl))
        assert storage.GetVolume(st.GetVolumeRequest(id="ds/tpl/base.qcow2"), timeout=30).template
        assert not log.path.parent.exists()  # the VM's run directory went with it
