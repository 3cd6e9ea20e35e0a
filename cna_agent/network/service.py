"""NetworkService: declared host networks, VM NIC plugging, and drift reconciliation.

What it owns:

* the declarations: bridges and port groups from agent.toml (re-applied on every start) and
  from the VRM (EnsureBridge/EnsurePortGroup, kept in ``<state_dir>/network/declared.json``
  so they survive restarts); agent.toml wins on a name both declare;
* applying them: OVS through the OVSDB IDL (ovsdb.py), Linux bridges through netlink
  (linuxbridge.py), each "ensure" reporting what it changed;
* binding port groups for compute (the NicResolver protocol: ``resolve_port_group``);
* VM NICs: hot-plug/unplug and link state on a domain by uuid, through libvirt device
  updates whose ``<interface>`` XML comes from vif.py;
* reconciliation, level-triggered (KubeVirt's virt-handler): compare what is declared and
  what every running VM's interfaces say with the host, and repair; every problem is a
  ``network.drift`` event, every repair a ``network.repaired`` event. No step depends on
  having seen an earlier event.

Every input is validated (model.py) before anything on the host changes.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Awaitable, Callable, Mapping

from cna_agent.blocking import BlockingPool
from cna_agent.contracts import Bandwidth, NicBinding
from cna_agent.errors import AgentError, AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, Unavailable
from cna_agent.network import vif
from cna_agent.network.linuxbridge import LinuxBridgeDriver, probe_vlan_support
from cna_agent.network.model import (BandwidthDecl, BridgeDecl, PortGroupDecl, check_mac, validate_bridge,
                                     validate_port_group)
from cna_agent.network.ovsdb import OvsdbClient, PortWant

log = logging.getLogger(__name__)

DEFAULT_OVSDB = "unix:/run/openvswitch/db.sock"
#: How long an unplug may take before the guest is considered to ignore it.
DETACH_TIMEOUT_S = 30.0


@dataclass
class DriftItem:
    resource: str
    problem: str
    repaired: bool = False
    action: str = ""


@dataclass
class VifRecord:
    vm_uuid: str
    vm_name: str
    mac: str
    device: str
    bridge: str
    port_group: str
    interface_id: str
    link_up: bool


def _bw(decl: BandwidthDecl) -> Bandwidth | None:
    return Bandwidth(decl.average_kbps, decl.peak_kbps, decl.burst_kib) if decl.set else None


class NetworkService:
    def __init__(
        self,
        *,
        ovsdb: str = DEFAULT_OVSDB,
        ovsdb_timeout_s: float = 10.0,
        netlink_threads: int = 2,
        netlink_timeout_s: float = 30.0,
        state_dir: str,
        events: Any,
        hypervisor: Any,
        runner: Any = None,
        components: Mapping[str, Any] | None = None,
        config_bridges: tuple[BridgeDecl, ...] = (),
        config_port_groups: tuple[PortGroupDecl, ...] = (),
        to_pb: Mapping[str, Callable[..., Any]] | None = None,
    ) -> None:
        self.ovs = OvsdbClient(ovsdb, ovsdb_timeout_s)
        self.linux = LinuxBridgeDriver()
        #: Netlink (pyroute2) and sysfs work; [network] netlink_threads, a deadline per call.
        self.netlink_pool = BlockingPool("netlink", netlink_threads, netlink_timeout_s)
        self._events = events
        self._hv = hypervisor
        self._runner = runner
        self._components = components or {}
        self._store = Path(state_dir) / "network" / "declared.json"
        self._config_bridges = {b.name: b for b in config_bridges}
        self._config_pgs = {p.name: p for p in config_port_groups}
        self._api_bridges: dict[str, BridgeDecl] = {}
        self._api_pgs: dict[str, PortGroupDecl] = {}
        self._to_pb = dict(to_pb or {})
        self._lock = asyncio.Lock()
        self._load()
        _point_libvirt_at(ovsdb)

    # -- declarations ---------------------------------------------------------------------

    @property
    def bridges(self) -> dict[str, BridgeDecl]:
        return {**self._api_bridges, **self._config_bridges}

    @property
    def port_groups(self) -> dict[str, PortGroupDecl]:
        return {**self._api_pgs, **self._config_pgs}

    def _load(self) -> None:
        try:
            data = json.loads(self._store.read_text())
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            log.error("event=network.store_unreadable path=%s error=%r", self._store, exc)
            return
        for b in data.get("bridges", []):
            b["addresses"] = tuple(b.get("addresses", ()))
            self._api_bridges[b["name"]] = BridgeDecl(**b)
        for p in data.get("port_groups", []):
            p["trunk_vlans"] = tuple(p.get("trunk_vlans", ()))
            p["inbound"] = BandwidthDecl(**p.get("inbound", {}))
            p["outbound"] = BandwidthDecl(**p.get("outbound", {}))
            self._api_pgs[p["name"]] = PortGroupDecl(**p)

    def _save(self) -> None:
        self._store.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = self._store.with_suffix(".tmp")
        tmp.write_text(json.dumps({"bridges": [asdict(b) for b in self._api_bridges.values()],
                                   "port_groups": [asdict(p) for p in self._api_pgs.values()]}, indent=1))
        os.replace(tmp, self._store)

    async def _blocking(self, fn: Callable[[], Any], what: str = "netlink call") -> Any:
        return await self.netlink_pool.run(fn, what=what)

    # -- bridges --------------------------------------------------------------------------

    async def check_bridge(self, decl: BridgeDecl, prefix: str = "bridge") -> BridgeDecl:
        """Everything that can be refused is refused here, before the host changes."""
        decl = validate_bridge(decl, prefix)
        if decl.name in self._config_bridges and decl.source != "config":
            raise FailedPrecondition(f"{prefix}.name: bridge {decl.name!r} is declared in agent.toml; change it there", field=f"{prefix}.name")
        other = next((b for b in self.bridges.values() if b.uplink and b.uplink == decl.uplink and b.name != decl.name), None)
        if other is not None:
            raise InvalidArgument(f"{prefix}.uplink", f"{decl.uplink!r} is already the uplink of bridge {other.name!r}")
        if decl.uplink and not await self._blocking(lambda: self.linux.link_exists(decl.uplink)):
            raise InvalidArgument(f"{prefix}.uplink", f"uplink {decl.uplink!r} does not exist on this host")
        if decl.type == "linux" and decl.name not in self.bridges:
            exists = await self._blocking(lambda: self.linux.link_exists(decl.name))
            if exists and not await self._blocking(lambda: self.linux.is_bridge(decl.name)):
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
            changes += await self._blocking(lambda: self._link_up(decl.name))
            return changes
        return await self._blocking(lambda: self.linux.ensure(decl.name, uplink=decl.uplink, mtu=decl.mtu, addresses=decl.addresses))

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
        async with self._lock:
            changes = await self.apply_bridge(decl)
            if decl.source != "config":
                self._api_bridges[decl.name] = decl
                self._save()
        await self._publish("network.bridge.ensured", "bridge", decl.name, changes)
        return decl, changes

    async def delete_bridge(self, name: str) -> bool:
        if name in self._config_bridges:
            raise FailedPrecondition(f"name: bridge {name!r} is declared in agent.toml; remove it there", field="name")
        decl = self._api_bridges.get(name)
        if decl is None:
            raise NotFound(f"name: no declared bridge {name!r}", field="name")
        users = [p.name for p in self.port_groups.values() if p.bridge == name]
        if users:
            raise FailedPrecondition(f"name: bridge {name!r} still carries port groups {', '.join(sorted(users))}", field="name")
        vifs = [v for v in await self.vifs() if v.bridge == name]
        if vifs:
            raise FailedPrecondition(f"name: bridge {name!r} still has VM NICs ({', '.join(v.device or v.mac for v in vifs)})", field="name")
        async with self._lock:
            if decl.type == "ovs":
                await self.ovs.call(lambda c: c.delete_bridge(name))
            else:
                await self._blocking(lambda: self.linux.delete(name))
            del self._api_bridges[name]
            self._save()
        await self._publish("network.bridge.deleted", "bridge", name, [f"deleted bridge {name}"])
        return True

    async def bridge_status(self) -> dict[str, tuple[str, str]]:
        """name -> ("ok"|"degraded"|"unreachable", reason) for every declared bridge."""
        out: dict[str, tuple[str, str]] = {}
        drift = await self._bridge_drift(self.bridges.values())
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
        if pg.name in self._config_pgs and pg.source != "config":
            raise FailedPrecondition(f"{prefix}.name: port group {pg.name!r} is declared in agent.toml; change it there", field=f"{prefix}.name")
        bridge = self.bridges[pg.bridge]
        if bridge.type == "linux" and (pg.vlan or pg.trunk_vlans):
            await self._blocking(lambda: self.linux.require_vlans(f"{prefix}.vlan" if pg.vlan else f"{prefix}.trunk_vlans"))
        if bridge.type == "linux" and (pg.vlan or pg.trunk_vlans):  # pragma: no cover - hosts with 8021q
            raise FailedPrecondition(f"{prefix}.vlan: VLAN port groups on Linux bridges are not implemented yet; use OVS", field=f"{prefix}.vlan")
        return pg

    async def ensure_port_group(self, pg: PortGroupDecl) -> tuple[PortGroupDecl, list[str]]:
        pg = await self.check_port_group(pg)
        async with self._lock:
            if pg.source != "config":
                self._api_pgs[pg.name] = pg
                self._save()
        # VIFs already in the group follow its new VLAN: re-tag through the reconciler's path.
        changes = [f"port group {pg.name} on {pg.bridge}"]
        changes += [d.action for d in await self.reconcile(repair=True, only_port_group=pg.name) if d.repaired]
        await self._publish("network.port_group.ensured", "port_group", pg.name, changes)
        return pg, changes

    async def delete_port_group(self, name: str) -> bool:
        if name in self._config_pgs:
            raise FailedPrecondition(f"name: port group {name!r} is declared in agent.toml; remove it there", field="name")
        if name not in self._api_pgs:
            raise NotFound(f"name: no declared port group {name!r}", field="name")
        users = [v for v in await self.vifs() if v.port_group == name]
        if users:
            raise FailedPrecondition(f"name: port group {name!r} still has NICs of VMs {', '.join(sorted({v.vm_name for v in users}))}", field="name")
        async with self._lock:
            del self._api_pgs[name]
            self._save()
        await self._publish("network.port_group.deleted", "port_group", name, [])
        return True

    async def resolve_port_group(self, port_group: str, *, field: str) -> NicBinding:
        """compute's NicResolver: what libvirt must be told for a NIC in ``port_group``."""
        pg = self.port_groups.get(port_group)
        if pg is None:
            known = ", ".join(sorted(self.port_groups)) or "none declared"
            raise InvalidArgument(field, f"unknown port group {port_group!r} (declared: {known})")
        bridge = self.bridges[pg.bridge]
        spoof = pg.mac_anti_spoofing or pg.ip_anti_spoofing
        return NicBinding(
            kind="ovs" if bridge.type == "ovs" else "linux-bridge",
            bridge=bridge.name,
            port_group=pg.name,
            vlan=pg.vlan or None,
            trunk=pg.trunk_vlans,
            inbound=_bw(pg.inbound),
            outbound=_bw(pg.outbound),
            # libvirt's nwfilter: clean-traffic = no MAC, IP or ARP spoofing (+ no-other-l2).
            filter=("clean-traffic" if pg.ip_anti_spoofing else "no-mac-spoofing") if spoof else "",
            mtu=bridge.mtu,
        )

    # -- VM NICs --------------------------------------------------------------------------

    async def _domains(self) -> list[tuple[str, str, bool, str]]:
        """(uuid, name, active, xml) of every domain; live XML for running ones."""
        def read(conn: Any) -> list[tuple[str, str, bool, str]]:
            out = []
            for dom in conn.listAllDomains():
                try:
                    out.append((dom.UUIDString(), dom.name(), bool(dom.isActive()), dom.XMLDesc(0)))
                except Exception:  # vanished while listing
                    continue
            return out

        return await self._hv.call(read, timeout=30)

    async def all_macs(self) -> set[str]:
        """Every MAC of every domain on this host, live and persistent definitions."""
        def read(conn: Any) -> set[str]:
            import libvirt

            macs: set[str] = set()
            for dom in conn.listAllDomains():
                try:
                    macs |= vif.domain_macs(dom.XMLDesc(0))
                    if dom.isPersistent() and dom.isActive():
                        macs |= vif.domain_macs(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
                except Exception:
                    continue
            return macs

        return await self._hv.call(read, timeout=30)

    async def _lookup_vm(self, ref: str, field: str = "vm") -> tuple[str, str]:
        if not ref:
            raise InvalidArgument(field, "is required (a VM name or UUID)")

        def find(conn: Any) -> tuple[str, str] | None:
            import libvirt

            for getter in (conn.lookupByUUIDString, conn.lookupByName):
                try:
                    dom = getter(ref)
                    return dom.UUIDString(), dom.name()
                except libvirt.libvirtError:
                    continue
            return None

        found = await self._hv.call(find, timeout=30)
        if found is None:
            raise NotFound(f"{field}: no VM {ref!r} on this host", field=field)
        return found

    async def attach_nic(self, vm: str, port_group: str, *, mac: str = "", model: str = "virtio", link_down: bool = False,
                         interface_id: str = "", inbound: Bandwidth | None = None, outbound: Bandwidth | None = None) -> VifRecord:
        """Hot-plug (running VM) or add to the definition (stopped VM) a NIC in ``port_group``."""
        binding = await self.resolve_port_group(port_group, field="nic.port_group")
        uuid, name = await self._lookup_vm(vm)
        model = model or "virtio"
        if model not in vif.NIC_MODELS:
            raise InvalidArgument("nic.model", f"{model!r} is not one of {', '.join(vif.NIC_MODELS)}")
        taken = await self.all_macs()
        if mac:
            mac = check_mac(mac, "nic.mac")
            if mac in taken:
                raise AlreadyExists(f"nic.mac: {mac} is already used by a NIC on this host", field="nic.mac")
        else:
            mac = vif.generate_mac(taken)
        if interface_id:
            import uuid as uuidlib

            try:
                interface_id = str(uuidlib.UUID(interface_id))
            except ValueError:
                raise InvalidArgument("nic.interface_id", f"{interface_id!r} is not a UUID") from None
        xml = vif.interface_xml(vif.NicRequest(mac=mac, model=model, link_down=link_down, interface_id=interface_id,
                                               inbound=inbound, outbound=outbound), binding)

        def attach(conn: Any) -> None:
            import libvirt

            dom = conn.lookupByUUIDString(uuid)
            flags = libvirt.VIR_DOMAIN_AFFECT_CONFIG if dom.isPersistent() else 0
            if dom.isActive():
                flags |= libvirt.VIR_DOMAIN_AFFECT_LIVE
            dom.attachDeviceFlags(xml, flags)

        try:
            await self._hv.call(attach, timeout=60)
        except AgentError:
            raise
        except Exception as exc:
            raise FailedPrecondition(f"nic: libvirt refused the NIC: {exc}") from exc
        record = await self._find_vif(uuid, mac)
        if record is not None and binding.kind == "ovs" and record.device:
            await self.ovs.call(lambda c: c.set_port_ids(record.device, {"port-group": port_group},
                                                         {"vm-uuid": uuid, "port-group": port_group}))
        await self._publish("network.nic.attached", "vm", uuid, [f"NIC {mac} in port group {port_group}"], name=name)
        return record or VifRecord(uuid, name, mac, "", binding.bridge, port_group, interface_id, not link_down)

    async def _find_vif(self, uuid: str, mac: str) -> VifRecord | None:
        for v in await self.vifs(vm_uuid=uuid):
            if v.mac == mac:
                return v
        return None

    async def _interface_of(self, uuid: str, mac: str) -> tuple[str, bool]:
        """(the <interface> element's XML, domain active) for the NIC with ``mac``."""
        mac = check_mac(mac, "mac")

        def read(conn: Any) -> tuple[str, bool] | None:
            dom = conn.lookupByUUIDString(uuid)
            root = ET.fromstring(dom.XMLDesc(0))
            for el in root.findall("./devices/interface"):
                m = el.find("mac")
                if m is not None and m.get("address", "").lower() == mac:
                    return ET.tostring(el, encoding="unicode"), bool(dom.isActive())
            return None

        found = await self._hv.call(read, timeout=30)
        if found is None:
            raise NotFound(f"mac: the VM has no NIC with MAC {mac}", field="mac")
        return found

    async def detach_nic(self, vm: str, mac: str) -> None:
        uuid, name = await self._lookup_vm(vm)
        xml, active = await self._interface_of(uuid, mac)
        device = vif.parse_interface(ET.fromstring(xml)).target_dev

        def detach(conn: Any) -> None:
            import libvirt

            dom = conn.lookupByUUIDString(uuid)
            flags = libvirt.VIR_DOMAIN_AFFECT_CONFIG if dom.isPersistent() else 0
            if dom.isActive():
                flags |= libvirt.VIR_DOMAIN_AFFECT_LIVE
            dom.detachDeviceFlags(xml, flags)

        try:
            await self._hv.call(detach, timeout=60)
        except Exception as exc:
            raise FailedPrecondition(f"mac: libvirt refused to unplug the NIC: {exc}") from exc
        if active:
            # Unplug needs the guest's cooperation (PCIe hot-unplug); wait until it is gone.
            loop = asyncio.get_running_loop()
            deadline = loop.time() + DETACH_TIMEOUT_S
            while await self._find_vif(uuid, mac.lower()) is not None:
                if loop.time() > deadline:
                    raise Unavailable(f"mac: the guest did not release NIC {mac} within {DETACH_TIMEOUT_S:.0f}s; it stays requested")
                await asyncio.sleep(0.5)
        await self._publish("network.nic.detached", "vm", uuid, [f"NIC {mac} ({device or 'no device'})"], name=name)

    async def set_nic_link(self, vm: str, mac: str, up: bool) -> VifRecord | None:
        uuid, name = await self._lookup_vm(vm)
        xml, _ = await self._interface_of(uuid, mac)
        el = ET.fromstring(xml)
        link = el.find("link")
        if link is None:
            link = ET.SubElement(el, "link")
        link.set("state", "up" if up else "down")
        new_xml = ET.tostring(el, encoding="unicode")

        def update(conn: Any) -> None:
            import libvirt

            dom = conn.lookupByUUIDString(uuid)
            flags = libvirt.VIR_DOMAIN_AFFECT_CONFIG if dom.isPersistent() else 0
            if dom.isActive():
                flags |= libvirt.VIR_DOMAIN_AFFECT_LIVE
            dom.updateDeviceFlags(new_xml, flags)

        try:
            await self._hv.call(update, timeout=60)
        except Exception as exc:
            raise FailedPrecondition(f"mac: libvirt refused the link change: {exc}") from exc
        await self._publish("network.nic.link", "vm", uuid, [f"NIC {mac} link {'up' if up else 'down'}"], name=name)
        return await self._find_vif(uuid, mac.lower())

    async def vifs(self, vm_uuid: str = "") -> list[VifRecord]:
        """Every NIC of every domain bound to a declared bridge (live XML for running VMs)."""
        try:
            ovs_ports = await self.ovs.call(lambda c: {p.name: p for b in c.bridges().values() for p in b.ports.values()})
        except AgentError:
            ovs_ports = {}
        out = []
        for uuid, name, _active, xml in await self._domains():
            if vm_uuid and uuid != vm_uuid:
                continue
            for v in vif.domain_interfaces(xml):
                if v.type != "bridge" or v.bridge not in self.bridges:
                    continue
                port = ovs_ports.get(v.target_dev)
                pg = port.external_ids.get("port-group", "") if port is not None else ""
                out.append(VifRecord(uuid, name, v.mac, v.target_dev, v.bridge, pg or self._guess_pg(v), v.interface_id, v.link_up))
        return out

    def _guess_pg(self, v: vif.VifInfo) -> str:
        """The port group a NIC's XML matches (bridge + VLAN), when nothing recorded it."""
        for pg in self.port_groups.values():
            if pg.bridge == v.bridge and (pg.vlan or None) == v.vlan and tuple(pg.trunk_vlans) == tuple(sorted(v.trunk)):
                return pg.name
        return ""

    # -- reconciliation -------------------------------------------------------------------

    async def _bridge_drift(self, decls: Any) -> list[DriftItem]:
        drift: list[DriftItem] = []
        decls = list(decls)
        ovs_state = None
        if any(d.type == "ovs" for d in decls):
            try:
                ovs_state = await self.ovs.call(lambda c: c.bridges())
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
                st = await self._blocking(lambda: self.linux.state(d.name))
                if st.exists and not st.up:
                    drift.append(DriftItem(res, "bridge interface is down"))
            else:
                st = await self._blocking(lambda: self.linux.state(d.name))
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

    async def _vif_drift(self, only_port_group: str = "") -> list[tuple[DriftItem, Callable[[], Awaitable[list[str]]]]]:
        """Problems with running VMs' NICs, each with the coroutine that repairs it."""
        found: list[tuple[DriftItem, Callable[[], Awaitable[list[str]]]]] = []
        try:
            ovs_state = await self.ovs.call(lambda c: c.bridges())
        except AgentError:
            ovs_state = None
        for uuid, name, active, xml in await self._domains():
            if not active:
                continue
            for v in vif.domain_interfaces(xml):
                if v.type != "bridge" or not v.target_dev or v.bridge not in self.bridges:
                    continue
                decl = self.bridges[v.bridge]
                res = f"port/{v.target_dev}"
                if decl.type == "ovs" and v.virtualport == "openvswitch":
                    if ovs_state is None or v.bridge not in ovs_state:
                        continue  # the bridge's own drift covers it
                    port = ovs_state[v.bridge].ports.get(v.target_dev)
                    pg_name = (port.external_ids.get("port-group", "") if port is not None else "") or self._guess_pg(v)
                    if only_port_group and pg_name != only_port_group:
                        continue
                    pg = self.port_groups.get(pg_name)
                    tag = (pg.vlan or None) if pg is not None else v.vlan
                    trunks = tuple(pg.trunk_vlans) if pg is not None else tuple(v.trunk)
                    want = PortWant(
                        name=v.target_dev, tag=tag, trunks=trunks,
                        external_ids=(("port-group", pg_name),) if pg_name else (),
                        iface_external_ids=(("attached-mac", v.mac), ("iface-id", v.interface_id or uuid), ("iface-status", "active"),
                                            ("vm-id", uuid), ("vm-uuid", uuid)) + ((("port-group", pg_name),) if pg_name else ()),
                        ingress_rate_kbps=v.outbound_kbps if port is None else (port.ingress_policing_rate),
                        egress_max_rate_bps=v.inbound_kbps * 1000 if port is None else port.qos_max_rate,
                    )
                    if port is None:
                        problem = f"OVS port of VM {name} NIC {v.mac} missing from {v.bridge}"
                    elif port.tag != tag or tuple(port.trunks) != trunks:
                        problem = f"VLAN is tag={port.tag} trunks={list(port.trunks)}, port group {pg_name or '?'} says tag={tag} trunks={list(trunks)}"
                    elif pg_name and port.external_ids.get("port-group") != pg_name:
                        problem = f"port lacks its external_ids (port-group {pg_name})"
                    else:
                        continue
                    bridge_name = v.bridge

                    async def fix(bridge_name: str = bridge_name, want: PortWant = want) -> list[str]:
                        return await self.ovs.call(lambda c: c.ensure_ports(bridge_name, [want]))

                    found.append((DriftItem(res, problem), fix))
                elif decl.type == "linux":
                    st = await self._blocking(lambda: self.linux.state(v.bridge))
                    if st.exists and v.target_dev not in st.ports and await self._blocking(lambda: self.linux.link_exists(v.target_dev)):
                        dev, br = v.target_dev, v.bridge

                        async def fix_lb(dev: str = dev, br: str = br) -> list[str]:
                            return await self._blocking(lambda: _enslave(dev, br))

                        found.append((DriftItem(res, f"tap of VM {name} NIC {v.mac} is not on bridge {br}"), fix_lb))
        return found

    async def reconcile(self, repair: bool = True, *, only_port_group: str = "") -> list[DriftItem]:
        """Compare declared networks and running VMs' NICs with the host; repair when asked."""
        results: list[DriftItem] = []
        async with self._lock:
            if not only_port_group:
                for item in await self._bridge_drift(self.bridges.values()):
                    results.append(item)
                    if repair and "unreachable" not in item.problem:
                        name = item.resource.split("/", 1)[1]
                        try:
                            changes = await self.apply_bridge(self.bridges[name])
                            item.repaired, item.action = True, "; ".join(changes) or "re-applied"
                        except AgentError as exc:
                            item.action = f"repair failed: {exc.message}"
            for item, fix in await self._vif_drift(only_port_group):
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
                await self._events.publish(
                    "network.repaired" if item.repaired else "network.drift",
                    severity="info" if item.repaired else "warning",
                    resource_kind="network", resource_id=item.resource, resource_name=item.resource,
                    message=f"{item.problem}" + (f"; repaired: {item.action}" if item.repaired else ""),
                    attributes={"problem": item.problem, "action": item.action},
                )
        return results

    async def apply_declared(self) -> None:
        """Agent start: (re)apply every declaration, then repair VM NIC drift."""
        for decl in self.bridges.values():
            try:
                decl = await self.check_bridge(decl, f"network.bridges.{decl.name}")
                changes = await self.apply_bridge(decl)
                if changes:
                    await self._publish("network.bridge.ensured", "bridge", decl.name, changes)
            except AgentError as exc:
                log.error("event=network.apply_failed bridge=%s error=%r", decl.name, exc.message)
                await self._events.publish("network.drift", severity="error", resource_kind="network",
                                           resource_id=f"bridge/{decl.name}", resource_name=decl.name,
                                           message=f"declared bridge could not be applied: {exc.message}")
        for pg in list(self.port_groups.values()):
            try:
                await self.check_port_group(pg, f"network.port_groups.{pg.name}")
            except AgentError as exc:
                log.error("event=network.port_group_refused port_group=%s error=%r", pg.name, exc.message)
                await self._events.publish("network.drift", severity="error", resource_kind="network",
                                           resource_id=f"port_group/{pg.name}", resource_name=pg.name,
                                           message=f"declared port group is unusable: {exc.message}")
        try:
            await self.reconcile(repair=True)
        except AgentError as exc:
            log.warning("event=network.reconcile_failed error=%r", exc.message)

    async def facts(self) -> dict[str, Any]:
        support = await self._blocking(probe_vlan_support)
        return {"linux_vlan_devices": support.vlan_devices, "linux_vlan_filtering": support.vlan_filtering}

    async def _publish(self, type_: str, kind: str, rid: str, changes: list[str], name: str = "") -> None:
        await self._events.publish(type_, severity="info", resource_kind=kind, resource_id=rid, resource_name=name or rid,
                                   message="; ".join(changes) or "no change", attributes={"changed": str(bool(changes)).lower()})

    async def close(self) -> None:
        self.ovs.close()
        self.netlink_pool.shutdown()


def _enslave(dev: str, bridge: str) -> list[str]:
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        d, b = ipr.link_lookup(ifname=dev), ipr.link_lookup(ifname=bridge)
        if not d or not b:
            return []
        ipr.link("set", index=d[0], master=b[0], state="up")
        return [f"enslaved {dev} to {bridge}"]


def _point_libvirt_at(remote: str) -> None:
    """libvirt plugs OVS NICs by running ovs-vsctl, which finds the database through
    OVS_RUNDIR. With the embedded QEMU driver those commands are our children, so a private
    database (``[network] ovsdb = "unix:/some/dir/db.sock"``) must be announced there; a
    libvirtd keeps its own environment (it uses the system database)."""
    if remote.startswith("unix:") and remote != DEFAULT_OVSDB and remote.endswith("/db.sock"):
        os.environ["OVS_RUNDIR"] = os.path.dirname(remote[len("unix:"):])


class NetworkOperations:
    """The journalled face of NetworkService: each change runs as an operation (AIP-151),
    idempotent by request id, after every check that can refuse it has passed (so a bad
    request is answered at once and changes nothing)."""

    def __init__(self, service: NetworkService, runner: Any, to_pb: Mapping[str, Callable[..., Any]]) -> None:
        self.svc = service
        self.runner = runner
        self.to_pb = to_pb

    async def _submit(self, kind: str, target: str, work: Callable[[], Awaitable[Any]], *, request_id: str,
                      fingerprint: str, lock_key: str, wait: float = 30.0) -> Any:
        async def run(_op: Any) -> Any:
            return await work()

        return await self.runner.submit(kind, target, run, request_id=request_id, fingerprint=fingerprint,
                                        lock_key=lock_key, lock_timeout=30.0, wait=wait)

    async def ensure_bridge(self, decl: BridgeDecl, *, request_id: str = "", fingerprint: str = "") -> Any:
        decl = await self.svc.check_bridge(decl)

        async def work() -> Any:
            done, _changes = await self.svc.ensure_bridge(decl)
            return await self.bridge_pb(done.name)

        return await self._submit("network.bridge.ensure", decl.name, work, request_id=request_id,
                                  fingerprint=fingerprint, lock_key=f"net/bridge/{decl.name}")

    async def delete_bridge(self, name: str, *, request_id: str = "", fingerprint: str = "") -> Any:
        if not name:
            raise InvalidArgument("name", "is required")

        async def work() -> Any:
            await self.svc.delete_bridge(name)
            return None

        return await self._submit("network.bridge.delete", name, work, request_id=request_id,
                                  fingerprint=fingerprint, lock_key=f"net/bridge/{name}")

    async def ensure_port_group(self, pg: PortGroupDecl, *, request_id: str = "", fingerprint: str = "") -> Any:
        pg = await self.svc.check_port_group(pg)

        async def work() -> Any:
            done, _changes = await self.svc.ensure_port_group(pg)
            return await self.port_group_pb(done.name)

        return await self._submit("network.port_group.ensure", pg.name, work, request_id=request_id,
                                  fingerprint=fingerprint, lock_key=f"net/pg/{pg.name}")

    async def delete_port_group(self, name: str, *, request_id: str = "", fingerprint: str = "") -> Any:
        if not name:
            raise InvalidArgument("name", "is required")

        async def work() -> Any:
            await self.svc.delete_port_group(name)
            return None

        return await self._submit("network.port_group.delete", name, work, request_id=request_id,
                                  fingerprint=fingerprint, lock_key=f"net/pg/{name}")

    async def attach_nic(self, vm: str, port_group: str, *, request_id: str = "", fingerprint: str = "", **nic: Any) -> Any:
        await self.svc.resolve_port_group(port_group, field="nic.port_group")
        if nic.get("mac"):
            check_mac(nic["mac"], "nic.mac")
        uuid, _ = await self.svc._lookup_vm(vm)

        async def work() -> Any:
            rec = await self.svc.attach_nic(uuid, port_group, **nic)
            return self.to_pb["vif"](rec)

        return await self._submit("network.nic.attach", uuid, work, request_id=request_id, fingerprint=fingerprint,
                                  lock_key=f"vm/{uuid}", wait=60.0)

    async def detach_nic(self, vm: str, mac: str, *, request_id: str = "", fingerprint: str = "") -> Any:
        check_mac(mac, "mac")
        uuid, _ = await self.svc._lookup_vm(vm)
        await self.svc._interface_of(uuid, mac)

        async def work() -> Any:
            await self.svc.detach_nic(uuid, mac)
            return None

        return await self._submit("network.nic.detach", uuid, work, request_id=request_id, fingerprint=fingerprint,
                                  lock_key=f"vm/{uuid}", wait=60.0)

    async def set_nic_link(self, vm: str, mac: str, up: bool, *, request_id: str = "", fingerprint: str = "") -> Any:
        check_mac(mac, "mac")
        uuid, _ = await self.svc._lookup_vm(vm)
        await self.svc._interface_of(uuid, mac)

        async def work() -> Any:
            rec = await self.svc.set_nic_link(uuid, mac, up)
            return self.to_pb["vif"](rec) if rec is not None else None

        return await self._submit("network.nic.link", uuid, work, request_id=request_id, fingerprint=fingerprint,
                                  lock_key=f"vm/{uuid}")

    async def bridge_pb(self, name: str) -> Any:
        status = await self.svc.bridge_status()
        return self.to_pb["bridge"](self.svc.bridges[name], status.get(name, ("ok", "")))

    async def port_group_pb(self, name: str) -> Any:
        vifs = [v for v in await self.svc.vifs() if v.port_group == name]
        return self.to_pb["port_group"](self.svc.port_groups[name], vifs)
