"""Operation results: the services' plain dataclasses -> the protobuf message stored in the
journal and returned in ``Operation.response`` (AIP-151).

The operation runner takes this as its encoder (the wiring hands it in), so neither the runner
nor any service knows protobuf; one table here says which message each result becomes.
"""

from __future__ import annotations

from typing import Any, Callable


def _table() -> dict[type, Callable[[Any], Any]]:
    # Imported on first use: the converters import the api's generated modules, which the
    # wiring loads once, after the services exist.
    from cna_agent.api.network import bridge_view_to_pb, port_group_view_to_pb, vif_to_pb
    from cna_agent.api.maintenance import report_to_pb, status_to_pb
    from cna_agent.api.storage import datastore_to_pb, volume_to_pb
    from cna_agent.api.vm_convert import deploy_to_pb, snapshot_to_pb, vm_to_pb
    from cna_agent.api.backup import backup_to_pb
    from cna_agent.api.appliance import export_to_pb, import_to_pb
    from cna_agent.compute.appliances import ApplianceExport, ApplianceImport
    from cna_agent.compute.backup import BackupInfo
    from cna_agent.compute.inventory import VmInfo
    from cna_agent.compute.maintenance import EvacuationReport, MaintenanceStatus
    from cna_agent.compute.snapshots import SnapshotInfo
    from cna_agent.compute.templates import DeployResult
    from cna_agent.contracts import VmNic
    from cna_agent.network.declarations import BridgeView, PortGroupView
    from cna_agent.storage.service import DatastoreStatus
    from cna_agent.storage.volumes import VolumeInfo

    return {
        VmInfo: vm_to_pb,
        DeployResult: deploy_to_pb,
        BackupInfo: backup_to_pb,
        ApplianceImport: import_to_pb,
        ApplianceExport: export_to_pb,
        SnapshotInfo: snapshot_to_pb,
        VolumeInfo: volume_to_pb,
        DatastoreStatus: datastore_to_pb,
        BridgeView: bridge_view_to_pb,
        PortGroupView: port_group_view_to_pb,
        VmNic: vif_to_pb,
        EvacuationReport: report_to_pb,
        MaintenanceStatus: status_to_pb,
    }


_TABLE: dict[type, Callable[[Any], Any]] | None = None

VM, EMPTY = "cna.v1.Vm", "google.protobuf.Empty"
#: The response every operation kind finishes with (the API's contract, as the .proto files'
#: comments document it): a result of another type is a bug, and the operation fails INTERNAL
#: instead of handing the caller something else.
OPERATION_RESPONSES: dict[str, str] = {
    **dict.fromkeys(("vm.create", "vm.update", "vm.start", "vm.shutdown", "vm.reboot", "vm.pause", "vm.resume",
                     "vm.snapshot.revert", "vm.disk.attach", "vm.disk.detach", "vm.disk.resize", "vm.disk.qos",
                     "vm.migrate", "vm.migrate_cold", "vm.restore", "vm.hibernate", "vm.unhibernate", "vm.disk.move",
                     "vm.template"), VM),
    "vm.deploy": "cna.v1.DeployVmResponse",
    "vm.snapshot.create": "cna.v1.Snapshot",
    "vm.backup.start": "cna.v1.Backup",
    "appliance.import": "cna.v1.ApplianceImport",
    "appliance.export": "cna.v1.ApplianceExport",
    **dict.fromkeys(("vm.delete", "vm.hibernate_handoff", "vm.backup.stop", "vm.snapshot.delete", "vm.guest.password", "volume.delete", "network.bridge.delete",
                     "network.port_group.delete", "network.nic.detach"), EMPTY),
    **dict.fromkeys(("volume.create", "volume.resize", "volume.clone", "volume.import", "volume.export"), "cna.v1.Volume"),
    "datastore.rescan": "cna.v1.Datastore",
    "host.evacuate": "cna.v1.EvacuationReport",
    "host.maintenance.exit": "cna.v1.MaintenanceStatus",
    "network.bridge.ensure": "cna.v1.Bridge",
    "network.port_group.ensure": "cna.v1.PortGroup",
    **dict.fromkeys(("network.nic.attach", "network.nic.link"), "cna.v1.Vif"),
}


def encode_result(kind: str, result: Any) -> tuple[str, bytes]:
    """(full message name, serialized message) for the result of an operation of ``kind``;
    None (an operation that returns nothing, e.g. a delete) is google.protobuf.Empty."""
    global _TABLE
    expected = OPERATION_RESPONSES.get(kind)
    if expected is None:
        raise TypeError(f"operation kind {kind!r} has no declared response type (api/results.py)")
    if result is None:
        from google.protobuf import empty_pb2

        msg = empty_pb2.Empty()
    else:
        if _TABLE is None:
            _TABLE = _table()
        to_pb = _TABLE.get(type(result))
        if to_pb is None:
            raise TypeError(f"no protobuf message is defined for an operation result of type {type(result).__name__}")
        msg = to_pb(result)
    if msg.DESCRIPTOR.full_name != expected:
        raise TypeError(f"{kind} must finish with {expected}, not {msg.DESCRIPTOR.full_name}")
    return msg.DESCRIPTOR.full_name, msg.SerializeToString()
