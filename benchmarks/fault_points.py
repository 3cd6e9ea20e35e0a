"""The fault matrix of benchmarks/faults.py: where the agent is killed, and how each point is judged.

Each point names a crash point (cna_agent/failpoints.py: the runner's ``<kind>:started`` and
``<kind>:done`` for every operation kind, and the named steps inside a flow), prepares what the
operation needs on the armed agent, sends the request that reaches the crash point, and says,
from outside the agent, whether the operation's effect is there: the domain XML files of the
embedded libvirt, QEMU processes in /proc, qemu-img/qemu-io on the volume files, the datastore
directories. faults.py compares that with the operation's outcome after the restart.
"""

from __future__ import annotations

import json
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from cna_agent.api import pb

vm, S, N = pb.vm_pb2, pb.storage_pb2, pb.network_pb2
MIB = 1 << 20
#: Linux bridges the network points declare start with this (at most 15 bytes in all).
BRIDGE_PREFIX = "cnaf"


@dataclass
class Point:
    failpoint: str
    #: Runs on the armed agent first; returns what the request and the judge need.
    prepare: Callable[["Ctx"], dict[str, Any]]
    #: Sends the request that reaches the crash point (the agent dies during or after it).
    request: Callable[["Ctx", dict[str, Any]], Any]
    #: From outside the agent: is the operation's effect there now?
    effect: Callable[["Ctx", dict[str, Any]], bool]
    quick: bool = False
    #: Prepare on an unarmed agent first (the preparation runs the point's own kind).
    prepare_unarmed: bool = False

    @property
    def kind(self) -> str:
        return KIND_OF.get(self.failpoint, self.failpoint.split(":")[0])


#: Named steps inside a flow, by operation kind.
KIND_OF = {"vm.disk.attach.plugged": "vm.disk.attach", "volume.placed": "volume.create"}


class Ctx:
    """What a point sees: the agent's stubs and the files an outside observer can read."""

    def __init__(self, base: Path, etc: Path, run: Path, guest: Callable[..., Any]) -> None:
        self.base = base
        self.ds = base / "ds"
        self.imp = base / "imp"
        self.small = base / "small"
        #: libvirt's persistent definitions and live status files (embedded root or /etc, /run).
        self.etc, self.run = etc, run
        self.guest = guest
        self.channel: Any = None  # set by faults.py for each agent process

    # -- stubs -----------------------------------------------------------------------------------

    @property
    def vms(self) -> Any:
        return pb.vm_pb2_grpc.VmServiceStub(self.channel)

    @property
    def storage(self) -> Any:
        return pb.storage_pb2_grpc.StorageServiceStub(self.channel)

    def ok(self, op: Any, into: Any = None, timeout: float = 120) -> Any:
        from support.operations import ok

        return ok(self.channel, op, timeout, into=into)

    def new_vm(self, name: str, *, start: bool = False, disks: tuple[str, ...] = (), nics: tuple[str, ...] = ()) -> str:
        """``disks``: volume ids; ``nics``: port groups, one NIC in each."""
        spec = self.guest("x86_64", name, memory_mib=128, disks=[vm.DiskSpec(volume=d) for d in disks],
                          nics=[vm.NicSpec(port_group=p) for p in nics])
        return self.ok(self.vms.CreateVm(vm.CreateVmRequest(spec=spec, start=start), timeout=60), into=vm.Vm()).uuid

    @property
    def net(self) -> Any:
        return pb.network_pb2_grpc.NetworkServiceStub(self.channel)

    def new_bridge(self, name: str) -> None:
        self.ok(self.net.EnsureBridge(N.EnsureBridgeRequest(bridge=N.Bridge(name=name, type=N.BRIDGE_TYPE_LINUX)), timeout=60))

    def new_port_group(self, name: str, bridge: str) -> None:
        self.ok(self.net.EnsurePortGroup(N.EnsurePortGroupRequest(port_group=N.PortGroup(name=name, bridge=bridge)), timeout=60))

    def link_exists(self, name: str) -> bool:
        return Path("/sys/class/net", name).exists()

    def declared(self) -> dict[str, Any]:
        """The agent's declaration store on disk (state/network/declared.json)."""
        try:
            return json.loads((self.base / "agent" / "state" / "network" / "declared.json").read_text())
        except FileNotFoundError:
            return {"bridges": [], "port_groups": []}

    def port_group_declared(self, name: str, guarded: bool | None = None) -> bool:
        """Whether the store declares port group ``name`` (with MAC anti-spoofing on or off)."""
        return any(p["name"] == name and (guarded is None or p["mac_anti_spoofing"] == guarded)
                   for p in self.declared()["port_groups"])

    def new_volume(self, path: str, size_mib: int = 16) -> str:
        req = S.CreateVolumeRequest(datastore="ds", path=path, format=pb.storage_pb2.VOLUME_FORMAT_QCOW2,
                                    size_bytes=size_mib * MIB)
        return self.ok(self.storage.CreateVolume(req, timeout=60), into=S.Volume()).id

    # -- outside views ---------------------------------------------------------------------------

    def defined(self, name: str) -> bool:
        return (self.etc / f"{name}.xml").exists()

    def persistent_xml(self, name: str) -> str:
        try:
            return (self.etc / f"{name}.xml").read_text()
        except FileNotFoundError:
            return ""

    def status(self, name: str) -> str:
        """libvirt's live status file: the domain's state ("running", "paused"), or "" when it
        does not run."""
        try:
            text = (self.run / f"{name}.xml").read_text()
        except FileNotFoundError:
            return ""
        m = re.search(r"<domstatus state='(\w+)'", text)
        return m.group(1) if m else ""

    def volume_file(self, path: str) -> Path:
        return self.ds / path

    def virtual_size(self, file: Path) -> int:
        out = subprocess.run(["qemu-img", "info", "-U", "--output=json", str(file)], capture_output=True, text=True,
                             timeout=60, check=True).stdout
        return int(json.loads(out)["virtual-size"])

    def internal_snapshots(self, file: Path) -> list[str]:
        out = subprocess.run(["qemu-img", "snapshot", "-U", "-l", str(file)], capture_output=True, text=True,
                             timeout=60, check=True).stdout
        return [line.split()[1] for line in out.splitlines()[2:] if len(line.split()) > 1]

    def qemu_io(self, file: Path, command: str, *, read_only: bool) -> bool:
        args = ["qemu-io", "-f", "qcow2", *(["-r", "-U"] if read_only else []), "-c", command, str(file)]
        r = subprocess.run(args, capture_output=True, text=True, timeout=60)
        return r.returncode == 0 and "Pattern verification failed" not in r.stdout + r.stderr


