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
    from cna_agent.api.storage import datastore_to_pb, volume_to_pb
    from cna_agent.api.vm_convert import snapshot_to_pb, vm_to_pb
    from cna_agent.compute.inventory import VmInfo
    from cna_agent.compute.snapshots import SnapshotInfo
    from cna_agent.contracts import VmNic
    from cna_agent.network.declarations import BridgeView, PortGroupView
    from cna_agent.storage.service import DatastoreStatus
    from cna_agent.storage.volumes import VolumeInfo

    return {
        VmInfo: vm_to_pb,
        SnapshotInfo: snapshot_to_pb,
        VolumeInfo: volume_to_pb,
        DatastoreStatus: datastore_to_pb,
        BridgeView: bridge_view_to_pb,
        PortGroupView: port_group_view_to_pb,
        VmNic: vif_to_pb,
    }


_TABLE: dict[type, Callable[[Any], Any]] | None = None


def encode_result(result: Any) -> tuple[str, bytes]:
    """(full message name, serialized message) for an operation's result."""
    global _TABLE
    if _TABLE is None:
        _TABLE = _table()
    to_pb = _TABLE.get(type(result))
    if to_pb is None:
        raise TypeError(f"no protobuf message is defined for an operation result of type {type(result).__name__}")
    msg = to_pb(result)
    return msg.DESCRIPTOR.full_name, msg.SerializeToString()
