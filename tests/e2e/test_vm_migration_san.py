"""A guest whose data disk is an iSCSI LUN (QEMU's libiscsi, tgtd on 127.0.0.1) moves from host
A to host B; both agents declare the same SAN datastore, so the disk is shared storage and no
data is copied. Judged from outside: libvirt on each host, B's definition naming the same LUN,
and the array itself: a pattern the guest writes to the disk *after* the move, through B's
agent's serial console, is in tgtd's backing file.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from cna_agent.api import pb
from support.agent import start_agent
from support.console import AgentConsole
from support.guests import guest_spec, serial_log
from support.hosts import domain_state, domain_xml
from support.migration import agent_config, make_base, tear_down
from support.operations import ok
from support.san import tgtd_target

vm = pb.vm_pb2
pytestmark = [pytest.mark.skipif(os.geteuid() != 0, reason="needs root (two libvirtds, tgtd)"), pytest.mark.slow]
IQN = "iqn.2026-12.test.cna:migration"
MiB = 1 << 20


def _lun_sources(uri: str, uuid: str) -> list[str]:
    return [s.get("name") for s in domain_xml(uri, uuid).findall("devices/disk/source[@protocol='iscsi']")]


def test_a_guest_on_a_shared_lun_moves_and_writes_to_it_on_the_destination(two_hosts) -> None:
    import libvirt

    libvirt.registerErrorHandler(lambda _c, _e: None, None)
    base = make_base("ms")
    lun = base / "lun.raw"
    with lun.open("wb") as f:
        f.truncate(32 * MiB)
    agents = []
    # the testbed's own directory (tgtd's pid) outlives tear_down's removal of base, or the
    # tgtd it started could not be stopped (it was left running after CI runs)
    tb_dir = Path(tempfile.mkdtemp(prefix="mstb", dir="/tmp"))
    with tgtd_target(tb_dir, IQN, [lun]) as tb:
        try:
            san = (f'[storage.datastores.san]\ntype = "iscsi"\nportals = ["{tb.iscsi_portal}"]\n'
                   f'target_iqn = "{IQN}"\ninitiator = "libiscsi"\nscan_timeout_s = 10.0\n')
            for name, host in (("a", two_hosts.a), ("b", two_hosts.b)):
                agents.append(start_agent(base / name, None, extra_config=agent_config(host, base / "img", san)))
            a, b = agents
            spec = guest_spec("x86_64", "onlun", disks=[vm.DiskSpec(lun=vm.LunSource(datastore="san", lun_id=f"{IQN}/1"))])
            with a.channel() as cha, b.channel() as chb:
                vms_a, vms_b = pb.vm_pb2_grpc.VmServiceStub(cha), pb.vm_pb2_grpc.VmServiceStub(chb)
                uuid = ok(cha, vms_a.CreateVm(vm.CreateVmRequest(spec=spec, start=True), timeout=60), into=vm.Vm()).uuid
                serial_log(a, uuid).wait_for(r"CNA-GUEST-READY boot=", timeout=150)
                on_a = _lun_sources(two_hosts.a.uri, uuid)
                assert len(on_a) == 1 and on_a[0].startswith(IQN), on_a

                ok(cha, vms_a.MigrateVm(vm.MigrateVmRequest(vm=uuid, destination=f"127.0.0.1:{b.tcp_port}"), timeout=60),
                   timeout=180)
                assert domain_state(two_hosts.b.uri, uuid) == (True, True) and domain_state(two_hosts.a.uri, uuid) is None
                assert _lun_sources(two_hosts.b.uri, uuid) == on_a  # the same LUN, nothing copied

                # the guest, now on B, writes 1 MiB at 1 MiB into the LUN: the array has it
                with AgentConsole(chb, uuid) as con:
                    con.send("\n")
                    con.wait_for(r"cna# ", timeout=30, partial=True)
                    rc, out = con.run("dd if=/dev/urandom of=/tmp/pat bs=64k count=16 2>/dev/null && sha256sum /tmp/pat", timeout=60)
                    assert rc == 0, out
                    sha = out.split()[0]
                    rc, out = con.run("dd if=/tmp/pat of=/dev/vda bs=64k seek=16 oflag=direct conv=fsync 2>&1", timeout=120)
                    assert rc == 0 and "16+0 records out" in out, out
                with lun.open("rb") as f:
                    f.seek(1 * MiB)
                    assert hashlib.sha256(f.read(1 * MiB)).hexdigest() == sha
                assert "CNA-GUEST-READY" not in serial_log(b, uuid).text()  # the same guest, no boot on B
                ok(chb, vms_b.DeleteVm(vm.DeleteVmRequest(vm=uuid, force=True), timeout=60))
        finally:
            tear_down(agents, two_hosts, base)
    shutil.rmtree(tb_dir, ignore_errors=True)