def _rid(p: str) -> str:
    return "flt-" + re.sub(r"[^a-z0-9]+", "-", p.lower())


def _vm_name(fp: str) -> str:
    return "f" + re.sub(r"[^a-z0-9]+", "", fp.lower())[-14:]


# -- the points ------------------------------------------------------------------------------------


def _create(fp: str, quick: bool = False) -> Point:
    name = _vm_name(fp)
    return Point(fp, lambda c: {"name": name},
                 lambda c, s: c.vms.CreateVm(vm.CreateVmRequest(request_id=_rid(fp), spec=c.guest("x86_64", name, memory_mib=128)),
                                             timeout=60),
                 lambda c, s: c.defined(name), quick)


def _on_vm(fp: str, request: Callable[[Ctx, dict[str, Any]], Any], effect: Callable[[Ctx, dict[str, Any]], bool], *,
           start: bool = False, disk: bool = False, then: Callable[[Ctx, dict[str, Any]], None] | None = None,
           quick: bool = False) -> Point:
    name = _vm_name(fp)

    def prepare(c: Ctx) -> dict[str, Any]:
        s: dict[str, Any] = {"name": name}
        if disk:
            s["volume"] = c.new_volume(f"{name}/d.qcow2")
            s["file"] = c.volume_file(f"{name}/d.qcow2")
        s["uuid"] = c.new_vm(name, start=start, disks=(s["volume"],) if disk else ())
        if then is not None:
            then(c, s)
        return s

    return Point(fp, prepare, request, effect, quick)


