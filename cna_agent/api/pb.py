"""One import point for the generated protobuf/gRPC modules (built from proto/cna/v1)."""

from cna_agent._gen.cna.v1 import common_pb2, events_pb2, events_pb2_grpc, host_pb2, host_pb2_grpc  # noqa: F401
from cna_agent._gen.cna.v1 import network_pb2, network_pb2_grpc, operations_pb2, operations_pb2_grpc  # noqa: F401
from cna_agent._gen.cna.v1 import storage_pb2, storage_pb2_grpc, vm_pb2, vm_pb2_grpc  # noqa: F401
from cna_agent._gen.cna.v1 import agent_pb2, agent_pb2_grpc  # noqa: F401
from cna_agent._gen.cna.v1 import migration_pb2, migration_pb2_grpc  # noqa: F401
from cna_agent._gen.cna.v1 import backup_pb2, backup_pb2_grpc  # noqa: F401
from cna_agent._gen.cna.v1 import appliance_pb2, appliance_pb2_grpc  # noqa: F401
# The VRM implements VrmService and the agent calls it: not in SERVICE_NAMES (not served here).
from cna_agent._gen.cna.v1 import vrm_pb2, vrm_pb2_grpc  # noqa: F401

#: Every service this API defines, full names as clients see them.
SERVICE_NAMES: tuple[str, ...] = tuple(
    svc.full_name
    for mod in (host_pb2, operations_pb2, events_pb2, vm_pb2, storage_pb2, network_pb2, agent_pb2, migration_pb2, backup_pb2,
                appliance_pb2)
    for svc in mod.DESCRIPTOR.services_by_name.values()
)
