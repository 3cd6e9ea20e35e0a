"""NetworkService: declared host networks and the ports VM NICs plug into.

What it owns:

* the declarations (declarations.py): bridges and port groups from agent.toml and the VRM;
* applying them: OVS through the OVSDB IDL (ovsdb.py), Linux bridges through netlink
  (linuxbridge.py), each "ensure" reporting what it changed;
* compute's PortProvider (contracts.py): binding a port group for a NIC (``resolve_port_group``)
  and labelling the OVS port of a NIC compute just plugged (``port_plugged``);
* the ports' repair (drift.py), level-triggered: compare what is declared and what every VM's
  NICs say (compute's VmNics view) with the host, and repair;
* NIC anti-spoofing (vifguard.py, guarding.py): enforced by the agent with nftables (Linux
  bridges) and OpenFlow (OVS) in every libvirt mode, never libvirt's nwfilter (absent from the
  embedded driver, blind to OVS ports);
* who plugs OVS ports: libvirt, unless libvirt would reach another OVSDB than the agent's
  (a libvirtd with ``[network] ovsdb`` pointing at a private database): then the NIC is an
  ``<interface type='ethernet'>`` tap and this service adds the port (``plugged_by="agent"``).

VM NICs themselves (hot-plug, unplug, link state) are compute's (compute/nics.py): network never
edits a VM's definition. Every input is validated (model.py) before anything on the host changes.
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import replace
from typing import Any, Callable

from cna_agent.blocking import BlockingPool
from cna_agent.contracts import Bandwidth, NicBinding, VmNic, VmNics
from cna_agent.errors import AgentError, FailedPrecondition, InvalidArgument, NotFound
from cna_agent.network.declarations import BridgeView, Declarations, PortGroupView
from cna_agent.network.drift import DriftItem, NetworkReconciler
from cna_agent.network.guarding import Guards
from cna_agent.network.linuxbridge import LinuxBridgeDriver, probe_vlan_support
from cna_agent.network.model import BridgeDecl, PortGroupDecl, validate_bridge, validate_port_group
from cna_agent.network.ovsdb import OvsdbClient
from cna_agent.state.eventlog import EventHub

log = logging.getLogger(__name__)

DEFAULT_OVSDB = "unix:/run/openvswitch/db.sock"

__all__ = ["DEFAULT_OVSDB", "DriftItem", "NetworkService"]


def _bw(decl: Bandwidth) -> Bandwidth | None:
    return decl if decl.is_set else None


#: How long a NIC binding waits for the first apply of the declared bridges (expect_initial_apply).
INITIAL_APPLY_WAIT_S = 30.0


class NetworkService:
    def __init__(
        self,
        *,
        ovsdb: str = DEFAULT_OVSDB,
        ovsdb_timeout_s: float = 10.0,
        netlink_threads: int = 2,
        netlink_timeout_s: float = 30.0,
        state_dir: str,
        events: EventHub,
        vms: VmNics,
        config_bridges: tuple[BridgeDecl, ...] = (),
        config_port_groups: tuple[PortGroupDecl, ...] = (),
        reconcile_interval_s: float = 60.0,
        libvirt_embedded: bool = True,
    ) -> None:
        self.ovs = OvsdbClient(ovsdb, ovsdb_timeout_s)
        #: Set once the first apply of the declared bridges has run (expect_initial_apply).
        self._initial_apply: asyncio.Event | None = None
        self.linux = LinuxBridgeDriver()
        #: Netlink (pyroute2) and sysfs work; [network] netlink_threads, a deadline per call.
        self.netlink_pool = BlockingPool("netlink", netlink_threads, netlink_timeout_s)
        self.events = events
        #: Every VM's NICs (compute's inventory): the only way network learns about VMs.
        self.vms = vms
        self.decls = Declarations(state_dir, config_bridges, config_port_groups)
        self.lock = asyncio.Lock()
        self.reconciler = NetworkReconciler(self, interval_s=reconcile_interval_s)
        self.guards = Guards(self, ovsdb)
        #: "agent" when libvirt's own ovs-vsctl would use another database than ours.
        self.ovs_plugged_by = "libvirt"
        if libvirt_embedded:
            _point_libvirt_at(ovsdb)
        elif ovsdb != DEFAULT_OVSDB:
            self.ovs_plugged_by = "agent"
            log.warning("event=network.ovs_ports_plugged_by_agent ovsdb=%s reason=%r", ovsdb,
                        "[network] ovsdb is not the default database and [libvirt] uri is a libvirtd, whose "
                        "ovs-vsctl uses the default one: OVS NICs are rendered as type='ethernet' taps and "
                        "the agent adds their ports to the bridge through its own OVSDB connection")

    @property
    def bridges(self) -> dict[str, BridgeDecl]:
        return self.decls.bridges

    @property
    def port_groups(self) -> dict[str, PortGroupDecl]:
        return self.decls.port_groups

    async def blocking(self, fn: Callable[[], Any], what: str = "netlink call") -> Any:
        return await self.netlink_pool.run(fn, what=what)

    # -- bridges --------------------------------------------------------------------------

    async def check_bridge(self, decl: BridgeDecl, prefix: str = "bridge") -> BridgeDecl:
        """Everything that can be refused is refused here, before the host changes."""
        decl = validate_bridge(decl, prefix)
        if decl.name in self.decls.config_bridges and decl.source != "config":
            raise FailedPrecondition(f"{prefix}.name: bridge {decl.name!r} is declared in agent.toml; change it there", field=f"{prefix}.name")
        other = next((b for b in self.bridges.values() if b.uplink and b.uplink == decl.uplink and b.name != decl.name), None)
        if other is not None:
            raise InvalidArgument(f"{prefix}.uplink", f"{decl.uplink!r} is already the uplink of bridge {other.name!r}")
        if decl.uplink and not await self.blocking(lambda: self.linux.link_exists(decl.uplink)):
            raise InvalidArgument(f"{prefix}.uplink", f"uplink {decl.uplink!r} does not exist on this host")
        if decl.type == "linux" and decl.name not in self.bridges:
            exists = await self.blocking(lambda: self.linux.link_exists(decl.name))
            if exists and not await self.blocking(lambda: self.linux.is_bridge(decl.name)):
                raise FailedPrecondition(f"{prefix}.name: {decl.name!r} exists on this host and is not a bridge", field=f"{prefix}.name")
        current = self.bridges.get(decl.name)
        if current is not None and current.type != decl.type:
            raise FailedPrecondition(f"{prefix}.type: bridge {decl.name!r} is already declared as {current.type}; delete it first", field=f"{prefix}.type")
        return decl

    async def apply_bridge(self, decl: BridgeDecl) -> list[str]:
        """Make the host match one (validated) bridge declaration; returns the changes."""
        if decl.type == "ovs":
            changes = await self.ovs.call(lambda c: c.ensure_bridge(
                decl.name, datapath_type=decl.effective_datapath, fail_mode=decl.effective_fail_mode,
                uplink=decl.uplink, mtu=decl.mtu))
            # The bridge's internal port is a kernel link; an admin may have set it down.
            changes += await self.blocking(lambda: self._link_up(decl.name))
            return changes
        return await self.blocking(lambda: self.linux.ensure(decl.name, uplink=decl.uplink, mtu=decl.mtu, addresses=decl.addresses))

    def _link_up(self, name: str) -> list[str]:
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            idx = ipr.link_lookup(ifname=name)
            if not idx:
                return []
            if ipr.get_links(idx[0])[0]["flags"] & 1:
                return []
            ipr.link("set", index=idx[0], state="up")
            return [f"brought {name} up"]

    async def ensure_bridge(self, decl: BridgeDecl) -> tuple[BridgeDecl, list[str]]:
        decl = await self.check_bridge(decl)
        async with self.lock:
            changes = await self.apply_bridge(decl)
            if decl.source != "config":
                self.decls.api_bridges[decl.name] = decl
                self.decls.save()
        await self.publish("network.bridge.ensured", "bridge", decl.name, changes)
        return decl, changes

    async def delete_bridge(self, name: str) -> bool:
        if name in self.decls.config_bridges:
            raise FailedPrecondition(f"name: bridge {name!r} is declared in agent.toml; remove it there", field="name")
        decl = self.decls.api_bridges.get(name)
        if decl is None:
            raise NotFound(f"name: no declared bridge {name!r}", field="name")
        users = [p.name for p in self.port_groups.values() if p.bridge == name]
        if users:
            raise FailedPrecondition(f"name: bridge {name!r} still carries port groups {', '.join(sorted(users))}", field="name")
        vifs = [v for v in await self.vifs() if v.bridge == name]
        if vifs:
            raise FailedPrecondition(f"name: bridge {name!r} still has VM NICs ({', '.join(v.device or v.mac for v in vifs)})", field="name")
        async with self.lock:
            if decl.type == "ovs":
                await self.ovs.call(lambda c: c.delete_bridge(name))
            else:
                await self.blocking(lambda: self.linux.delete(name))
            del self.decls.api_bridges[name]
            self.decls.save()
        await self.publish("network.bridge.deleted", "bridge", name, [f"deleted bridge {name}"])
        return True

    async def bridge_status(self) -> dict[str, tuple[str, str]]:
        """name -> ("ok"|"degraded"|"unreachable", reason) for every declared bridge."""
        out: dict[str, tuple[str, str]] = {}
        drift = await self.reconciler.bridge_drift(self.bridges.values())
        for name in self.bridges:
            problems = [d.problem for d in drift if d.resource == f"bridge/{name}"]
            if not problems:
                out[name] = ("ok", "")
            elif any("missing" in p or "unreachable" in p for p in problems):
                out[name] = ("unreachable", "; ".join(problems))
            else:
                out[name] = ("degraded", "; ".join(problems))
        return out

    # -- port groups ----------------------------------------------------------------------

    async def check_port_group(self, pg: PortGroupDecl, prefix: str = "port_group") -> PortGroupDecl:
        pg = validate_port_group(pg, self.bridges, prefix)
        if pg.name in self.decls.config_port_groups and pg.source != "config":
            raise FailedPrecondition(f"{prefix}.name: port group {pg.name!r} is declared in agent.toml; change it there", field=f"{prefix}.name")
        bridge = self.bridges[pg.bridge]
        if bridge.type == "linux" and (pg.vlan or pg.trunk_vlans):
            await self.blocking(lambda: self.linux.require_vlans(f"{prefix}.vlan" if pg.vlan else f"{prefix}.trunk_vlans"))
        if bridge.type == "linux" and (pg.vlan or pg.trunk_vlans):  # pragma: no cover - hosts with 8021q
            raise FailedPrecondition(f"{prefix}.vlan: VLAN port groups on Linux bridges are not implemented yet; use OVS", field=f"{prefix}.vlan")
        return pg

    async def ensure_port_group(self, pg: PortGroupDecl) -> tuple[PortGroupDecl, list[str]]:
        pg = await self.check_port_group(pg)
        async with self.lock:
            if pg.source != "config":
                self.decls.api_port_groups[pg.name] = pg
                self.decls.save()
        # VIFs already in the group follow its new VLAN: re-tag through the reconciler's path.
        changes = [f"port group {pg.name} on {pg.bridge}"]
        changes += [d.action for d in await self.reconciler.reconcile(repair=True, only_port_group=pg.name) if d.repaired]
        await self.publish("network.port_group.ensured", "port_group", pg.name, changes)
        return pg, changes

    async def delete_port_group(self, name: str) -> bool:
        if name in self.decls.config_port_groups:
            raise FailedPrecondition(f"name: port group {name!r} is declared in agent.toml; remove it there", field="name")
        if name not in self.decls.api_port_groups:
            raise NotFound(f"name: no declared port group {name!r}", field="name")
        users = [v for v in await self.vifs() if v.port_group == name]
        if users:
            raise FailedPrecondition(f"name: port group {name!r} still has NICs of VMs {', '.join(sorted({v.vm_name for v in users}))}", field="name")
        async with self.lock:
            del self.decls.api_port_groups[name]
            self.decls.save()
        await self.publish("network.port_group.deleted", "port_group", name, [])
        return True

    def expect_initial_apply(self) -> None:
        """The daemon applies the declared bridges just after it is ready (so a slow OVSDB does
        not hold up gRPC); until that first apply has run, a NIC binding waits for it (up to
        INITIAL_APPLY_WAIT_S). Seen in CI: a CreateVm+start right after READY met a Linux bridge
        not made yet, and QEMU failed on "Cannot get interface MTU ... No such device"."""
        self._initial_apply = asyncio.Event()

    async def resolve_port_group(self, port_group: str, *, field: str) -> NicBinding:
        """compute's PortProvider: what libvirt must be told for a NIC in ``port_group``."""
        pg = self.port_groups.get(port_group)
        if pg is None:
            known = ", ".join(sorted(self.port_groups)) or "none declared"
            raise InvalidArgument(field, f"unknown port group {port_group!r} (declared: {known})")
        if self._initial_apply is not None and not self._initial_apply.is_set():
            try:
                await asyncio.wait_for(self._initial_apply.wait(), INITIAL_APPLY_WAIT_S)
            except asyncio.TimeoutError:
                log.warning("event=network.initial_apply_slow port_group=%s (binding without waiting longer)", port_group)
        bridge = self.bridges[pg.bridge]
        return NicBinding(
            kind="ovs" if bridge.type == "ovs" else "linux-bridge",
            bridge=bridge.name,
            port_group=pg.name,
            vlan=pg.vlan or None,
            trunk=pg.trunk_vlans,
            inbound=_bw(pg.inbound),
            outbound=_bw(pg.outbound),
            # Anti-spoofing is the agent's own (vifguard.py), not libvirt's nwfilter.
            mtu=bridge.mtu,
            plugged_by=self.ovs_plugged_by if bridge.type == "ovs" else "libvirt",
            host_offloads=not (bridge.type == "ovs" and bridge.effective_datapath == "netdev"),
        )

    # -- VM NICs: ports and listings (the NICs themselves are compute's) ---------------------

    async def port_plugged(self, binding: NicBinding, nic: VmNic) -> None:
        """PortProvider: a NIC was just hot-plugged. Its port is labelled (or, when the agent
        plugs OVS ports, added) and its anti-spoofing applied, through the same repair pass
        the reconcile runs, for this VM."""
        if binding.kind == "ovs" and nic.device and binding.plugged_by == "libvirt":
            try:
                await self.ovs.call(lambda c: c.set_port_ids(nic.device, {"port-group": binding.port_group},
                                                             {"vm-uuid": nic.vm_uuid, "port-group": binding.port_group}))
            except AgentError as exc:
                log.warning("event=network.port_label_failed port=%s vm=%s error=%r (the port repair retries)",
                            nic.device, nic.vm_uuid, exc.message)
        await self._repair_vm(nic.vm_uuid)

    async def port_unplugged(self, nic: VmNic) -> None:
        """PortProvider: a NIC left its VM; its agent-plugged port and guards go with it."""
        await self._repair_vm(nic.vm_uuid)

    async def _repair_vm(self, vm_uuid: str) -> None:
        try:
            await self.reconciler.reconcile(repair=True, vm_uuid=vm_uuid)
        except AgentError as exc:
            log.warning("event=network.port_repair_failed vm=%s error=%r (the reconcile retries)", vm_uuid, exc.message)

    def normalise(self, nic: VmNic) -> VmNic:
        """An agent-plugged OVS NIC (libvirt sees an ethernet tap) as the OVS VIF it is: on
        its port group's bridge, with an openvswitch virtualport."""
        if nic.type == "ethernet" and nic.port_group in self.port_groups:
            bridge = self.bridges.get(self.port_groups[nic.port_group].bridge)
            if bridge is not None and bridge.type == "ovs":
                return replace(nic, type="bridge", bridge=bridge.name, virtualport="openvswitch")
        return nic

    async def vifs(self, vm_uuid: str = "") -> list[VmNic]:
        """Every VM NIC on a declared bridge, with its port group (the VM spec's, else the OVS
        port's label, else the group its bridge and VLAN match)."""
        try:
            ovs_ports = await self.ovs.call(lambda c: {p.name: p for b in c.bridges().values() for p in b.ports.values()})
        except AgentError:
            ovs_ports = {}
        out = []
        for nic in map(self.normalise, await self.vms.vm_nics(vm_uuid)):
            if nic.type != "bridge" or nic.bridge not in self.bridges:
                continue
            port = ovs_ports.get(nic.device)
            label = port.external_ids.get("port-group", "") if port is not None else ""
            pg = nic.port_group or label or self.decls.guess_port_group(nic)
            out.append(replace(nic, port_group=pg))
        return out

    async def bridge_view(self, name: str) -> BridgeView:
        health, reason = (await self.bridge_status()).get(name, ("ok", ""))
        return BridgeView(self.bridges[name], health, reason)

    async def port_group_view(self, name: str, vifs: list[VmNic] | None = None) -> PortGroupView:
        vifs = await self.vifs() if vifs is None else vifs
        return PortGroupView(self.port_groups[name], tuple(v for v in vifs if v.port_group == name))

    async def reconcile(self, repair: bool = True, *, only_port_group: str = "", ports: bool = True) -> list[DriftItem]:
        return await self.reconciler.reconcile(repair, only_port_group=only_port_group, ports=ports)

    async def apply_declared(self) -> None:
        try:
            await self.reconciler.apply_declared()
        finally:
            if self._initial_apply is not None:
                self._initial_apply.set()

    async def facts(self) -> dict[str, Any]:
        support = await self.blocking(probe_vlan_support)
        return {"linux_vlan_devices": support.vlan_devices, "linux_vlan_filtering": support.vlan_filtering}

    async def publish(self, type_: str, kind: str, rid: str, changes: list[str], name: str = "") -> None:
        await self.events.publish(type_, severity="info", resource_kind=kind, resource_id=rid, resource_name=name or rid,
                                   message="; ".join(changes) or "no change", attributes={"changed": str(bool(changes)).lower()})

    async def close(self) -> None:
        self.ovs.close()
        self.netlink_pool.shutdown()


def _point_libvirt_at(remote: str) -> None:
    """libvirt plugs OVS NICs by running ovs-vsctl, which finds the database through
    OVS_RUNDIR. With the embedded QEMU driver those commands are our children, so a private
    database (``[network] ovsdb = "unix:/some/dir/db.sock"``) must be announced there; a
    libvirtd keeps its own environment (it uses the system database)."""
    if remote.startswith("unix:") and remote != DEFAULT_OVSDB and remote.endswith("/db.sock"):
        os.environ["OVS_RUNDIR"] = os.path.dirname(remote[len("unix:"):])


