"""Releasing kernel-iSCSI / FC LUNs when their last VM goes, on RECORDED sysfs/devfs trees.

The host side is the real cna_agent.storage.san code on the recorded trees of
tests/fixtures/scsi (tools/make-scsi-fixtures.py) with the RecordingRunner, whose effects make
the tree follow what the kernel does (device/delete removes the sdX, multipath -f the map,
iscsiadm --logout the sessions), as in test_storage_san_recorded.py (support/san.py).

The compute side is compute's real parts and the real StorageService wired to each other as the
daemon wires them (cna_agent.wiring.parts: storage sees compute's inventory as its VmDisks, compute
gets storage as its DiskProvider), with a real
OperationRunner and event log on SQLite, and the real Hypervisor on libvirt's embedded QEMU
driver (guests are defined, never started; opening the root probes QEMU, hence an integration
test). libvirt's test driver cannot serve here: it refuses the undefine flags a delete uses
(NVRAM, checkpoint metadata) and device detach. One process may open only one embedded root,
and the pytest process must stay free for its own (the ``embedded_libvirt`` fixture), so each
test re-runs itself in a child pytest (the ``embedded`` fixture) and passes when the child's run
of the same test passes; the assertions, with pytest's messages, run in the child.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import libvirt
import pytest

from cna_agent.compute.inventory import VmInventory
from cna_agent.compute.render import RenderContext
from cna_agent.compute.resolvers import NoNetworkResolver
from cna_agent.compute.spec import DiskSpec, LunSource, VmSpec
from cna_agent.config import AgentConfig, ComputeConfig
from cna_agent.operations import OperationRunner
from cna_agent.state.eventlog import EventHub, EventLog
from cna_agent.state.journal import OperationJournal
from cna_agent.state.store import StateStore
from cna_agent.storage.executor import StorageExecutor
from cna_agent.storage.model import DatastoreDecl, validate_datastore
from cna_agent.storage.runner import RecordingRunner
from cna_agent.storage.san import backends_for
from cna_agent.storage.service import StorageService
from cna_agent.wiring.parts import build_compute
from support.san import FC_WWN, IQN, ISCSI_WWN, Tree, fc_decl, iscsi_decl

REPO = Path(__file__).resolve().parents[2]
P1, P2 = "192.0.2.20:3260", "192.0.2.21:3260"


def node(portal: str, *args: str) -> tuple[str, ...]:
    return ("iscsiadm", "-m", "node", "-T", IQN, "-p", portal, *args)


#: What releasing the recorded iSCSI LUN (map mpatha over sdb and sdc, the target's only LUN,
#: two sessions) must run, in order: flush the map, flush each path, log out of each portal.
ISCSI_RELEASE = [("multipath", "-f", "mpatha"), ("blockdev", "--flushbufs", "/dev/sdb"), ("blockdev", "--flushbufs", "/dev/sdc"),
                 node(P1, "--logout"), node(P1, "-o", "delete"), node(P2, "--logout"), node(P2, "-o", "delete")]


CHILD_ENV = "CNA_TEST_LUN_RELEASE_CHILD"


class Host:
    """Compute's parts and a StorageService on one recorded tree, wired as the daemon wires them."""

    def __init__(self, hv: Any, tmp: Path, decls: tuple[DatastoreDecl, ...], runner: RecordingRunner, tree: Tree, *,
                 store: StateStore | None = None, image_dirs: tuple[str, ...] = (), **storage_kw: Any) -> None:
        self.hv, self.tmp, self.runner, self.tree = hv, tmp, runner, tree
        self.store = store or StateStore(tmp / "agent.db")
        self.events = EventHub(self.store, EventLog(self.store))
        self.ops = OperationRunner(self.store, OperationJournal(self.store), self.events, encode=lambda kind, r: ("", b""))
        inventory = VmInventory(hv, self.ops.locks)
        self.storage = StorageService(decls, runner, StorageExecutor(2, 30), self.ops, self.events, command_timeout=30,
                                      probe_interval=3600, probe_timeout=5, users=inventory,
                                      san_backends=backends_for(decls, runner, str(tree.root)), **storage_kw)
        ctx = RenderContext(host_arch=hv.facts.arch, virt_type="qemu", state_dir=str(tmp / "state"), run_dir=str(tmp / "run"))
        config = AgentConfig(compute=ComputeConfig(image_dirs=",".join(image_dirs), io_error_resume="manual"))
        self.compute = build_compute(config, hv, self.ops, self.events, inventory, ctx, virt_type="qemu", host_cpus=1,
                                     disks=self.storage, ports=NoNetworkResolver(), placer=None)
        self.vms = self.compute.inventory

    async def done(self, record) -> Any:
        for _ in range(600):
            record = await self.ops.get(record.id)
            if record.done:
                return record
            await asyncio.sleep(0.025)
        raise AssertionError(f"operation {record.kind} still {record.state}")

    async def create(self, name: str, *disks: DiskSpec) -> str:
        rec = await self.done(await self.compute.lifecycle.create(VmSpec(name=name, vcpus=1, memory_mib=128, disks=list(disks))))
        assert rec.state == "succeeded", rec.error
        return rec.target

    async def delete(self, name: str) -> Any:
        return await self.done(await self.compute.lifecycle.delete(name))

    async def domains(self) -> list[str]:
        return await self.hv.call(lambda c: sorted(d.name() for d in c.listAllDomains()), timeout=30)

    async def events_of(self, *types: str) -> list[Any]:
        return await self.events.list(0, types=list(types))

    async def close(self) -> None:
        await self.storage.stop()
        await self.ops.shutdown()


