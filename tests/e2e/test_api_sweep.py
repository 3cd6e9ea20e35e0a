"""A hostile-input sweep over every RPC of the real agent: each request is a valid one with one
field (top level, or one message deep, or inside a repeated element) replaced by a hostile value
of that field's type.

Every answer must be a clean client error (a gRPC status a client can act on) or a harmless
success; never UNKNOWN or INTERNAL. A refused request must change nothing: the datastore's files
and libvirt's persistent domain definitions (the embedded driver's XML files) are compared from
outside the agent before and after. A hostile value in a field that names something (a VM, a
volume path, a datastore, a request id, a MAC...) must be refused; free text (descriptions,
labels, command lines) may be accepted, escaped. The closing line prints the counts; the test
fails on any accepted hostile value or any UNKNOWN/INTERNAL answer.

OVS is not running for this agent (its OVSDB address leads nowhere), so network changes answer
UNAVAILABLE after their validation; the network's own behaviour is tested with OVS elsewhere.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import grpc
import pytest
from google.protobuf import duration_pb2
from google.protobuf.descriptor import FieldDescriptor

from cna_agent.api import pb
from support.agent import start_agent
from support.operations import ok, wait

vm, st, net, ops_pb, ev, host_pb = pb.vm_pb2, pb.storage_pb2, pb.network_pb2, pb.operations_pb2, pb.events_pb2, pb.host_pb2
mig = pb.migration_pb2
pytestmark = [pytest.mark.slow, pytest.mark.skipif(os.geteuid() != 0, reason="runs the embedded QEMU driver")]

#: Answers a client can act on. UNKNOWN and INTERNAL are bugs; so is a deadline the agent misses.
CLEAN = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.ALREADY_EXISTS,
         grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.UNAVAILABLE,
         grpc.StatusCode.UNIMPLEMENTED}

HOSTILE_STRINGS = ["", "\x00", "a\x00b", "../../etc/passwd", "/etc/passwd", "$(id)", "`id`", "vm;reboot", "<x/>", "&xxe;",
                   " ", "lead ", "\u202egpj.qcow2", "-rf", "--help", ".", "..", "%s%n", "a\nb", "x" * 5000, "caf\u00e9",
                   # names that carry a volume's suffix, so only the name policy stands in their way
                   "$(id).qcow2", "a&b'\".qcow2", " lead.qcow2", "vm;reboot.raw", "<x/>/a.qcow2"]
HOSTILE_INTS = [-1, -(1 << 31), (1 << 31) - 1, (1 << 63) - 1]
HOSTILE_UINTS = [(1 << 32) - 1, (1 << 63) - 1, (1 << 64) - 1]
#: Fields whose value is free text: a hostile string there may be accepted (it is escaped).
FREE_TEXT = {"description", "cmdline", "message", "data", "stage", "page_token", "keymap", "password", "types", "kinds",
             "resource_id", "labels", "reason"}
#: Fields with a token policy of their own: a value matching it is not hostile.
TOKENS = {"request_id": re.compile(r"^[A-Za-z0-9._:~-]{1,128}$"), "migration_id": re.compile(r"^[A-Za-z0-9._:~-]{1,128}$")}


def _hostile(f: FieldDescriptor) -> list[Any]:
    if f.type == FieldDescriptor.TYPE_STRING:
        return HOSTILE_STRINGS
    if f.type == FieldDescriptor.TYPE_BYTES:
        return [b"\x00" * 70000, b"\xff\xfe"]
    if f.type == FieldDescriptor.TYPE_ENUM:
        return [999, -1]
    if f.type in (FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_SINT32,
                  FieldDescriptor.TYPE_SINT64):
        return [v for v in HOSTILE_INTS if f.type not in (FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_SINT32)
                or -(1 << 31) <= v < (1 << 31)]
    if f.type in (FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_UINT64):
        return [v for v in HOSTILE_UINTS if f.type == FieldDescriptor.TYPE_UINT64 or v < (1 << 32)]
    return []  # bools, doubles: no value of theirs is hostile


def _variants(request: Any) -> list[tuple[str, Any, Any]]:
    """(field path, hostile value, the request with it) for every field one message deep,
    and inside repeated elements (the first, or a new one)."""
    out = []

    def walk(msg: Any, path: str, set_on: Callable[[Any], Any], depth: int) -> None:
        for f in msg.DESCRIPTOR.fields:
            name = f"{path}{f.name}"
            if f.message_type is not None:
                if f.message_type.GetOptions().map_entry:
                    for value in _hostile(f.message_type.fields_by_name["value"])[:6]:
                        def put_map(m: Any, f=f, value=value) -> None:
                            getattr(m, f.name)["k"] = value
                        out.append((name, value, _edit(request, set_on, put_map)))
                    continue
                if depth >= 1 or f.message_type.full_name.startswith("google.protobuf"):
                    continue
                if f.is_repeated:
                    walk(_element_template(msg, f), f"{name}[0].",
                         lambda root, f=f, set_on=set_on: _first(set_on(root), f), depth + 1)
                else:
                    walk(getattr(msg, f.name), f"{name}.", lambda root, f=f, set_on=set_on: getattr(set_on(root), f.name),
                         depth + 1)
                continue
            for value in _hostile(f):
                if f.is_repeated:
                    def put(m: Any, f=f, value=value) -> None:
                        getattr(m, f.name).append(value)
                else:
                    def put(m: Any, f=f, value=value) -> None:
                        setattr(m, f.name, value)
                out.append((name, value, _edit(request, set_on, put)))

    walk(request, "", lambda root: root, 0)
    return out


def _element_template(msg: Any, f: FieldDescriptor) -> Any:
    container = getattr(msg, f.name)
    return container[0] if len(container) else type(container.add())()


def _first(msg: Any, f: FieldDescriptor) -> Any:
    container = getattr(msg, f.name)
    return container[0] if len(container) else container.add()


def _edit(request: Any, locate: Callable[[Any], Any], change: Callable[[Any], None]) -> Any:
    copy = type(request)()
    copy.CopyFrom(request)
    change(locate(copy))
    return copy


def _strict(name: str, path: str, value: Any) -> bool:
    """Whether accepting ``value`` in ``path`` would be accepting a hostile value."""
    leaf = path.rsplit(".", 1)[-1].split("[", 1)[0]
    if name == "VmService/UpdateVm" and path.startswith("spec.") and path != "spec.description":
        return False  # outside the update mask: ignored (AIP-134)
    if isinstance(value, int) and not isinstance(value, bool):
        # Negative counts and sizes, and values no quantity here reaches (2^63 and beyond).
        return (value < 0 or value >= (1 << 63) - 1) and name not in LISTINGS
    if leaf in FREE_TEXT or not isinstance(value, str) or value == "":
        return False
    if leaf in TOKENS and TOKENS[leaf].match(value):
        return False
    return name not in LISTINGS


#: Calls that filter or page: an odd filter value matches nothing, which is a harmless answer.
LISTINGS = {"OperationsService/ListOperations", "EventService/ListEvents", "EventService/WatchEvents",
            "EventService/WatchEventBatches", "VmService/ListVms",
            "NetworkService/ListPortGroups"}


class World:
    """The agent, its datastore, and what "nothing changed" is judged on."""

    def __init__(self, agent, datastore: Path) -> None:
        self.agent = agent
        self.ds = datastore
        self.domains = agent.dir / "state" / "libvirt" / "etc"

    def state(self) -> tuple[frozenset, frozenset]:
        files = frozenset(str(p.relative_to(self.ds)) for p in self.ds.rglob("*"))
        doms = frozenset(p.name for p in self.domains.rglob("*.xml"))
        return files, doms


@pytest.fixture
def world(libvirt_caps_cache, test_guest):
    base = Path(tempfile.mkdtemp(prefix="cs", dir="/tmp"))  # short: QEMU socket paths
    ds = base / "ds"
    ds.mkdir()
    extra = (f'[compute]\nimage_dirs = "{Path(test_guest("x86_64")["kernel"]).parent}"\n'
             f'[storage.datastores.ds]\ntype = "dir"\npath = "{ds}"\n'
             '[network]\novsdb = "unix:/nonexistent/cna-sweep/db.sock"\novsdb_timeout_s = 1.0\nreconcile_interval_s = 0\n'
             '[network.bridges.brsweep]\ntype = "ovs"\n[network.port_groups.pgsweep]\nbridge = "brsweep"\n')
    w = World(start_agent(base / "a", libvirt_caps_cache, tcp=False, extra_config=extra), ds)
    try:
        yield w
    finally:
        w.agent.stop()  # the test may have restarted it
        shutil.rmtree(base, ignore_errors=True)


def _setup(ch) -> dict[str, str]:
    """The valid things the base requests name: a stopped VM with a disk and a NIC, a snapshot,
    a spare volume."""
    s = pb.storage_pb2_grpc.StorageServiceStub(ch)
    v = pb.vm_pb2_grpc.VmServiceStub(ch)
    for path in ("base.qcow2", "free.qcow2", "victim.qcow2"):
        ok(ch, s.CreateVolume(st.CreateVolumeRequest(datastore="ds", path=path, format=st.VOLUME_FORMAT_QCOW2,
                                                     size_bytes=1 << 20), timeout=60))
    spec = vm.VmSpec(name="sweep-vm", vcpus=1, memory_mib=64, arch=pb.common_pb2.ARCH_X86_64,
                     console=vm.ConsoleSpec(type=vm.CONSOLE_TYPE_NONE),
                     disks=[vm.DiskSpec(volume="ds/base.qcow2")], nics=[vm.NicSpec(port_group="pgsweep")])
    created = ok(ch, v.CreateVm(vm.CreateVmRequest(spec=spec), timeout=60), into=vm.Vm())
    ok(ch, v.CreateSnapshot(vm.CreateSnapshotRequest(vm="sweep-vm", name="base-snap"), timeout=60))
    # a template, for DeployVm (and a ConvertVmToTemplate that is refused: it is one already)
    ok(ch, s.CreateVolume(st.CreateVolumeRequest(datastore="ds", path="tpl.qcow2", format=st.VOLUME_FORMAT_QCOW2,
                                                 size_bytes=1 << 20), timeout=60))
    ok(ch, v.CreateVm(vm.CreateVmRequest(spec=vm.VmSpec(name="sweep-tpl", vcpus=1, memory_mib=64, arch=pb.common_pb2.ARCH_X86_64,
                                                        console=vm.ConsoleSpec(type=vm.CONSOLE_TYPE_NONE),
                                                        disks=[vm.DiskSpec(volume="ds/tpl.qcow2")])), timeout=60))
    ok(ch, v.ConvertVmToTemplate(vm.VmActionRequest(vm="sweep-tpl"), timeout=60))
    op = s.CreateVolume(st.CreateVolumeRequest(datastore="ds", path="op.qcow2", format=st.VOLUME_FORMAT_QCOW2,
                                               size_bytes=1 << 20), timeout=60)
    ok(ch, op)
    # a package of the VM, for the appliance calls to read
    ok(ch, pb.appliance_pb2_grpc.ApplianceServiceStub(ch).ExportAppliance(
        pb.appliance_pb2.ExportApplianceRequest(vm="sweep-vm", destination="ds/pkg/sweep.ova"), timeout=60), 120)
    return {"uuid": created.uuid, "mac": created.spec.nics[0].mac, "op": op.id}


def _bases(k: dict[str, str]) -> dict[str, Any]:
    """One valid request per RPC (method name -> request message)."""
    sec = pb.common_pb2
    return {
        "HostService/GetCapabilities": host_pb.GetCapabilitiesRequest(),
        "HostService/GetStats": host_pb.GetStatsRequest(),
        "HostService/GetPlacement": host_pb.GetPlacementRequest(vm="sweep-vm"),
        # on towards a destination that answers nothing: the stopped VM stays, reported (undone below)
        "HostService/SetMaintenance": host_pb.SetMaintenanceRequest(
            enabled=True, destinations=["127.0.0.1:9"], policy=vm.MigrationPolicy(max_downtime_ms=500, completion_action="abort")),
        "HostService/GetMaintenance": host_pb.GetMaintenanceRequest(),
        "OperationsService/GetOperation": ops_pb.GetOperationRequest(id=k["op"]),
        "OperationsService/ListOperations": ops_pb.ListOperationsRequest(page_size=5, kinds=["volume.create"]),
        "OperationsService/WatchOperation": ops_pb.WatchOperationRequest(id=k["op"]),
        "OperationsService/CancelOperation": ops_pb.CancelOperationRequest(id=k["op"]),
        "EventService/ListEvents": ev.ListEventsRequest(after_sequence=1, limit=5, types=["vm."]),
        "EventService/WatchEvents": ev.WatchEventsRequest(after_sequence=1, types=["vm."]),
        "EventService/WatchEventBatches": ev.WatchEventsRequest(after_sequence=1, types=["vm."]),
        "VmService/CreateVm": vm.CreateVmRequest(spec=vm.VmSpec(name="sweep-new", vcpus=1, memory_mib=64,
                                                                description="d", arch=sec.ARCH_X86_64,
                                                                console=vm.ConsoleSpec(type=vm.CONSOLE_TYPE_NONE),
                                                                disks=[vm.DiskSpec(volume="ds/free.qcow2")],
                                                                nics=[vm.NicSpec(port_group="pgsweep")])),
        "VmService/GetVm": vm.GetVmRequest(vm="sweep-vm"),
        "VmService/ListVms": vm.ListVmsRequest(states=[vm.VM_STATE_STOPPED]),
        "VmService/UpdateVm": vm.UpdateVmRequest(vm="sweep-vm", spec=vm.VmSpec(description="x"), update_mask=["description"]),
        "VmService/DeleteVm": vm.DeleteVmRequest(vm="sweep-vm"),
        "VmService/RestoreVm": vm.VmActionRequest(vm="sweep-vm"),  # not in the recycle bin: refused
        "VmService/StartVm": vm.VmActionRequest(vm="sweep-vm"),
        "VmService/HibernateVm": vm.HibernateVmRequest(vm="sweep-vm", datastore="ds"),  # stopped: refused
        "VmService/UnhibernateVm": vm.UnhibernateVmRequest(vm="sweep-vm", datastore="ds"),  # not hibernated: refused
        "VmService/ShutdownVm": vm.ShutdownVmRequest(vm="sweep-vm", hard=True),
        "VmService/RebootVm": vm.RebootVmRequest(vm="sweep-vm"),
        "VmService/PauseVm": vm.VmActionRequest(vm="sweep-vm"),
        "VmService/ResumeVm": vm.VmActionRequest(vm="sweep-vm"),
        "VmService/GetConsole": vm.GetConsoleRequest(vm="sweep-vm"),
        "VmService/SerialConsole": vm.SerialConsoleInput(vm="sweep-vm"),
        "VmService/CreateSnapshot": vm.CreateSnapshotRequest(vm="sweep-vm", name="sweep-snap", description="d"),
        "VmService/ListSnapshots": vm.ListSnapshotsRequest(vm="sweep-vm"),
        "VmService/RevertSnapshot": vm.SnapshotActionRequest(vm="sweep-vm", snapshot="base-snap"),
        "VmService/DeleteSnapshot": vm.SnapshotActionRequest(vm="sweep-vm", snapshot="base-snap"),
        "VmService/GetVmDiagnostics": vm.GetVmDiagnosticsRequest(vm="sweep-vm"),
        "VmService/GetGuestInfo": vm.GetGuestInfoRequest(vm="sweep-vm"),  # stopped: refused
        "VmService/SetGuestPassword": vm.SetGuestPasswordRequest(vm="sweep-vm", user="root", password="pw"),  # stopped
        "VmService/MigrateVm": vm.MigrateVmRequest(vm="sweep-vm", destination="127.0.0.1:9",
                                                   policy=vm.MigrationPolicy(max_downtime_ms=500, completion_action="abort")),
        "VmService/ConvertVmToTemplate": vm.VmActionRequest(vm="sweep-tpl"),  # a template already: refused
        "VmService/DeployVm": vm.DeployVmRequest(template="sweep-tpl", names=["sweep-dep"], linked=True, datastore="ds"),
        "MigrationService/PrepareIncoming": mig.PrepareIncomingRequest(
            migration_id="sweep-mig", domain_xml="<domain type='qemu'/>",
            spec=vm.VmSpec(name="sweep-in", uuid="0b5c2f8e-3d41-4a9b-8c7e-6f5a4b3c2d99", vcpus=1, memory_mib=64,
                           arch=sec.ARCH_X86_64, console=vm.ConsoleSpec(type=vm.CONSOLE_TYPE_NONE))),
        "MigrationService/FinishIncoming": mig.FinishIncomingRequest(migration_id="sweep-mig", completed=True),
        "MigrationService/AbortIncoming": mig.AbortIncomingRequest(migration_id="sweep-mig", reason="r"),
        "BackupService/StartBackup": pb.backup_pb2.StartBackupRequest(vm="sweep-vm", disks=["vda"]),  # stopped: refused
        "BackupService/StopBackup": pb.backup_pb2.StopBackupRequest(vm="sweep-vm"),  # none running: nothing to do
        "BackupService/GetBackup": pb.backup_pb2.GetBackupRequest(vm="sweep-vm"),
        "BackupService/ListCheckpoints": pb.backup_pb2.ListCheckpointsRequest(vm="sweep-vm"),
        # an identity that is not the datastore's file at that name: refused (never overwritten),
        # so every variant meets the same world
        "MigrationService/PrepareColdIncoming": mig.PrepareColdIncomingRequest(
            migration_id="sweep-cold", source_host_uuid="0b5c2f8e-3d41-4a9b-8c7e-6f5a4b3c2d98",
            spec=vm.VmSpec(name="sweep-cold", uuid="0b5c2f8e-3d41-4a9b-8c7e-6f5a4b3c2d97", vcpus=1, memory_mib=64,
                           arch=sec.ARCH_X86_64, console=vm.ConsoleSpec(type=vm.CONSOLE_TYPE_NONE),
                           disks=[vm.DiskSpec(volume="ds/free.qcow2")]),
            disks=[mig.ColdDiskIdentity(index=0, size_bytes=1 << 20, allocated_bytes=1 << 20, inode=12, mtime_ns=1,
                                        head_sha256="0" * 64)]),
        "MigrationService/PushVolume": mig.PushVolumeRequest(migration_id="sweep-cold", disk_index=0, size_bytes=1 << 20),
        "MigrationService/FinishColdIncoming": mig.FinishColdIncomingRequest(migration_id="sweep-cold"),
        "MigrationService/AbortColdIncoming": mig.AbortIncomingRequest(migration_id="sweep-cold", reason="r"),
        "StorageService/ListDatastores": st.ListDatastoresRequest(),
        "StorageService/GetDatastore": st.GetDatastoreRequest(name="ds"),
        "StorageService/RescanDatastore": st.RescanDatastoreRequest(name="ds"),
        "StorageService/ListVolumes": st.ListVolumesRequest(datastore="ds"),
        "StorageService/GetVolume": st.GetVolumeRequest(id="ds/base.qcow2"),
        "StorageService/CreateVolume": st.CreateVolumeRequest(datastore="ds", path="new.qcow2", format=st.VOLUME_FORMAT_QCOW2,
                                                              size_bytes=1 << 20),
        "StorageService/ResizeVolume": st.ResizeVolumeRequest(id="ds/free.qcow2", new_size_bytes=2 << 20),
        "StorageService/DeleteVolume": st.DeleteVolumeRequest(id="ds/victim.qcow2"),
        "StorageService/CloneVolume": st.CloneVolumeRequest(source="ds/free.qcow2", datastore="ds", path="clone.qcow2",
                                                            linked=True),
        "StorageService/ImportVolume": st.ImportVolumeRequest(source="ds/free.qcow2", source_format=st.VOLUME_FORMAT_QCOW2,
                                                              datastore="ds", path="imported.qcow2", format=st.VOLUME_FORMAT_QCOW2),
        "StorageService/ExportVolume": st.ExportVolumeRequest(id="ds/free.qcow2", datastore="ds", path="exported.raw",
                                                              format=st.VOLUME_FORMAT_RAW),
        "StorageService/AttachDisk": st.AttachDiskRequest(vm="sweep-vm", disk=vm.DiskSpec(volume="ds/free.qcow2")),
        "StorageService/DetachDisk": st.DetachDiskRequest(vm="sweep-vm", target="vda"),
        "StorageService/ResizeDisk": st.ResizeDiskRequest(vm="sweep-vm", target="vda", new_size_bytes=2 << 20),
        "StorageService/SetDiskQos": st.SetDiskQosRequest(vm="sweep-vm", target="vda", qos=vm.IoQos(total_iops_sec=100)),
        # the VM is stopped: refused (a stopped VM's disk is not moved live), nothing is created
        "StorageService/MoveDisk": st.MoveDiskRequest(vm="sweep-vm", target="vda", destination="ds/moved.qcow2",
                                                      bandwidth_mib_s=10),
        "NetworkService/ListBridges": net.ListBridgesRequest(),
        "NetworkService/EnsureBridge": net.EnsureBridgeRequest(bridge=net.Bridge(name="brsweep2", type=net.BRIDGE_TYPE_OVS)),
        "NetworkService/DeleteBridge": net.DeleteBridgeRequest(name="brsweep"),
        "NetworkService/ListPortGroups": net.ListPortGroupsRequest(bridge="brsweep"),
        "NetworkService/EnsurePortGroup": net.EnsurePortGroupRequest(port_group=net.PortGroup(name="pgsweep2", bridge="brsweep")),
        "NetworkService/DeletePortGroup": net.DeletePortGroupRequest(name="pgsweep"),
        "NetworkService/AttachNic": net.AttachNicRequest(vm="sweep-vm", nic=vm.NicSpec(port_group="pgsweep")),
        "NetworkService/DetachNic": net.DetachNicRequest(vm="sweep-vm", mac=k["mac"]),
        "NetworkService/SetNicLink": net.SetNicLinkRequest(vm="sweep-vm", mac=k["mac"], up=True),
        "NetworkService/Reconcile": net.ReconcileRequest(repair=False),
        "AgentService/GetVrmStatus": pb.agent_pb2.GetVrmStatusRequest(),
        "ApplianceService/InspectAppliance": pb.appliance_pb2.InspectApplianceRequest(source="ds/pkg/sweep.ova",
                                                                                      network_map={"pgsweep": "pgsweep"}),
        "ApplianceService/ImportAppliance": pb.appliance_pb2.ImportApplianceRequest(
            source="ds/pkg/sweep.ova", datastore="ds", folder="imp", name="sweep-imp", network_map={"pgsweep": "pgsweep"}),
        "ApplianceService/ExportAppliance": pb.appliance_pb2.ExportApplianceRequest(vm="sweep-vm",
                                                                                    destination="ds/exp/out.ova"),
    }


def _methods() -> dict[str, Any]:
    """Every RPC the agent serves (pb.SERVICE_NAMES; the VRM's own service is not the agent's)."""
    found = {}
    for module in (getattr(pb, n) for n in dir(pb) if n.endswith("_pb2")):
        for svc in module.DESCRIPTOR.services_by_name.values():
            if svc.full_name not in pb.SERVICE_NAMES:
                continue
            for m in svc.methods:
                found[f"{svc.name}/{m.name}"] = m
    return found


def _call(ch, method: Any, request: Any) -> tuple[grpc.StatusCode, Any, str]:
    path = f"/{method.containing_service.full_name}/{method.name}"
    out_cls = _message_class(method.output_type)
    ser, de = type(request).SerializeToString, out_cls.FromString
    try:
        if method.client_streaming:
            call = ch.stream_stream(path, request_serializer=ser, response_deserializer=de)(iter([request]), timeout=10)
            for _ in call:
                break
            return grpc.StatusCode.OK, None, ""
        if method.server_streaming:
            # A live stream that has nothing to send yet is a fine answer. A refusal ends the call
            # at once; an accepted watch sends its headers first (the agent does so once the
            # request passed validation), so waiting for headers tells the two apart.
            call = ch.unary_stream(path, request_serializer=ser, response_deserializer=de)(request, timeout=10)
            call.initial_metadata()
            first = None
            if call.done():
                try:
                    first = next(call)
                except StopIteration:
                    pass
            call.cancel()
            return grpc.StatusCode.OK, first, ""
        reply = ch.unary_unary(path, request_serializer=ser, response_deserializer=de)(request, timeout=30)
        return grpc.StatusCode.OK, reply, ""
    except grpc.RpcError as exc:
        if exc.code() == grpc.StatusCode.CANCELLED:
            return grpc.StatusCode.OK, None, ""  # our own cancel of a stream that was answering
        return exc.code(), None, exc.details() or ""


def _message_class(desc: Any) -> Any:
    from google.protobuf import message_factory

    return message_factory.GetMessageClass(desc)


def _undo(ch, name: str, request: Any, ds: Path) -> None:
    """Put back what an accepted request made, so the next one meets the same world."""
    v, s = pb.vm_pb2_grpc.VmServiceStub(ch), pb.storage_pb2_grpc.StorageServiceStub(ch)

    def gone(call: Callable[[], Any]) -> None:
        try:
            wait(ch, call(), 120)
        except grpc.RpcError as exc:
            assert exc.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT), exc

    if name == "VmService/CreateVm":
        gone(lambda: v.DeleteVm(vm.DeleteVmRequest(vm=request.spec.name, force=True), timeout=60))
    elif name == "VmService/CreateSnapshot":
        gone(lambda: v.DeleteSnapshot(vm.SnapshotActionRequest(vm="sweep-vm", snapshot=request.name), timeout=60))
    elif name in ("StorageService/CreateVolume", "StorageService/CloneVolume", "StorageService/ImportVolume",
                  "StorageService/ExportVolume"):
        gone(lambda: s.DeleteVolume(st.DeleteVolumeRequest(id=f"{request.datastore}/{request.path}"), timeout=60))
    elif name == "StorageService/AttachDisk":
        target = [d for d in v.GetVm(vm.GetVmRequest(vm="sweep-vm"), timeout=30).spec.disks if d.volume != "ds/base.qcow2"]
        for d in target:
            ok(ch, s.DetachDisk(st.DetachDiskRequest(vm="sweep-vm", target=d.target), timeout=60))
    elif name == "VmService/DeployVm":
        for made in request.names:
            gone(lambda: v.DeleteVm(vm.DeleteVmRequest(vm=made, force=True, delete_disks=True), timeout=60))
    elif name == "ApplianceService/ImportAppliance":
        gone(lambda: v.DeleteVm(vm.DeleteVmRequest(vm=request.name, force=True, delete_disks=True), timeout=60))
    elif name == "ApplianceService/ExportAppliance":
        (ds / request.destination.split("/", 1)[1]).unlink()
    elif name == "HostService/SetMaintenance":
        ok(ch, pb.host_pb2_grpc.HostServiceStub(ch).SetMaintenance(host_pb.SetMaintenanceRequest(enabled=False), timeout=60))
    elif name in ("VmService/StartVm", "VmService/ResumeVm", "VmService/RebootVm", "VmService/PauseVm"):
        gone(lambda: v.ShutdownVm(vm.ShutdownVmRequest(vm="sweep-vm", hard=True), timeout=60))


def test_every_rpc_refuses_hostile_values_cleanly(world):
    methods = _methods()
    sent = accepted_hostile = bad_status = 0
    problems: list[str] = []
    spent: dict[str, float] = {}  # seconds per RPC, so the slowest can be seen in the summary
    with world.agent.channel() as ch:
        bases = _bases(_setup(ch))
        assert set(bases) == set(methods), set(bases) ^ set(methods)  # every RPC is swept
        only = tuple(filter(None, os.environ.get("CNA_SWEEP_ONLY", "").split(",")))  # for debugging one service
        for name, base in bases.items():
            if only and not name.startswith(only):
                continue
            started = time.monotonic()
            for path, value, request in _variants(base):
                before = world.state()
                code, reply, details = _call(ch, methods[name], request)
                sent += 1
                if code not in CLEAN:
                    bad_status += 1
                    problems.append(f"{name} {path}={value!r:.40}: {code.name} {details[:200]}")
                    continue
                leaf = path.rsplit(".", 1)[-1].split("[", 1)[0]
                if code == grpc.StatusCode.INVALID_ARGUMENT and leaf not in details:
                    problems.append(f"{name} {path}={value!r:.40}: INVALID_ARGUMENT not naming {leaf}: {details[:160]}")
                operation = reply if isinstance(reply, ops_pb.Operation) else None
                if operation is not None and name != "OperationsService/CancelOperation":
                    operation = wait(ch, operation, 180)
                succeeded = code == grpc.StatusCode.OK and (operation is None or not operation.HasField("error"))
                if succeeded and _strict(name, path, value):
                    accepted_hostile += 1
                    problems.append(f"{name} {path}={value!r:.40}: accepted")
                if succeeded:
                    _undo(ch, name, request, world.ds)
                elif world.state() != before:
                    problems.append(f"{name} {path}={value!r:.40}: refused ({code.name}) but changed {world.state()} vs {before}")
            spent[name] = time.monotonic() - started
    slowest = ", ".join(f"{n} {t:.1f} s" for n, t in sorted(spent.items(), key=lambda kv: -kv[1])[:6])
    print(f"\napi sweep: {sent} requests over {len(bases)} RPCs, {accepted_hostile} hostile values accepted, "
          f"{bad_status} UNKNOWN/INTERNAL or other unclean answers; slowest: {slowest}")
    report = os.environ.get("CNA_SWEEP_REPORT")
    if report:
        Path(report).write_text("\n".join(problems) + "\n")
    assert not problems, "\n".join(problems[:60]) + (f"\n... and {len(problems) - 60} more" if len(problems) > 60 else "")
    assert sent > (100 if only else 2000)


#: The response each operation kind documents (the .proto comments), as a client reads them.
DOCUMENTED = {"vm.create": "cna.v1.Vm", "vm.update": "cna.v1.Vm", "vm.start": "cna.v1.Vm", "vm.shutdown": "cna.v1.Vm",
              "vm.delete": "google.protobuf.Empty", "vm.snapshot.create": "cna.v1.Snapshot",
              "volume.create": "cna.v1.Volume", "volume.delete": "google.protobuf.Empty",
              "datastore.rescan": "cna.v1.Datastore", "network.bridge.ensure": "cna.v1.Bridge"}


def _error(call: Callable[[], Any]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value


def test_operations_events_and_request_ids_keep_the_contract(world, libvirt_caps_cache):
    from cna_agent.state.journal import OperationJournal
    from cna_agent.state.store import StateStore

    with world.agent.channel() as ch:
        v, s = pb.vm_pb2_grpc.VmServiceStub(ch), pb.storage_pb2_grpc.StorageServiceStub(ch)
        n, e = pb.network_pb2_grpc.NetworkServiceStub(ch), pb.events_pb2_grpc.EventServiceStub(ch)
        o = pb.operations_pb2_grpc.OperationsServiceStub(ch)

        # A resume point beyond the newest event: OUT_OF_RANGE at once (it used to wait forever).
        newest = e.ListEvents(ev.ListEventsRequest(limit=1), timeout=10).last_sequence
        for call in (lambda: next(e.WatchEvents(ev.WatchEventsRequest(after_sequence=newest + 5), timeout=10)),
                     lambda: next(e.WatchEventBatches(ev.WatchEventsRequest(after_sequence=newest + 5), timeout=10)),
                     lambda: e.ListEvents(ev.ListEventsRequest(after_sequence=newest + 5), timeout=10)):
            err = _error(call)
            assert err.code() == grpc.StatusCode.OUT_OF_RANGE and "after_sequence" in err.details()

        # A request id reused for a different request: INVALID_ARGUMENT naming request_id (was UNKNOWN).
        s.CreateVolume(st.CreateVolumeRequest(request_id="rq-vol", datastore="ds", path="a.qcow2",
                                              format=st.VOLUME_FORMAT_QCOW2, size_bytes=1 << 20), timeout=30)
        s.RescanDatastore(st.RescanDatastoreRequest(request_id="rq-scan", name="ds"), timeout=30)
        n.EnsureBridge(net.EnsureBridgeRequest(request_id="rq-br", bridge=net.Bridge(name="brx1", type=net.BRIDGE_TYPE_OVS)),
                       timeout=30)
        for again in (
            lambda: s.CreateVolume(st.CreateVolumeRequest(request_id="rq-vol", datastore="ds", path="b.qcow2",
                                                          format=st.VOLUME_FORMAT_QCOW2, size_bytes=1 << 20), timeout=30),
            lambda: s.RescanDatastore(st.RescanDatastoreRequest(request_id="rq-vol", name="ds"), timeout=30),
            lambda: n.EnsureBridge(net.EnsureBridgeRequest(request_id="rq-br", bridge=net.Bridge(name="brx2", type=net.BRIDGE_TYPE_OVS)),
                                   timeout=30),
        ):
            err = _error(again)
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "request_id" in err.details(), err.details()

        # A NUL in a VM name is the caller's mistake, named (it was UNKNOWN "embedded null character").
        for call in (lambda: v.GetVm(vm.GetVmRequest(vm="a\x00b"), timeout=10),
                     lambda: v.GetConsole(vm.GetConsoleRequest(vm="a\x00b"), timeout=10),
                     lambda: n.AttachNic(net.AttachNicRequest(vm="a\x00b", nic=vm.NicSpec(port_group="pgsweep")), timeout=10),
                     lambda: n.SetNicLink(net.SetNicLinkRequest(vm="a\x00b", mac="52:54:00:00:00:01"), timeout=10)):
            err = _error(call)
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and err.details().startswith("vm:"), err.details()

        # Results: a started VM does not name its own finished start as active; a delete ends with Empty.
        spec = vm.VmSpec(name="ctr-vm", vcpus=1, memory_mib=64, arch=pb.common_pb2.ARCH_X86_64,
                         console=vm.ConsoleSpec(type=vm.CONSOLE_TYPE_NONE))
        created = ok(ch, v.CreateVm(vm.CreateVmRequest(spec=spec), timeout=60), into=vm.Vm())
        started = ok(ch, v.StartVm(vm.VmActionRequest(vm="ctr-vm"), timeout=60), into=vm.Vm())
        assert started.status.state == vm.VM_STATE_RUNNING and started.status.active_operation_id == ""
        # A cancel ends with the CANCELLED status (and no response): the ACPI shutdown of a guest
        # with no OS waits for its deadline.
        waiting = v.ShutdownVm(vm.ShutdownVmRequest(vm="ctr-vm", timeout=duration_pb2.Duration(seconds=300)), timeout=30)
        assert not waiting.done
        cancelled = o.CancelOperation(ops_pb.CancelOperationRequest(id=waiting.id), timeout=60)
        cancelled = wait(ch, cancelled, 60)
        assert cancelled.state == ops_pb.OPERATION_STATE_CANCELLED and cancelled.error.code == 1
        assert not cancelled.HasField("response")
        ok(ch, v.ShutdownVm(vm.ShutdownVmRequest(vm="ctr-vm", hard=True), timeout=60))
        deleted = ok(ch, v.DeleteVm(vm.DeleteVmRequest(vm="ctr-vm"), timeout=60))
        assert deleted.response.type_url == "type.googleapis.com/google.protobuf.Empty"
        again = ok(ch, v.CreateVm(vm.CreateVmRequest(spec=spec), timeout=60), into=vm.Vm())
    assert world.agent.stop() == 0

    # Operations a crash left open, closed by the next start: the create's effect is there, so it
    # ends with the VM; the delete's is not, so it ends ABORTED saying what libvirt shows.
    store = StateStore(world.agent.dir / "state" / "agent.db")
    journal = OperationJournal(store)
    open_create, _ = journal.begin("vm.create", again.uuid)
    open_delete, _ = journal.begin("vm.delete", again.uuid)
    store.close()
    world.agent = start_agent(world.agent.dir, libvirt_caps_cache, tcp=False, config=world.agent.config)
    with world.agent.channel() as ch:
        o = pb.operations_pb2_grpc.OperationsServiceStub(ch)
        create = o.GetOperation(ops_pb.GetOperationRequest(id=open_create.id), timeout=10)
        assert create.done and create.metadata["recovered"] == "true"
        recovered = vm.Vm()
        assert create.response.Unpack(recovered) and recovered.uuid == again.uuid
        delete = o.GetOperation(ops_pb.GetOperationRequest(id=open_delete.id), timeout=10)
        assert delete.done and delete.error.code == 10 and "libvirt shows the VM defined and stopped" in delete.error.message

        # Every finished operation of this agent has exactly one of response or error, and a
        # response is the type its kind documents.
        listed = o.ListOperations(ops_pb.ListOperationsRequest(page_size=1000), timeout=30).operations
        assert len(listed) >= 10
        for op in listed:
            assert op.done, op
            assert op.HasField("response") != op.HasField("error"), op
            if op.HasField("response") and op.kind in DOCUMENTED:
                assert op.response.type_url == f"type.googleapis.com/{DOCUMENTED[op.kind]}", op
    assert created.uuid != again.uuid
