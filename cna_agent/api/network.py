"""NetworkService servicer: proto <-> network declarations and views, nothing else.

AttachNic/DetachNic/SetNicLink change a VM's devices, which compute owns: they go to compute's
NicOperations (compute/nics.py), the same way disk changes go to compute/disks.py.
"""

from __future__ import annotations

from typing import Any

from cna_agent.api import pb
from cna_agent.api.convert import operation_to_pb
from cna_agent.api.convert import request_fingerprint as fingerprint
from cna_agent.api.vm_convert import spec_from_pb
from cna_agent.compute.nics import NicOperations
from cna_agent.contracts import Bandwidth, VmNic
from cna_agent.errors import InvalidArgument
from cna_agent.network.declarations import BridgeView, PortGroupView
from cna_agent.network.model import BridgeDecl, PortGroupDecl
from cna_agent.network.operations import NetworkOperations
from cna_agent.network.service import NetworkService

_TYPES = {pb.network_pb2.BRIDGE_TYPE_LINUX: "linux", pb.network_pb2.BRIDGE_TYPE_OVS: "ovs"}
_TYPES_PB = {v: k for k, v in _TYPES.items()}
_HEALTH = {"ok": pb.common_pb2.HEALTH_OK, "degraded": pb.common_pb2.HEALTH_DEGRADED, "unreachable": pb.common_pb2.HEALTH_UNREACHABLE}




def bridge_from_pb(msg: Any) -> BridgeDecl:
    if msg.type not in _TYPES:
        raise InvalidArgument("bridge.type", "must be BRIDGE_TYPE_LINUX or BRIDGE_TYPE_OVS")
    return BridgeDecl(name=msg.name, type=_TYPES[msg.type], uplink=msg.uplink, mtu=msg.mtu, addresses=tuple(msg.addresses),
                      datapath_type=msg.datapath_type, fail_mode=msg.fail_mode, source="api")


def _bw_decl(msg: Any) -> Bandwidth:
    return Bandwidth(int(msg.average_kbps), int(msg.peak_kbps), int(msg.burst_kib))


def port_group_from_pb(msg: Any) -> PortGroupDecl:
    return PortGroupDecl(name=msg.name, bridge=msg.bridge, vlan=msg.vlan, trunk_vlans=tuple(msg.trunk_vlans),
                         inbound=_bw_decl(msg.inbound), outbound=_bw_decl(msg.outbound),
                         mac_anti_spoofing=msg.mac_anti_spoofing, ip_anti_spoofing=msg.ip_anti_spoofing, source="api")


def bridge_to_pb(decl: BridgeDecl, health: tuple[str, str] = ("ok", "")) -> Any:
    return pb.network_pb2.Bridge(name=decl.name, type=_TYPES_PB[decl.type], uplink=decl.uplink, mtu=decl.mtu,
                                 addresses=list(decl.addresses), datapath_type=decl.datapath_type, fail_mode=decl.fail_mode,
                                 health=_HEALTH.get(health[0], pb.common_pb2.HEALTH_UNSPECIFIED), health_reason=health[1])


def bridge_view_to_pb(view: BridgeView) -> Any:
    return bridge_to_pb(view.decl, (view.health, view.reason))


def vif_to_pb(v: VmNic) -> Any:
    return pb.network_pb2.Vif(vm_uuid=v.vm_uuid, mac=v.mac, device=v.device, interface_id=v.interface_id, link_up=v.link_up)


def port_group_view_to_pb(view: PortGroupView) -> Any:
    return port_group_to_pb(view.decl, list(view.vifs))


def port_group_to_pb(pg: PortGroupDecl, vifs: list[VmNic]) -> Any:
    def bw(d: Bandwidth) -> Any:
        return pb.vm_pb2.BandwidthLimit(average_kbps=d.average_kbps, peak_kbps=d.peak_kbps, burst_kib=d.burst_kib)

    return pb.network_pb2.PortGroup(name=pg.name, bridge=pg.bridge, vlan=pg.vlan, trunk_vlans=list(pg.trunk_vlans),
                                    inbound=bw(pg.inbound), outbound=bw(pg.outbound), mac_anti_spoofing=pg.mac_anti_spoofing,
                                    ip_anti_spoofing=pg.ip_anti_spoofing, vifs=[vif_to_pb(v) for v in vifs])


class NetworkServicer(pb.network_pb2_grpc.NetworkServiceServicer):
    def __init__(self, service: NetworkService, ops: NetworkOperations, nics: NicOperations) -> None:
        self._svc = service
        self._ops = ops
        self._nics = nics

    async def _op(self, context: Any, coro: Any) -> Any:
        return operation_to_pb(await coro)

    async def ListBridges(self, request, context):
        status = await self._svc.bridge_status()
        return pb.network_pb2.ListBridgesResponse(
            bridges=[bridge_to_pb(b, status.get(n, ("ok", ""))) for n, b in sorted(self._svc.bridges.items())])

    async def EnsureBridge(self, request, context):
        if not request.HasField("bridge"):
            raise InvalidArgument("bridge", "is required")
        decl = bridge_from_pb(request.bridge)
        return await self._op(context, self._ops.ensure_bridge(decl, request_id=request.request_id, fingerprint=fingerprint(request)))

    async def DeleteBridge(self, request, context):
        return await self._op(context, self._ops.delete_bridge(request.name, request_id=request.request_id, fingerprint=fingerprint(request)))

    async def ListPortGroups(self, request, context):
        vifs = await self._svc.vifs()
        pgs = [p for n, p in sorted(self._svc.port_groups.items()) if not request.bridge or p.bridge == request.bridge]
        return pb.network_pb2.ListPortGroupsResponse(
            port_groups=[port_group_to_pb(p, [v for v in vifs if v.port_group == p.name]) for p in pgs])

    async def EnsurePortGroup(self, request, context):
        if not request.HasField("port_group"):
            raise InvalidArgument("port_group", "is required")
        return await self._op(context, self._ops.ensure_port_group(port_group_from_pb(request.port_group), request_id=request.request_id,
                                                                   fingerprint=fingerprint(request)))

    async def DeletePortGroup(self, request, context):
        return await self._op(context, self._ops.delete_port_group(request.name, request_id=request.request_id, fingerprint=fingerprint(request)))

    async def AttachNic(self, request, context):
        if not request.HasField("nic"):
            raise InvalidArgument("nic", "is required")
        # The one proto->spec conversion for NICs lives in vm_convert (it converts whole VmSpecs).
        nic = spec_from_pb(pb.vm_pb2.VmSpec(nics=[request.nic])).nics[0]
        return await self._op(context, self._nics.attach(request.vm, nic, request_id=request.request_id,
                                                         fingerprint=fingerprint(request)))

    async def DetachNic(self, request, context):
        return await self._op(context, self._nics.detach(request.vm, request.mac, request_id=request.request_id,
                                                         fingerprint=fingerprint(request)))

    async def SetNicLink(self, request, context):
        return await self._op(context, self._nics.set_link(request.vm, request.mac, request.up, request_id=request.request_id,
                                                           fingerprint=fingerprint(request)))

    async def Reconcile(self, request, context):
        drift = await self._svc.reconcile(repair=request.repair)
        return pb.network_pb2.ReconcileResponse(
            drift=[pb.network_pb2.Drift(resource=d.resource, problem=d.problem, repaired=d.repaired, action=d.action) for d in drift])
