"""Faults of the array and the switch database, for benchmarks/faults.py: tgtd (the iSCSI array
the agent's SAN datastore points at) killed or frozen while a LUN is attached to a running guest
or a VM is created on one, and ovsdb-server killed and started again while a port group moves
its VIFs to another VLAN.

The agent is not killed: it must end each operation with the truth (SUCCEEDED exactly when
the effect is there, judged from the embedded libvirt's definition files and from OVSDB read
with ovs-vsctl), and leave nothing behind once the point's VMs, port groups and bridges are
deleted: no OVS bridge, no iSCSI session left on the array (tgtadm's I_T nexus list), besides
what fault_node counts. The daemons are the testbed's (tools/testbed.py, in a run directory of
this run's own): a tgtd on 127.0.0.1:3260 with one 64 MiB LUN, and an ovsdb-server with a
userspace-datapath ovs-vswitchd. What the kernel here lacks (the SCSI layer) is not needed: the
SAN datastore uses QEMU's libiscsi, as on hosts that attach LUNs without the kernel initiator.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks.fault_daemons import FaultPoint
from benchmarks.fault_points import Ctx
from cna_agent.api import pb
from support.procs import proc_argvs
from support.tools import load_tool

vm, S, N = pb.vm_pb2, pb.storage_pb2, pb.network_pb2
SAN_IQN = "iqn.2026-12.test.cna:faults"
OVS_BRIDGE = "cnafovs"
PORT_GROUP = "pgfovs"
#: How long a frozen array stays frozen (an array failing over, a path flapping).
FROZEN_S = 20.0


class Deps:
    """tgtd and Open vSwitch for these points, started for them and stopped after."""

    def __init__(self, base: Path) -> None:
        self.mod = load_tool("cna_testbed", "testbed.py")
        self.tb = self.mod.Testbed(base / "tb")
        self.tb.up(["tgtd", "ovs"])
        self.lun = base / "lun1.raw"
        with self.lun.open("wb") as f:
            f.truncate(64 << 20)
        self.tb.iscsi_create_target(SAN_IQN, [self.lun])
        self._thaw: threading.Timer | None = None

    def config(self) -> str:
        return (f'[network]\novsdb = "{self.tb.ovsdb_remote}"\novsdb_timeout_s = 5.0\nreconcile_interval_s = 3\n'
                f'[storage.datastores.fsan]\ntype = "iscsi"\nportals = ["{self.tb.iscsi_portal}"]\n'
                f'target_iqn = "{SAN_IQN}"\ninitiator = "libiscsi"\nscan_timeout_s = 10.0\n')

    # -- the array ----------------------------------------------------------------------------------

    def tgtd_pid(self) -> int:
        port = str(self.mod.TGT_CONTROL_PORT).encode()
        return next(pid for pid, argv in proc_argvs() if os.path.basename(argv[0]) == b"tgtd" and port in argv)

    def kill_tgtd(self) -> None:
        pid = self.tgtd_pid()
        os.kill(pid, signal.SIGKILL)
        _gone(pid)

    def kill_tgtd_for(self, seconds: float) -> None:
        """An array that dies and is back ``seconds`` later (longer than the agent's 60 s
        deadline for a hot-plug: a plug that completes late must not have been reported failed)."""
        self.kill_tgtd()
        self._thaw = threading.Timer(seconds, self.restart_tgtd)
        self._thaw.start()

    def restart_tgtd(self) -> None:
        """Up again with the same target and LUN (tgtd keeps its targets in memory only)."""
        if not self.tb.status()["tgtd"]["answers"]:
            self.tb.up(["tgtd"])
            self.tb.iscsi_create_target(SAN_IQN, [self.lun])

    def freeze_tgtd(self) -> None:
        pid = self.tgtd_pid()
        os.kill(pid, signal.SIGSTOP)
        self._thaw = threading.Timer(FROZEN_S, lambda: os.kill(pid, signal.SIGCONT))
        self._thaw.start()

    def thaw_tgtd(self) -> None:
        """Wait for the array to come back (the timer sends SIGCONT, or restarts tgtd)."""
        if self._thaw is not None:
            self._thaw.join()
            self._thaw = None

    def sessions(self) -> set[str]:
        """The initiators logged in to the target (tgtadm's I_T nexus lines)."""
        out = subprocess.run(["tgtadm", "-C", str(self.mod.TGT_CONTROL_PORT), "--lld", "iscsi", "--mode", "target",
                              "--op", "show"], capture_output=True, text=True, timeout=30).stdout
        return {f"nexus {m}" for m in re.findall(r"I_T nexus: (\d+)", out)}

    # -- the switch database ------------------------------------------------------------------------

    def vsctl(self, *args: str) -> str:
        p = subprocess.run(["ovs-vsctl", f"--db={self.tb.ovsdb_remote}", "--timeout=20", *args],
                           capture_output=True, text=True, timeout=30)
        return p.stdout.strip() if p.returncode == 0 else ""

    def kill_ovsdb(self) -> None:
        """SIGKILL ovsdb-server (start_ovsdb starts it again on the same database file;
        ovs-vswitchd and the agent reconnect by themselves)."""
        d = self.tb.ovs_dir
        pid = int((d / "ovsdb-server.pid").read_text().strip())
        os.kill(pid, signal.SIGKILL)
        _gone(pid)
        (d / "db.sock").unlink(missing_ok=True)

    def start_ovsdb(self) -> None:
        self.tb.up(["ovs"])

    def bridges(self) -> set[str]:
        return {b for b in self.vsctl("list-br").split() if b.startswith("cnaf")}

    def ports(self) -> set[str]:
        """Every port on the suite's OVS bridges but each bridge's own internal port."""
        return {f"{br}/{p}" for br in self.bridges() for p in self.vsctl("list-ports", br).split()}

    def tags(self, bridge: str) -> dict[str, str]:
        return {port: self.vsctl("get", "Port", port, "tag") for port in self.vsctl("list-ports", bridge).split()}

    def close(self) -> None:
        self.thaw_tgtd()
        try:
            self.restart_tgtd()
            self.tb.iscsi_delete_target(SAN_IQN)
        finally:
            for br in self.bridges():
                self.vsctl("--if-exists", "del-br", br)
            self.tb.down()


def _gone(pid: int) -> None:
    for _ in range(100):
        if not Path(f"/proc/{pid}").exists():
            return
        time.sleep(0.05)


def _deps(c: Ctx) -> Deps:
    return c.deps  # type: ignore[attr-defined]  (set by faults.deps_matrix)


LUN = vm.DiskSpec(lun=vm.LunSource(datastore="fsan", lun_id=f"{SAN_IQN}/1"))


def deps_points() -> list[FaultPoint]:
    def running(name: str):
        return lambda c: {"name": name, "uuid": c.new_vm(name, start=True)}

    def attach(c: Ctx, s: dict[str, Any]) -> Any:
        return c.storage.AttachDisk(S.AttachDiskRequest(request_id=s["rid"], vm=s["uuid"], disk=LUN), timeout=120)

    def has_lun(c: Ctx, s: dict[str, Any]) -> bool:
        return SAN_IQN in c.persistent_xml(s["name"])

    def create(c: Ctx, s: dict[str, Any]) -> Any:
        spec = c.guest("x86_64", s["name"], memory_mib=128, disks=[LUN])
        return c.vms.CreateVm(vm.CreateVmRequest(request_id=s["rid"], spec=spec, start=True), timeout=120)

    def on_ovs(c: Ctx) -> dict[str, Any]:
        d = _deps(c)
        c.ok(c.net.EnsureBridge(N.EnsureBridgeRequest(bridge=N.Bridge(name=OVS_BRIDGE, type=N.BRIDGE_TYPE_OVS,
                                                                      datapath_type="netdev")), timeout=60))
        c.ok(c.net.EnsurePortGroup(N.EnsurePortGroupRequest(port_group=N.PortGroup(name=PORT_GROUP, bridge=OVS_BRIDGE,
                                                                                  vlan=10)), timeout=60))
        uuid = c.new_vm("fovsvm", start=True, nics=(PORT_GROUP,))
        deadline = time.monotonic() + 60
        while set(d.tags(OVS_BRIDGE).values()) != {"10"}:
            assert time.monotonic() < deadline, f"the VM's port never got tag 10: {d.tags(OVS_BRIDGE)}"
            time.sleep(0.3)
        return {"name": "fovsvm", "uuid": uuid}

    def retag(c: Ctx, s: dict[str, Any]) -> Any:
        return c.net.EnsurePortGroup(N.EnsurePortGroupRequest(request_id=s["rid"], port_group=N.PortGroup(
            name=PORT_GROUP, bridge=OVS_BRIDGE, vlan=20)), timeout=120)

    def retagged(c: Ctx, s: dict[str, Any]) -> bool:
        declared = json.dumps(c.declared())
        tags = _deps(c).tags(OVS_BRIDGE)
        return bool(tags) and set(tags.values()) == {"20"} and '"vlan": 20' in declared

    def defined_only(c: Ctx, s: dict[str, Any]) -> bool:
        return c.defined(s["name"]) and c.status(s["name"]) != "running"

    down = ("UNAVAILABLE", "DEADLINE_EXCEEDED")
    kill = dict(breaker=lambda c, s: _deps(c).kill_tgtd(), mend=lambda c, s: _deps(c).restart_tgtd(), group="tgtd",
                refused_as=down)
    freeze = dict(breaker=lambda c, s: _deps(c).freeze_tgtd(), mend=lambda c, s: _deps(c).thaw_tgtd(), group="tgtd",
                  refused_as=down)
    return [
        # killed a moment into the attach (LUN listing, libvirt's attach, QEMU's login: whichever
        # it is in), and down for the whole of one (restarted 3 s into it)
        FaultPoint("tgtd-kill:vm.disk.attach", "vm.disk.attach", running("fsanatt"), attach, has_lun, delay=0.03,
                   settle=5.0, **{**kill, "breaker": lambda c, s: _deps(c).kill_tgtd_for(70.0),
                                  "mend": lambda c, s: _deps(c).thaw_tgtd()}),
        FaultPoint("tgtd-down:vm.disk.attach", "vm.disk.attach", running("fsandown"), attach, has_lun, delay=3.0,
                   settle=5.0, break_first=True, **kill),
        # frozen (SIGSTOP) before the request and for FROZEN_S: logins and reads hang, not fail
        FaultPoint("tgtd-frozen:vm.disk.attach", "vm.disk.attach", running("fsanfrz"), attach, has_lun, delay=0.0,
                   settle=10.0, break_first=True, **freeze),
        FaultPoint("tgtd-kill:vm.create", "vm.create", lambda c: {"name": "fsancreate"}, create,
                   lambda c, s: c.status(s["name"]) == "running", delay=0.1, partial=defined_only, settle=5.0, **kill),
        # ovsdb-server down when the re-tag comes, started again 2 s into it
        FaultPoint("ovsdb-restart:network.port_group.ensure", "network.port_group.ensure", on_ovs, retag, retagged,
                   delay=2.0, settle=15.0, break_first=True, breaker=lambda c, s: _deps(c).kill_ovsdb(),
                   mend=lambda c, s: _deps(c).start_ovsdb(), group="ovsdb"),
    ]
