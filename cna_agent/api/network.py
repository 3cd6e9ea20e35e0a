"""NetworkService servicer: proto <-> network declarations and records, nothing else."""

from __future__ import annotations

from typing import Any

from cna_agent.api import pb
from cna_agent.api.convert import operation_to_pb
from cna_agent.api.status import abort_with
from cna_agent.api.convert import request_fingerprint as fingerprint
from cna_agent.contracts import Bandwidth
from cna_agent.errors import AgentError, InvalidArgument
from cna_agent.network.model import BandwidthDecl, BridgeDecl, PortGroupDecl
from cna_agent.network.service import NetworkOperations, NetworkService, VifRecord

_TYPES = {pb.network_pb2.BRIDGE_TYPE_LINUX: "linux", pb.network_pb2.BRIDGE_TYPE_OVS: "ovs"}
_TYPES_PB = {v: k for k, v in _TYPES.items()}
_HEALTH = {"ok": pb.common_pb2.HEALTH_OK, "degraded": pb.common_pb2.HEALTH_DEGRADED, "unreachable": pb.common_pb2.HEALTH_UNREACHABLE}
_MODELS = {pb.vm_pb2.NIC_MODEL_UNSPECIFIED: "virtio", pb.vm_pb2.NIC_MODEL_VIRTIO: "virtio", pb.vm_pb2.NIC_MODEL_E1000E: "e1000e",
           pb.vm_pb2.NIC_MODEL_E1000: "e1000", pb.vm_pb2.NIC_MODEL_RTL8139: "rtl8139"}




def bridge_from_pb(msg: Any) -> BridgeDecl:
    if msg.type not in _TYPES:
        raise InvalidArgument("bridge.type", "must be BRIDGE_TYPE_LINUX or BRIDGE_TYPE_OVS")
    return BridgeDecl(name=msg.name, type=_TYPES[msg.type], uplink=msg.uplink, mtu=msg.mtu, addresses=tuple(msg.addresses),
                      datapath_type=msg.datapath_type, fail_mode=msg.fail_mode, source="api")


def _bw_decl(msg: Any) -> BandwidthDecl:
    return BandwidthDecl(int(msg.average_kbps), int(msg.peak_kbps), int(msg.burst_kib))


def port_group_from_pb(msg: Any) -> PortGroupDecl:
    return PortGroupDecl(name=msg.name, bridge=msg.bridge, vlan=msg.vlan, trunk_vlans=tuple(msg.trunk_vlans),
                         inbound=_bw_decl(msg.inbound), outbound=_bw_decl(msg.outbound),
                         mac_anti_spoofing=msg.mac_anti_spoofing, ip_anti_spoofing=msg.ip_anti_spoofing, source="api")


def bridge_to_pb(decl: BridgeDecl, health: tuple[str, str] = ("ok", "")) -> Any:
    return pb.network_pb2.Bridge(name=decl.name, type=_TYPES_PB[decl.type], uplink=decl.uplink, mtu=decl.mtu,
                                 addresses=list(decl.addresses), datapath_type=decl.datapath_type, fail_mode=decl.fail_mode,
                                 health=_HEALTH.get(health[0], pb.common_pb2.HEALTH_UNSPECIFIED), health_reason=health[1])


def vif_to_pb(v: VifRecord) -> Any:
    return pb.network_pb2.Vif(vm_uuid=v.vm_uuid, mac=v.mac, device=v.device, interface_id=v.interface_id, link_up=v.link_up)


def port_group_to_pb(pg: PortGroupDecl, vifs: list[VifRecord]) -> Any:
    def bw(d: BandwidthDecl) -> Any:
        return pb.vm_pb2.BandwidthLimit(average_kbps=d.average_kbps, peak_kbps=d.peak_kbps, burst_kib=d.burst_kib)

    return pb.network_pb2.PortGroup(name=pg.name, bridge=pg.bridge, vlan=pg.vlan, trunk_vlans=list(pg.trunk_vlans),
                                    inbound=bw(pg.inbound), outbound=bw(pg.outbound), mac_anti_spoofing=pg.mac_anti_spoofing,
                                    ip_anti_spoofing=pg.ip_anti_spoofing, vifs=[vif_to_pb(v) for v in vifs])