class Env:
    """Where a scenario runs (in the child): the real Hypervisor on an embedded QEMU root."""

    def __init__(self, tmp: Path, caps_cache: str) -> None:
        self.tmp = tmp
        self.root = tmp / "lv"
        if caps_cache:
            shutil.copytree(caps_cache, self.root / "cache" / "qemu" / "capabilities")
        self.hv: Any = None

    def host(self, decls: tuple[DatastoreDecl, ...], runner: RecordingRunner, tree: Tree, **kw: Any) -> Host:
        return Host(self.hv, self.tmp, decls, runner, tree, **kw)

    def run(self, scenario) -> None:
        from cna_agent.hypervisor import Hypervisor

        async def main() -> None:
            self.hv = Hypervisor(f"qemu:///embed?root={self.root}")
            await self.hv.start()
            try:
                await scenario(self)
            finally:
                def undefine_all(conn: libvirt.virConnect) -> None:
                    for dom in conn.listAllDomains():
                        dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_NVRAM)

                await self.hv.call(undefine_all, timeout=30)
                await self.hv.stop()

        asyncio.run(main())


@pytest.fixture
def embedded(request, tmp_path):
    """``embedded(scenario)``: in the child, run it on the embedded driver; in the pytest
    process, run this same test in a child pytest and require that it passes."""
    if CHILD_ENV in os.environ:
        env = Env(tmp_path, os.environ[CHILD_ENV])
        return env.run
    if os.geteuid() != 0:
        pytest.skip("the embedded QEMU driver here needs root")
    caps = request.getfixturevalue("libvirt_caps_cache")  # warmed once per session, copied per child

    def run_in_child(scenario) -> None:
        out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"{__file__}::{request.node.name}"],
                             env={**os.environ, CHILD_ENV: str(caps or "")}, cwd=REPO, capture_output=True, text=True,
                             timeout=600)
        assert out.returncode == 0 and re.search(r"^1 passed", out.stdout, re.M), f"child run of {request.node.name}:\n{out.stdout[-8000:]}\n{out.stderr[-2000:]}"

    return run_in_child


def _lun(datastore: str, lun_id: str, **kw: Any) -> DiskSpec:
    return DiskSpec(lun=LunSource(datastore=datastore, lun_id=lun_id), **kw)


def _iscsi_host(env: Env, runner: RecordingRunner | None = None, **kw: Any) -> Host:
    """The recorded iSCSI host with its LUN attached (two sessions, two paths, map mpatha)."""
    tree = Tree(env.tmp / "root", "iscsi", "multipath")
    runner = runner or RecordingRunner()
    runner.on_write = tree.remove_disk_on_delete
    runner.add("multipath", "-f", "mpatha", effect=tree.remove_map("dm-0", "mpatha"))
    runner.add(*node(P1, "--logout"), effect=lambda: shutil.rmtree(tree.root / "sys/class/iscsi_session"))
    return env.host((iscsi_decl(),), runner, tree, **kw)


def _present(tree: Tree) -> dict[str, bool]:
    r = tree.root
    return {"sdb": (r / "sys/block/sdb").exists(), "sdc": (r / "sys/block/sdc").exists(),
            "map": (r / "dev/mapper/mpatha").exists(), "sessions": (r / "sys/class/iscsi_session").exists()}