def _volume(fp: str, request: Callable[[Ctx, dict[str, Any]], Any], effect: Callable[[Ctx, dict[str, Any]], bool], *,
            source: bool = False, raw_import: bool = False, quick: bool = False) -> Point:
    tag = _vm_name(fp)

    def prepare(c: Ctx) -> dict[str, Any]:
        s: dict[str, Any] = {"tag": tag, "path": f"{tag}/v.qcow2"}
        if source:
            s["source"] = c.new_volume(f"{tag}/src.qcow2")
        if raw_import:
            (c.imp / tag).mkdir(exist_ok=True)
            subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(c.imp / tag / "in.raw"), "16M"], check=True, timeout=60)
        return s

    return Point(fp, prepare, request, effect, quick)


def _paused_first(c: Ctx, s: dict[str, Any]) -> None:
    c.ok(c.vms.PauseVm(vm.VmActionRequest(vm=s["uuid"]), timeout=60))


def _attached_first(c: Ctx, s: dict[str, Any]) -> None:
    s["extra"] = c.new_volume(f"{s['name']}/x.qcow2")
    c.ok(c.storage.AttachDisk(S.AttachDiskRequest(vm=s["uuid"], disk=vm.DiskSpec(volume=s["extra"])), timeout=60))
    s["target"] = [d.target for d in c.vms.GetVm(vm.GetVmRequest(vm=s["uuid"]), timeout=30).spec.disks
                   if d.volume == s["extra"]][0]


def _snapshot_first(c: Ctx, s: dict[str, Any]) -> None:
    c.ok(c.vms.CreateSnapshot(vm.CreateSnapshotRequest(vm=s["uuid"], name="s1"), timeout=60))


def _two_snapshots(c: Ctx, s: dict[str, Any]) -> None:
    """s1, then a pattern written into the disk, then s2 (current): a revert to s1 takes the
    pattern away again, which qemu-io reads from outside."""
    _snapshot_first(c, s)
    assert c.qemu_io(s["file"], "write -P 0xab 0 64k", read_only=False)
    c.ok(c.vms.CreateSnapshot(vm.CreateSnapshotRequest(vm=s["uuid"], name="s2"), timeout=60))


def _attach(fp: str, quick: bool = False) -> Point:
    def request(c: Ctx, s: dict[str, Any]) -> Any:
        s["extra"] = c.new_volume(f"{s['name']}/x.qcow2")
        return c.storage.AttachDisk(S.AttachDiskRequest(request_id=_rid(fp), vm=s["uuid"], disk=vm.DiskSpec(volume=s["extra"])),
                                    timeout=60)

    return _on_vm(fp, request, lambda c, s: f"{s['name']}/x.qcow2" in c.persistent_xml(s["name"]), quick=quick)


def _detach(fp: str) -> Point:
    return _on_vm(fp, lambda c, s: c.storage.DetachDisk(S.DetachDiskRequest(request_id=_rid(fp), vm=s["uuid"], target=s["target"]),
                                                        timeout=60),
                  lambda c, s: f"{s['name']}/x.qcow2" not in c.persistent_xml(s["name"]), then=_attached_first)


def _snap_create(fp: str, quick: bool = False) -> Point:
    return _on_vm(fp, lambda c, s: c.vms.CreateSnapshot(vm.CreateSnapshotRequest(request_id=_rid(fp), vm=s["uuid"], name="s1"),
                                                        timeout=60),
                  lambda c, s: "s1" in c.internal_snapshots(s["file"]), disk=True, quick=quick)


def _vol_create(fp: str, quick: bool = False) -> Point:
    def request(c: Ctx, s: dict[str, Any]) -> Any:
        return c.storage.CreateVolume(S.CreateVolumeRequest(request_id=_rid(fp), datastore="ds", path=s["path"],
                                                            format=pb.storage_pb2.VOLUME_FORMAT_QCOW2, size_bytes=16 * MIB),
                                      timeout=60)

    return _volume(fp, request, lambda c, s: c.volume_file(s["path"]).exists(), quick=quick)


def _vol_delete(fp: str) -> Point:
    return _volume(fp, lambda c, s: c.storage.DeleteVolume(S.DeleteVolumeRequest(request_id=_rid(fp), id=s["source"]), timeout=60),
                   lambda c, s: not c.volume_file(f"{s['tag']}/src.qcow2").exists(), source=True)