TO_PB = {"bridge": bridge_to_pb, "port_group": port_group_to_pb, "vif": vif_to_pb}


def _bandwidth(msg: Any) -> Bandwidth | None:
    return Bandwidth(int(msg.average_kbps), int(msg.peak_kbps), int(msg.burst_kib)) if msg.average_kbps else None


class NetworkServicer(pb.network_pb2_grpc.NetworkServiceServicer):
    def __init__(self, service: NetworkService, ops: NetworkOperations) -> None:
        self._svc = service
        self._ops = ops

    async def _op(self, context: Any, coro: Any) -> Any:
        try:
            return operation_to_pb(await coro)
        except AgentError as exc:
            await abort_with(context, exc)

    async def ListBridges(self, request, context):
        try:
            status = await self._svc.bridge_status()
        except AgentError as exc:
            await abort_with(context, exc)
        return pb.network_pb2.ListBridgesResponse(
            bridges=[bridge_to_pb(b, status.get(n, ("ok", ""))) for n, b in sorted(self._svc.bridges.items())])

    async def EnsureBridge(self, request, context):
        if not request.HasField("bridge"):
            await abort_with(context, InvalidArgument("bridge", "is required"))
        try:
            decl = bridge_from_pb(request.bridge)
        except AgentError as exc:
            await abort_with(context, exc)
        return await self._op(context, self._ops.ensure_bridge(decl, request_id=request.request_id, fingerprint=fingerprint(request)))

    async def DeleteBridge(self, request, context):
        return await self._op(context, self._ops.delete_bridge(request.name, request_id=request.request_id, fingerprint=fingerprint(request)))

    async def ListPortGroups(self, request, context):
        try:
            vifs = await self._svc.vifs()
        except AgentError as exc:
            await abort_with(context, exc)
        pgs = [p for n, p in sorted(self._svc.port_groups.items()) if not request.bridge or p.bridge == request.bridge]
        return pb.network_pb2.ListPortGroupsResponse(
            port_groups=[port_group_to_pb(p, [v for v in vifs if v.port_group == p.name]) for p in pgs])

    async def EnsurePortGroup(self, request, context):
        if not request.HasField("port_group"):
            await abort_with(context, InvalidArgument("port_group", "is required"))
        return await self._op(context, self._ops.ensure_port_group(port_group_from_pb(request.port_group), request_id=request.request_id,
                                                                   fingerprint=fingerprint(request)))

    async def DeletePortGroup(self, request, context):
        return await self._op(context, self._ops.delete_port_group(request.name, request_id=request.request_id, fingerprint=fingerprint(request)))

    async def AttachNic(self, request, context):
        if not request.HasField("nic"):
            await abort_with(context, InvalidArgument("nic", "is required"))
        n = request.nic
        if n.model not in _MODELS:
            await abort_with(context, InvalidArgument("nic.model", f"unknown model {n.model}"))
        return await self._op(context, self._ops.attach_nic(
            request.vm, n.port_group, mac=n.mac, model=_MODELS[n.model], link_down=n.link_down, interface_id=n.interface_id,
            inbound=_bandwidth(n.inbound), outbound=_bandwidth(n.outbound),
            request_id=request.request_id, fingerprint=fingerprint(request)))

    async def DetachNic(self, request, context):
        return await self._op(context, self._ops.detach_nic(request.vm, request.mac, request_id=request.request_id, fingerprint=fingerprint(request)))

    async def SetNicLink(self, request, context):
        return await self._op(context, self._ops.set_nic_link(request.vm, request.mac, request.up, request_id=request.request_id,
                                                              fingerprint=fingerprint(request)))

    async def Reconcile(self, request, context):
        try:
            drift = await self._svc.reconcile(repair=request.repair)
        except AgentError as exc:
            await abort_with(context, exc)
        return pb.network_pb2.ReconcileResponse(
            drift=[pb.network_pb2.Drift(resource=d.resource, problem=d.problem, repaired=d.repaired, action=d.action) for d in drift])
