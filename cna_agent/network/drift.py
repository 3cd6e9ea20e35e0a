"""Port repair, level-triggered (KubeVirt's virt-handler): compare what is declared and what
every running VM's NICs say (compute's VmNics view) with the host, and repair.

Every problem is a ``network.drift`` event, every repair a ``network.repaired`` event. No step
depends on having seen an earlier event: a pass reads the declarations, OVSDB, netlink and the
VMs' interfaces afresh.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Awaitable, Callable

from cna_agent.contracts import Finding, VmStatus
from cna_agent.errors import AgentError
from cna_agent.network.ovsdb import PortWant

if TYPE_CHECKING:
    from cna_agent.network.service import NetworkService

log = logging.getLogger(__name__)


@dataclass
class DriftItem:
    resource: str
    problem: str
    repaired: bool = False
    action: str = ""


class NetworkReconciler:
    """Host-level repair (declared bridges) and, as a contracts.VmCheck named "ports", the
    per-VM repair of a VM's NICs' ports that compute's reconcile runs for each VM."""

    name = "ports"

    def __init__(self, network: "NetworkService", *, interval_s: float = 60.0) -> None:
        self.net = network
        #: How often compute's reconcile runs the port check over every VM (0 = start and events).
        self.interval_s = interval_s

    async def check_vm(self, vm: VmStatus) -> list[Finding]:
        """One VM's NICs: ports missing, on the wrong VLAN or unlabelled are repaired."""
        # A stopped VM is judged too: its agent-plugged ports and anti-spoofing rules go.
        return [Finding(self.name, vm.uuid, d.problem, d.repaired, d.action)
                for d in await self.reconcile(repair=True, vm_uuid=vm.uuid)]

    async def bridge_drift(self, decls: Any) -> list[DriftItem]:
        drift: list[DriftItem] = []
        decls = list(decls)
        ovs_state = None
        if any(d.type == "ovs" for d in decls):
            try:
                ovs_state = await self.net.ovs.call(lambda c: c.bridges())
            except AgentError as exc:
                for d in decls:
                    if d.type == "ovs":
                        drift.append(DriftItem(f"bridge/{d.name}", f"OVSDB unreachable: {exc.message}"))
        for d in decls:
            res = f"bridge/{d.name}"
            if d.type == "ovs":
                if ovs_state is None:
                    continue
                br = ovs_state.get(d.name)
                if br is None:
                    drift.append(DriftItem(res, "OVS bridge missing"))
                    continue
                if br.datapath_type != d.effective_datapath:
                    drift.append(DriftItem(res, f"datapath_type is {br.datapath_type or 'system'}, declared {d.effective_datapath}"))
                if (br.fail_mode or "standalone") != d.effective_fail_mode:
                    drift.append(DriftItem(res, f"fail_mode is {br.fail_mode or 'standalone'}, declared {d.effective_fail_mode}"))
                if d.uplink and d.uplink not in br.ports:
                    drift.append(DriftItem(res, f"uplink {d.uplink} is not a port"))
                st = await self.net.blocking(lambda: self.net.linux.state(d.name))
                if st.exists and not st.up:
                    drift.append(DriftItem(res, "bridge interface is down"))
            else:
                st = await self.net.blocking(lambda: self.net.linux.state(d.name))
                if not st.exists:
                    drift.append(DriftItem(res, "Linux bridge missing"))
                    continue
                if not st.up:
                    drift.append(DriftItem(res, "bridge interface is down"))
                if d.mtu and st.mtu != d.mtu:
                    drift.append(DriftItem(res, f"mtu is {st.mtu}, declared {d.mtu}"))
                if d.uplink and d.uplink not in st.ports:
                    drift.append(DriftItem(res, f"uplink {d.uplink} is not enslaved"))
                for a in d.addresses:
                    if a not in st.addresses:
                        drift.append(DriftItem(res, f"address {a} missing"))
        return drift

    async def _vif_drift(self, only_port_group: str = "", vm_uuid: str = "", *,
                         leftovers_only: bool = False) -> list[tuple[DriftItem, Callable[[], Awaitable[list[str]]]]]:
        """Problems with running VMs' NICs (of one VM, or all), each with the coroutine that
        repairs it; ``leftovers_only``: only what is left of NICs that are gone."""
        found: list[tuple[DriftItem, Callable[[], Awaitable[list[str]]]]] = []
        nics = [self.net.normalise(v) for v in await self.net.vms.vm_nics(vm_uuid)]
        ours = any(v.active and v.bridge in self.net.bridges for v in nics) and not leftovers_only
        has_ovs = any(b.type == "ovs" for b in self.net.bridges.values())
        if ours or (has_ovs and (self.net.ovs_plugged_by == "agent" or leftovers_only)):
            try:
                ovs_state = await self.net.ovs.call(lambda c: c.bridges())
            except AgentError:
                ovs_state = None
        else:
            ovs_state = None  # nothing of ours to check: no OVSDB round trip
        for v in nics if ours else ():
            if not v.active:
                continue
            uuid, name = v.vm_uuid, v.vm_name
            if v.type != "bridge" or not v.device or v.bridge not in self.net.bridges:
                continue
            decl = self.net.bridges[v.bridge]
            res = f"port/{v.device}"
            agent_plugged = self.net.ovs_plugged_by == "agent" and v.port_group in self.net.port_groups
            if decl.type == "ovs" and v.virtualport == "openvswitch":
                if ovs_state is None or v.bridge not in ovs_state:
                    continue  # the bridge's own drift covers it
                port = ovs_state[v.bridge].ports.get(v.device)
                pg_name = v.port_group or (port.external_ids.get("port-group", "") if port is not None else "") or self.net.decls.guess_port_group(v)
                if only_port_group and pg_name != only_port_group:
                    continue
                pg = self.net.port_groups.get(pg_name)
                tag = (pg.vlan or None) if pg is not None else v.vlan
                trunks = tuple(pg.trunk_vlans) if pg is not None else tuple(v.trunk)
                plugged = (("cna-plugged", "agent"),) if agent_plugged else ()
                want = PortWant(
                    name=v.device, tag=tag, trunks=trunks,
                    external_ids=(("port-group", pg_name),) + plugged if pg_name else plugged,
                    iface_external_ids=(("attached-mac", v.mac), ("iface-id", v.interface_id or uuid), ("iface-status", "active"),
                                        ("vm-id", uuid), ("vm-uuid", uuid)) + ((("port-group", pg_name),) if pg_name else ()),
                    # The outbound limit is an OpenFlow meter (guarding.py), not OVS policing.
                    ingress_rate_kbps=0 if port is None else port.ingress_policing_rate,
                    egress_max_rate_bps=v.inbound_kbps * 1000 if port is None else port.qos_max_rate,
                )
                if port is None and agent_plugged:
                    problem = f"tap of VM {name} NIC {v.mac} is not plugged into {v.bridge} (the agent plugs it)"
                elif port is None:
                    problem = f"OVS port of VM {name} NIC {v.mac} missing from {v.bridge}"
                elif port.tag != tag or tuple(port.trunks) != trunks:
                    problem = f"VLAN is tag={port.tag} trunks={list(port.trunks)}, port group {pg_name or '?'} says tag={tag} trunks={list(trunks)}"
                elif pg_name and port.external_ids.get("port-group") != pg_name:
                    problem = f"port lacks its external_ids (port-group {pg_name})"
                else:
                    continue
                bridge_name = v.bridge

                async def fix(bridge_name: str = bridge_name, want: PortWant = want) -> list[str]:
                    return await self.net.ovs.call(lambda c: c.ensure_ports(bridge_name, [want]))

                found.append((DriftItem(res, problem), fix))
            elif decl.type == "linux":
                st = await self.net.blocking(lambda: self.net.linux.state(v.bridge))
                if st.exists and v.device not in st.ports and await self.net.blocking(lambda: self.net.linux.link_exists(v.device)):
                    dev, br = v.device, v.bridge

                    async def fix_lb(dev: str = dev, br: str = br) -> list[str]:
                        return await self.net.blocking(lambda: _enslave(dev, br))

                    found.append((DriftItem(res, f"tap of VM {name} NIC {v.mac} is not on bridge {br}"), fix_lb))
        found += self._stale_agent_ports(nics, ovs_state, vm_uuid)
        for g in await self.net.guards.drift(nics, vm_uuid=vm_uuid):
            if not leftovers_only or g.problem.startswith("stale"):
                found.append((DriftItem(g.resource, g.problem), g.fix))
        return found

    def _stale_agent_ports(self, nics: list[Any], ovs_state: Any, vm_uuid: str) -> list[tuple[DriftItem, Callable[[], Awaitable[list[str]]]]]:
        """Ports the agent plugged whose NIC is gone (VM stopped, NIC unplugged, VM deleted):
        libvirt removed the tap but knows nothing of the port."""
        if not ovs_state:
            return []
        live = {v.device for v in nics if v.active and v.device}
        out = []
        for br, state in ovs_state.items():
            if br not in self.net.bridges:
                continue
            for port in state.ports.values():
                if port.external_ids.get("cna-plugged") != "agent" or port.name in live:
                    continue
                if vm_uuid and port.iface_external_ids.get("vm-uuid") != vm_uuid:
                    continue

                async def fix(br: str = br, name: str = port.name) -> list[str]:
                    return await self.net.ovs.call(lambda c: c.delete_ports(br, [name]))

                out.append((DriftItem(f"port/{port.name}", f"agent-plugged port {port.name} on {br} has no running NIC "
                                      f"(VM {port.iface_external_ids.get('vm-uuid', '?')})"), fix))
        return out

    async def reconcile(self, repair: bool = True, *, only_port_group: str = "", vm_uuid: str = "",
                        ports: bool = True) -> list[DriftItem]:
        """Compare declared networks and running VMs' NICs with the host; repair when asked.

        ``vm_uuid``: only that VM's ports (no bridges); ``only_port_group``: only the ports in
        that group; ``ports=False``: the bridges, and only the leftovers of NICs that are gone
        (anti-spoofing rules, agent-plugged ports of a deleted VM, which no per-VM check sees)."""
        results: list[DriftItem] = []
        async with self.net.lock:
            if not only_port_group and not vm_uuid:
                for item in await self.bridge_drift(self.net.bridges.values()):
                    results.append(item)
                    if repair and "unreachable" not in item.problem:
                        name = item.resource.split("/", 1)[1]
                        try:
                            changes = await self.net.apply_bridge(self.net.bridges[name])
                            item.repaired, item.action = True, "; ".join(changes) or "re-applied"
                        except AgentError as exc:
                            item.action = f"repair failed: {exc.message}"
            for item, fix in await self._vif_drift(only_port_group, vm_uuid, leftovers_only=not ports):
                results.append(item)
                if repair:
                    try:
                        item.action = "; ".join(await fix()) or "re-applied"
                        item.repaired = True
                    except AgentError as exc:
                        item.action = f"repair failed: {exc.message}"
        # One bridge repair covers several problems of that bridge: report each once.
        for item in results:
            if not only_port_group:
                await self.net.events.publish(
                    "network.repaired" if item.repaired else "network.drift",
                    severity="info" if item.repaired else "warning",
                    resource_kind="network", resource_id=item.resource, resource_name=item.resource,
                    message=f"{item.problem}" + (f"; repaired: {item.action}" if item.repaired else ""),
                    attributes={"problem": item.problem, "action": item.action},
                )
        return results

    async def apply_declared(self) -> None:
        """Agent start: (re)apply every declaration, then repair VM NIC drift."""
        for decl in self.net.bridges.values():
            try:
                decl = await self.net.check_bridge(decl, f"network.bridges.{decl.name}")
                changes = await self.net.apply_bridge(decl)
                if changes:
                    await self.net.publish("network.bridge.ensured", "bridge", decl.name, changes)
            except AgentError as exc:
                log.error("event=network.apply_failed bridge=%s error=%r", decl.name, exc.message)
                await self.net.events.publish("network.drift", severity="error", resource_kind="network",
                                           resource_id=f"bridge/{decl.name}", resource_name=decl.name,
                                           message=f"declared bridge could not be applied: {exc.message}")
        for pg in list(self.net.port_groups.values()):
            try:
                await self.net.check_port_group(pg, f"network.port_groups.{pg.name}")
            except AgentError as exc:
                log.error("event=network.port_group_refused port_group=%s error=%r", pg.name, exc.message)
                await self.net.events.publish("network.drift", severity="error", resource_kind="network",
                                           resource_id=f"port_group/{pg.name}", resource_name=pg.name,
                                           message=f"declared port group is unusable: {exc.message}")
        try:
            await self.reconcile(repair=True)
        except AgentError as exc:
            log.warning("event=network.reconcile_failed error=%r", exc.message)


def _enslave(dev: str, bridge: str) -> list[str]:
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        d, b = ipr.link_lookup(ifname=dev), ipr.link_lookup(ifname=bridge)
        if not d or not b:
            return []
        ipr.link("set", index=d[0], master=b[0], state="up")
        return [f"enslaved {dev} to {bridge}"]