def _network(fp: str, request: Callable[[Ctx, dict[str, Any]], Any], effect: Callable[[Ctx, dict[str, Any]], bool], *,
             bridge: bool = False, port_group: bool = False) -> Point:
    br = BRIDGE_PREFIX + re.sub(r"[^a-z0-9]+", "", fp.lower())[-6:]

    def prepare(c: Ctx) -> dict[str, Any]:
        if bridge or port_group:
            c.new_bridge(br)
        if port_group:
            c.new_port_group(f"pg{br}", br)
        return {"bridge": br, "pg": f"pg{br}"}

    return Point(fp, prepare, request, effect, prepare_unarmed=port_group)


def network_points() -> list[Point]:
    def ensure_bridge(fp: str) -> Callable[[Ctx, dict[str, Any]], Any]:
        return lambda c, s: c.net.EnsureBridge(N.EnsureBridgeRequest(request_id=_rid(fp), bridge=N.Bridge(
            name=s["bridge"], type=N.BRIDGE_TYPE_LINUX)), timeout=60)

    def ensure_pg(fp: str) -> Callable[[Ctx, dict[str, Any]], Any]:
        return lambda c, s: c.net.EnsurePortGroup(N.EnsurePortGroupRequest(request_id=_rid(fp), port_group=N.PortGroup(
            name=s["pg"], bridge=s["bridge"], mac_anti_spoofing=True)), timeout=60)

    return [
        _network("network.bridge.ensure:started", ensure_bridge("network.bridge.ensure:started"),
                 lambda c, s: c.link_exists(s["bridge"])),
        _network("network.bridge.ensure:done", ensure_bridge("network.bridge.ensure:done"),
                 lambda c, s: c.link_exists(s["bridge"])),
        _network("network.port_group.ensure:started", ensure_pg("network.port_group.ensure:started"),
                 lambda c, s: c.port_group_declared(s["pg"], guarded=True), port_group=True),
        _network("network.port_group.ensure:done", ensure_pg("network.port_group.ensure:done"),
                 lambda c, s: c.port_group_declared(s["pg"], guarded=True), port_group=True),
        _network("network.port_group.delete:done", lambda c, s: c.net.DeletePortGroup(N.DeletePortGroupRequest(
            request_id=_rid("network.port_group.delete:done"), name=s["pg"]), timeout=60),
            lambda c, s: not c.port_group_declared(s["pg"]), port_group=True),
        _network("network.bridge.delete:done", lambda c, s: c.net.DeleteBridge(N.DeleteBridgeRequest(
            request_id=_rid("network.bridge.delete:done"), name=s["bridge"]), timeout=60),
            lambda c, s: not c.link_exists(s["bridge"]), bridge=True),
    ]