GONE = {"sdb": False, "sdc": False, "map": False, "sessions": False}
HERE = {"sdb": True, "sdc": True, "map": True, "sessions": True}


def test_recorded_tree_deleting_the_last_vm_removes_map_paths_and_session(embedded):
    async def scenario(env: Env) -> None:
        host = _iscsi_host(env)
        try:
            uuid = await host.create("vm-a", _lun("san1", f"{IQN}/1"))
            mark, wmark = len(host.runner.calls), len(host.runner.writes)

            rec = await host.delete("vm-a")

            assert rec.state == "succeeded", rec.error
            assert await host.domains() == []
            assert host.runner.calls[mark:] == ISCSI_RELEASE
            r = str(host.tree.root)
            assert host.runner.writes[wmark:] == [(f"{r}/sys/block/sdb/device/delete", "1"), (f"{r}/sys/block/sdc/device/delete", "1")]
            assert _present(host.tree) == GONE
            (released,) = await host.events_of("lun.released")
            assert released.severity == "info" and released.resource_id == f"san1:{ISCSI_WWN}"
            assert dict(released.attributes) == {"datastore": "san1", "lun": ISCSI_WWN, "lun_id": f"{IQN}/1", "vm": uuid, "forced": ""}
            assert host.storage.luns.pending_releases == {}
        finally:
            await host.close()

    embedded(scenario)


def test_recorded_tree_lun_shared_by_two_vms_is_kept_until_the_second_goes(embedded):
    async def scenario(env: Env) -> None:
        host = _iscsi_host(env)
        try:
            # The same LUN, spelled "<iqn>/<n>" by one VM and by its WWN by the other.
            await host.create("vm-a", _lun("san1", f"{IQN}/1", shareable=True))
            await host.create("vm-b", _lun("san1", "3" + ISCSI_WWN.upper(), shareable=True))
            mark = len(host.runner.calls)

            assert (await host.delete("vm-a")).state == "succeeded"
            assert host.runner.calls[mark:] == []  # vm-b still uses it: nothing ran
            assert _present(host.tree) == HERE
            assert await host.events_of("lun.released", "lun.release_failed") == []
            assert await host.storage.release_lun("san1", f"{IQN}/1", field="lun", vm="") == "in-use"

            assert (await host.delete("vm-b")).state == "succeeded"
            assert host.runner.calls[mark:] == ISCSI_RELEASE
            assert _present(host.tree) == GONE and await host.domains() == []
            assert [e.attributes["lun_id"] for e in await host.events_of("lun.released")] == ["3" + ISCSI_WWN.upper()]
        finally:
            await host.close()

    embedded(scenario)


def test_recorded_tree_libiscsi_lun_release_does_nothing_on_the_host(embedded):
    async def scenario(env: Env) -> None:
        decl = validate_datastore(DatastoreDecl(name="qsan", type="iscsi", portals=("192.0.2.30",), target_iqn=IQN,
                                                initiator="libiscsi"), "storage.datastores.qsan")
        runner = RecordingRunner().add("qemu-img", "info", stdout='{"virtual-size": 1073741824, "format": "raw"}')
        host = env.host((decl,), runner, Tree(env.tmp / "root", "iscsi", "before"))
        try:
            await host.create("vm-q", _lun("qsan", "1"))
            assert runner.calls and all(c[:2] == ("qemu-img", "info") for c in runner.calls)  # QEMU's own initiator
            mark = len(runner.calls)
            assert (await host.delete("vm-q")).state == "succeeded"
            assert await host.storage.release_lun("qsan", "1", field="lun", vm="") == "not-needed"
            assert runner.calls[mark:] == [] and runner.writes == []
            assert await host.events_of("lun.") == []
        finally:
            await host.close()

    embedded(scenario)


