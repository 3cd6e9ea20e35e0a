"""Declared host networks (bridges, port groups) and the one validator they all go through.

Why one validator: bridges and port groups arrive from agent.toml and from the VRM over gRPC,
and both must be refused the same way *before* anything on the host changes (a name longer
than IFNAMSIZ would otherwise be truncated by the kernel, VLAN 4095 is reserved by 802.1Q, a
port group on an unknown bridge would bind NICs to nothing). Errors are InvalidArgument naming
the field as the caller spelled it ("bridge.name", "network.bridges.br0.mtu").
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field, replace
from typing import Iterable, Mapping

from cna_agent.contracts import MAX_KBPS, Bandwidth, check_bandwidth  # noqa: F401 - re-exported
from cna_agent.errors import InvalidArgument

#: Linux IFNAMSIZ is 16 including the NUL.
IFNAME_MAX = 15
#: What the kernel accepts in a name (dev_valid_name: no '/', ':', whitespace, not . or ..);
#: we also refuse anything outside this conservative set so names are safe in XML and OVSDB.
IFNAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
PORT_GROUP_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
VLAN_MIN, VLAN_MAX = 1, 4094
MTU_MIN, MTU_MAX = 68, 65535
BRIDGE_TYPES = ("linux", "ovs")
DATAPATH_TYPES = ("system", "netdev")
FAIL_MODES = ("standalone", "secure")


@dataclass(frozen=True)
class BridgeDecl:
    name: str
    type: str = "ovs"
    uplink: str = ""
    mtu: int = 0
    addresses: tuple[str, ...] = ()
    datapath_type: str = ""
    fail_mode: str = ""
    #: "config" (agent.toml, re-applied on start) or "api" (EnsureBridge, kept in the state dir).
    source: str = "api"

    @property
    def effective_datapath(self) -> str:
        return self.datapath_type or "system"

    @property
    def effective_fail_mode(self) -> str:
        return self.fail_mode or "standalone"


@dataclass(frozen=True)
class PortGroupDecl:
    name: str
    bridge: str
    vlan: int = 0
    trunk_vlans: tuple[int, ...] = ()
    inbound: Bandwidth = field(default_factory=Bandwidth)
    outbound: Bandwidth = field(default_factory=Bandwidth)
    mac_anti_spoofing: bool = False
    ip_anti_spoofing: bool = False
    source: str = "api"


def check_ifname(name: str, field: str) -> str:
    """A kernel-legal interface name of at most IFNAMSIZ-1 bytes."""
    if not name:
        raise InvalidArgument(field, "is required")
    size = len(name.encode())
    if size > IFNAME_MAX:
        raise InvalidArgument(field, f"{name!r} is {size} bytes; Linux interface names are at most {IFNAME_MAX} bytes (IFNAMSIZ-1)")
    if name in (".", "..") or not IFNAME_RE.match(name):
        raise InvalidArgument(field, f"{name!r} is not a valid interface name (letters, digits, '_', '.', '-'; no '/', ':' or spaces)")
    return name


def check_vlan(vlan: int, field: str) -> int:
    if not isinstance(vlan, int) or isinstance(vlan, bool) or not VLAN_MIN <= vlan <= VLAN_MAX:
        extra = " (4095 is reserved by IEEE 802.1Q)" if vlan == 4095 else ""
        raise InvalidArgument(field, f"VLAN {vlan!r} is not in {VLAN_MIN}..{VLAN_MAX}{extra}")
    return vlan


def validate_bridge(b: BridgeDecl, prefix: str = "bridge") -> BridgeDecl:
    """Check a bridge declaration; returns it normalised (defaults filled for its type)."""
    check_ifname(b.name, f"{prefix}.name")
    if b.type not in BRIDGE_TYPES:
        raise InvalidArgument(f"{prefix}.type", f"{b.type!r} is not one of {', '.join(BRIDGE_TYPES)}")
    if b.uplink:
        check_ifname(b.uplink, f"{prefix}.uplink")
        if b.uplink == b.name:
            raise InvalidArgument(f"{prefix}.uplink", "a bridge cannot be its own uplink")
    if b.mtu and not MTU_MIN <= b.mtu <= MTU_MAX:
        raise InvalidArgument(f"{prefix}.mtu", f"{b.mtu} is not in {MTU_MIN}..{MTU_MAX} (0 = leave as is)")
    addresses = []
    for i, addr in enumerate(b.addresses):
        try:
            iface = ipaddress.ip_interface(addr)
        except ValueError:
            raise InvalidArgument(f"{prefix}.addresses[{i}]", f"{addr!r} is not an address in CIDR form like 192.0.2.10/24") from None
        if "/" not in addr:
            raise InvalidArgument(f"{prefix}.addresses[{i}]", f"{addr!r} needs a prefix length (CIDR)")
        addresses.append(str(iface))
    if b.type == "ovs":
        if b.datapath_type and b.datapath_type not in DATAPATH_TYPES:
            raise InvalidArgument(f"{prefix}.datapath_type", f"{b.datapath_type!r} is not one of {', '.join(DATAPATH_TYPES)}")
        if b.fail_mode and b.fail_mode not in FAIL_MODES:
            raise InvalidArgument(f"{prefix}.fail_mode", f"{b.fail_mode!r} is not one of {', '.join(FAIL_MODES)}")
        return replace(b, addresses=tuple(addresses), datapath_type=b.effective_datapath, fail_mode=b.effective_fail_mode)
    if b.datapath_type:
        raise InvalidArgument(f"{prefix}.datapath_type", "applies to Open vSwitch bridges only")
    if b.fail_mode:
        raise InvalidArgument(f"{prefix}.fail_mode", "applies to Open vSwitch bridges only")
    return replace(b, addresses=tuple(addresses))


def validate_port_group(pg: PortGroupDecl, bridges: Mapping[str, BridgeDecl], prefix: str = "port_group") -> PortGroupDecl:
    """Check a port group against the declared bridges (an unknown bridge is refused)."""
    if not pg.name or not PORT_GROUP_RE.match(pg.name):
        raise InvalidArgument(f"{prefix}.name", f"{pg.name!r} is not a port group name (1-64 of letters, digits, '_', '.', '-')")
    if not pg.bridge:
        raise InvalidArgument(f"{prefix}.bridge", "is required")
    if pg.bridge not in bridges:
        known = ", ".join(sorted(bridges)) or "none declared"
        raise InvalidArgument(f"{prefix}.bridge", f"unknown bridge {pg.bridge!r} (declared: {known})")
    if pg.vlan:
        check_vlan(pg.vlan, f"{prefix}.vlan")
    seen: set[int] = set()
    for i, v in enumerate(pg.trunk_vlans):
        check_vlan(v, f"{prefix}.trunk_vlans[{i}]")
        if v in seen:
            raise InvalidArgument(f"{prefix}.trunk_vlans[{i}]", f"VLAN {v} is listed twice")
        seen.add(v)
    if pg.vlan and pg.trunk_vlans:
        raise InvalidArgument(f"{prefix}.trunk_vlans", "a port group is either an access VLAN (vlan) or a trunk (trunk_vlans), not both")
    check_bandwidth(pg.inbound, f"{prefix}.inbound")
    check_bandwidth(pg.outbound, f"{prefix}.outbound")
    return replace(pg, trunk_vlans=tuple(sorted(pg.trunk_vlans)))


def validate_all(bridges: Iterable[BridgeDecl], port_groups: Iterable[PortGroupDecl], prefix: str = "network") -> tuple[dict[str, BridgeDecl], dict[str, PortGroupDecl]]:
    """Validate a whole declaration (config file); every field path starts with ``prefix``."""
    out_b: dict[str, BridgeDecl] = {}
    uplinks: dict[str, str] = {}
    for b in bridges:
        nb = validate_bridge(b, f"{prefix}.bridges.{b.name}")
        if nb.uplink and nb.uplink in uplinks:
            raise InvalidArgument(f"{prefix}.bridges.{b.name}.uplink", f"{nb.uplink!r} is already the uplink of bridge {uplinks[nb.uplink]!r}")
        if nb.uplink in out_b or nb.name in uplinks:
            raise InvalidArgument(f"{prefix}.bridges.{b.name}.uplink", "a declared bridge cannot be another bridge's uplink")
        if nb.uplink:
            uplinks[nb.uplink] = nb.name
        out_b[nb.name] = nb
    out_pg: dict[str, PortGroupDecl] = {}
    for pg in port_groups:
        out_pg[pg.name] = validate_port_group(pg, out_b, f"{prefix}.port_groups.{pg.name}")
    return out_b, out_pg