def matrix() -> list[Point]:
    qos = vm.IoQos(total_iops_sec=321)
    points = [
        _create("vm.create:started"), _create("vm.create:done", quick=True),
        _on_vm("vm.start:started", lambda c, s: c.vms.StartVm(vm.VmActionRequest(request_id=_rid("vm.start:started"), vm=s["uuid"]), timeout=60),
               lambda c, s: c.status(s["name"]) == "running"),
        _on_vm("vm.start:done", lambda c, s: c.vms.StartVm(vm.VmActionRequest(request_id=_rid("vm.start:done"), vm=s["uuid"]), timeout=60),
               lambda c, s: c.status(s["name"]) == "running"),
    ]
    for fp in ("vm.shutdown:started", "vm.shutdown:done"):
        points.append(_on_vm(fp, lambda c, s, fp=fp: c.vms.ShutdownVm(vm.ShutdownVmRequest(request_id=_rid(fp), vm=s["uuid"], hard=True),
                                                                      timeout=60),
                             lambda c, s: c.status(s["name"]) == "", start=True))
    points.append(_on_vm("vm.pause:done", lambda c, s: c.vms.PauseVm(vm.VmActionRequest(request_id=_rid("vm.pause:done"), vm=s["uuid"]),
                                                                     timeout=60),
                         lambda c, s: c.status(s["name"]) == "paused", start=True))
    points.append(_on_vm("vm.resume:done", lambda c, s: c.vms.ResumeVm(vm.VmActionRequest(request_id=_rid("vm.resume:done"), vm=s["uuid"]),
                                                                       timeout=60),
                         lambda c, s: c.status(s["name"]) == "running", start=True, then=_paused_first))
    for fp in ("vm.delete:started", "vm.delete:done"):
        points.append(_on_vm(fp, lambda c, s, fp=fp: c.vms.DeleteVm(vm.DeleteVmRequest(request_id=_rid(fp), vm=s["uuid"], force=True),
                                                                    timeout=60),
                             lambda c, s: not c.defined(s["name"]), quick=fp.endswith("done")))
    for fp in ("vm.update:started", "vm.update:done"):
        points.append(_on_vm(fp, lambda c, s, fp=fp: c.vms.UpdateVm(vm.UpdateVmRequest(
            request_id=_rid(fp), vm=s["uuid"], spec=vm.VmSpec(memory_mib=160), update_mask=["memory_mib"]), timeout=60),
            lambda c, s: f">{160 * 1024}</memory>" in c.persistent_xml(s["name"])))
    points += [_attach("vm.disk.attach:started"), _attach("vm.disk.attach.plugged"), _attach("vm.disk.attach:done"),
               _detach("vm.disk.detach:started"), _detach("vm.disk.detach:done")]
    points.append(_on_vm("vm.disk.resize:done", lambda c, s: c.storage.ResizeDisk(S.ResizeDiskRequest(
        request_id=_rid("vm.disk.resize:done"), vm=s["uuid"], target="vda", new_size_bytes=32 * MIB), timeout=60),
        lambda c, s: c.virtual_size(s["file"]) >= 32 * MIB, start=True, disk=True))
    points.append(_on_vm("vm.disk.qos:done", lambda c, s: c.storage.SetDiskQos(S.SetDiskQosRequest(
        request_id=_rid("vm.disk.qos:done"), vm=s["uuid"], target="vda", qos=qos), timeout=60),
        lambda c, s: "<total_iops_sec>321</total_iops_sec>" in c.persistent_xml(s["name"]), disk=True))
    points += [_snap_create("vm.snapshot.create:started"), _snap_create("vm.snapshot.create:done", quick=True)]
    points.append(_on_vm("vm.snapshot.revert:done", lambda c, s: c.vms.RevertSnapshot(vm.SnapshotActionRequest(
        request_id=_rid("vm.snapshot.revert:done"), vm=s["uuid"], snapshot="s1"), timeout=60),
        lambda c, s: c.qemu_io(s["file"], "read -P 0 0 64k", read_only=True), disk=True, then=_two_snapshots))
    points.append(_on_vm("vm.snapshot.delete:done", lambda c, s: c.vms.DeleteSnapshot(vm.SnapshotActionRequest(
        request_id=_rid("vm.snapshot.delete:done"), vm=s["uuid"], snapshot="s1"), timeout=60),
        lambda c, s: "s1" not in c.internal_snapshots(s["file"]), disk=True, then=_snapshot_first))
    points += [_vol_create("volume.create:started", quick=True), _vol_create("volume.placed"), _vol_create("volume.create:done")]
    points.append(_volume("volume.clone:done", lambda c, s: c.storage.CloneVolume(S.CloneVolumeRequest(
        request_id=_rid("volume.clone:done"), source=s["source"], datastore="ds", path=s["path"]), timeout=60),
        lambda c, s: c.volume_file(s["path"]).exists(), source=True))
    points.append(_volume("volume.import:done", lambda c, s: c.storage.ImportVolume(S.ImportVolumeRequest(
        request_id=_rid("volume.import:done"), source=f"imp/{s['tag']}/in.raw", datastore="ds", path=s["path"]), timeout=60),
        lambda c, s: c.volume_file(s["path"]).exists(), raw_import=True))
    points.append(_volume("volume.export:done", lambda c, s: c.storage.ExportVolume(S.ExportVolumeRequest(
        request_id=_rid("volume.export:done"), id=s["source"], datastore="imp", path=f"{s['tag']}/out.qcow2"), timeout=60),
        lambda c, s: (c.imp / s["tag"] / "out.qcow2").exists(), source=True))
    points.append(_volume("volume.resize:done", lambda c, s: c.storage.ResizeVolume(S.ResizeVolumeRequest(
        request_id=_rid("volume.resize:done"), id=s["source"], new_size_bytes=32 * MIB), timeout=60),
        lambda c, s: c.virtual_size(c.volume_file(f"{s['tag']}/src.qcow2")) == 32 * MIB, source=True))
    points += [_vol_delete("volume.delete:started"), _vol_delete("volume.delete:done")]
    return points + network_points()