def test_recorded_tree_release_that_times_out_lets_the_delete_succeed_and_is_retried(embedded):
    async def scenario(env: Env) -> None:
        gate = threading.Event()
        tree_box: list[Tree] = []

        def hung_flush() -> None:  # multipath -f on a SAN that stopped answering
            gate.wait(20)
            tree_box[0].remove_map("dm-0", "mpatha")()

        host = _iscsi_host(env, RecordingRunner().add("multipath", "-f", "mpatha", effect=hung_flush), lun_release_timeout=0.5)
        tree_box.append(host.tree)
        try:
            uuid = await host.create("vm-a", _lun("san1", f"{IQN}/1"))

            rec = await host.delete("vm-a")

            assert rec.state == "succeeded" and await host.domains() == []
            (failed,) = await host.events_of("lun.release_failed")
            assert failed.severity == "error" and failed.attributes["datastore"] == "san1"
            assert failed.attributes["lun"] == f"{IQN}/1" and failed.attributes["vm"] == uuid
            assert "did not finish within 0.5s" in failed.attributes["reason"]
            assert f"{IQN}/1" in failed.message and "san1" in failed.message
            assert list(host.storage.luns.pending_releases) == [("san1", f"{IQN}/1")]

            gate.set()  # the SAN answers again; the stuck release finishes, holding the datastore lock
            assert await host.storage.luns.retry_releases("san1") == {("san1", f"{IQN}/1"): "absent"}
            assert host.runner.commands("iscsiadm")[-4:] == ISCSI_RELEASE[-4:]  # the stuck thread went on to log out
            assert _present(host.tree) == GONE and host.storage.luns.pending_releases == {}
        finally:
            gate.set()
            await host.close()

    embedded(scenario)


def _failing_logout(runner: RecordingRunner) -> RecordingRunner:
    return runner.add(*node(P1, "--logout"), returncode=1, times=1,
                      stderr="iscsiadm: Could not logout of all requested sessions")


LOGOUT = [node(P1, "--logout"), node(P1, "-o", "delete"), node(P2, "--logout"), node(P2, "-o", "delete")]


def test_recorded_tree_failed_release_is_reported_then_retried_by_the_rescan(embedded):
    async def scenario(env: Env) -> None:
        host = _iscsi_host(env, _failing_logout(RecordingRunner()))
        try:
            await host.create("vm-a", _lun("san1", f"{IQN}/1"))

            assert (await host.delete("vm-a")).state == "succeeded"
            (failed,) = await host.events_of("lun.release_failed")
            assert "Could not logout" in failed.attributes["reason"]
            assert {k: v for k, v in _present(host.tree).items() if k != "sdc"} == {"sdb": False, "map": False, "sessions": True}
            mark = len(host.runner.calls)

            rec = await host.done(await host.storage.rescan_datastore("san1"))

            assert rec.state == "succeeded", rec.error
            r = str(host.tree.root)
            assert (f"{r}/sys/class/scsi_host/host3/scan", "0 0 -") in host.runner.writes  # the rescan ran first
            assert host.runner.calls[mark:] == LOGOUT  # then the owed release: the idle sessions go
            assert _present(host.tree) == GONE and host.storage.luns.pending_releases == {}
            assert [e.attributes["lun_id"] for e in await host.events_of("lun.released")] == [f"{IQN}/1"]
        finally:
            await host.close()

    embedded(scenario)


def test_recorded_tree_owed_release_survives_an_agent_restart(embedded):
    async def scenario(env: Env) -> None:
        host = _iscsi_host(env, _failing_logout(RecordingRunner()))
        try:
            await host.create("vm-a", _lun("san1", f"{IQN}/1"))
            assert (await host.delete("vm-a")).state == "succeeded"
            assert len(await host.events_of("lun.release_failed")) == 1
        finally:
            await host.close()

        # The next agent process: the same state database and host, nothing in memory.
        again = env.host((iscsi_decl(),), host.runner, host.tree, store=host.store)
        try:
            mark = len(host.runner.calls)
            await again.storage.start()
            for _ in range(400):
                if again.storage.luns.pending_releases == {} and await again.events_of("lun.released"):
                    break
                await asyncio.sleep(0.025)
            assert host.runner.calls[mark:] == LOGOUT
            assert _present(host.tree) == GONE and again.storage.luns.pending_releases == {}
        finally:
            await again.close()

    embedded(scenario)


def test_recorded_tree_lun_bound_for_a_vm_being_defined_is_kept_until_that_vm_lets_go(embedded):
    """compute binds a LUN, then defines the VM: in between no domain names the LUN, so a
    release by another VM must not take it away (a running VM would lose its disk by force).
    The binding VM claims it; its own release (here: its define failed) takes it away."""

    async def scenario(env: Env) -> None:
        host = _iscsi_host(env)
        vm_b = "0c4f6a2e-0000-4000-8000-0000000000b2"
        try:
            await host.create("vm-a", _lun("san1", f"{IQN}/1"))
            # vm-b's create has bound the same LUN and is about to define vm-b.
            await host.storage.resolve_lun("san1", ISCSI_WWN, field="spec.disks[0].lun", vm=vm_b)
            mark = len(host.runner.calls)

            assert (await host.delete("vm-a")).state == "succeeded"

            assert host.runner.calls[mark:] == [] and _present(host.tree) == HERE
            assert await host.events_of("lun.released", "lun.release_failed") == []
            assert host.storage.luns.claims == {("san1", ISCSI_WWN): {vm_b}}
            assert host.storage.luns.pending_releases == {}  # nothing owed: vm-b's own release decides

            # vm-b's define failed: compute drops its claim, and now nobody holds the LUN.
            assert await host.storage.release_lun("san1", ISCSI_WWN, field="spec.disks[0].lun", vm=vm_b) == "released"
            assert host.runner.calls[mark:] == ISCSI_RELEASE and _present(host.tree) == GONE
            assert host.storage.luns.claims == {}
        finally:
            await host.close()

    embedded(scenario)


def test_recorded_tree_a_create_whose_define_fails_releases_the_lun_it_bound(embedded):
    async def scenario(env: Env) -> None:
        host = _iscsi_host(env)
        try:
            await host.create("vm-x")  # takes the name
            mark = len(host.runner.calls)

            rec = await host.done(await host.compute.lifecycle.create(
                VmSpec(name="vm-x", vcpus=1, memory_mib=128, disks=[_lun("san1", f"{IQN}/1")])))

            assert rec.state == "failed" and rec.error.code == 6, rec.error  # ALREADY_EXISTS
            assert await host.domains() == ["vm-x"]
            # The LUN was logged in and mapped for the failed VM; nobody holds it now: it goes.
            assert host.runner.calls[mark:][-len(ISCSI_RELEASE):] == ISCSI_RELEASE
            assert _present(host.tree) == GONE and host.storage.luns.claims == {}
            (released,) = await host.events_of("lun.released")
            assert released.attributes["vm"] == rec.target
        finally:
            await host.close()

    embedded(scenario)


def test_recorded_tree_detaching_a_fc_lun_disk_releases_the_lun(embedded):
    async def scenario(env: Env) -> None:
        image = env.tmp / "images" / "root.raw"
        image.parent.mkdir()
        image.write_bytes(b"\0" * 1024 * 1024)
        tree = Tree(env.tmp / "root", "fc", "multipath")
        runner = RecordingRunner(on_write=tree.remove_disk_on_delete)
        runner.add("multipath", "-f", "mpathb", effect=tree.remove_map("dm-1", "mpathb"))
        host = env.host((fc_decl(),), runner, tree, image_dirs=(str(image.parent),))
        try:
            uuid = await host.create("vm-fc", DiskSpec(volume=str(image), boot_order=1), _lun("fc1", FC_WWN))
            target = (await host.vms.get("vm-fc")).spec.disks[1].target
            mark, wmark = len(runner.calls), len(runner.writes)

            rec = await host.done(await host.compute.disks.detach("vm-fc", target))

            assert rec.state == "succeeded", rec.error
            xml = await host.hv.call(lambda c: c.lookupByName("vm-fc").XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE), timeout=30)
            assert "mpathb" not in xml and str(image) in xml
            assert [d.volume for d in (await host.vms.get("vm-fc")).spec.disks] == [str(image)]
            assert runner.calls[mark:] == [("multipath", "-f", "mpathb"), ("blockdev", "--flushbufs", "/dev/sdd"),
                                           ("blockdev", "--flushbufs", "/dev/sde")]  # FC: no session to log out
            r = str(tree.root)
            assert runner.writes[wmark:] == [(f"{r}/sys/block/sdd/device/delete", "1"), (f"{r}/sys/block/sde/device/delete", "1")]
            assert host.storage.luns.san["fc1"].lun_info(FC_WWN) is None
            (released,) = await host.events_of("lun.released")
            assert (released.attributes["datastore"], released.attributes["lun"], released.attributes["vm"]) == ("fc1", FC_WWN, uuid)

            mark = len(runner.calls)
            assert (await host.delete("vm-fc")).state == "succeeded"
            assert runner.calls[mark:] == []  # no LUN disk left: nothing more to release
        finally:
            await host.close()

    embedded(scenario)
