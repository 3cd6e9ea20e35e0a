"""Linux bridges through netlink (pyroute2), never by running ``ip``.

Why netlink: one socket and typed messages instead of a process per change and parsing of
human output; errors come back as errno values we can map. Every call may target a network
namespace (``netns``) so tests and benchmarks work in scratch namespaces without touching the
host's interfaces.

VLANs on Linux bridges need kernel features that hosts may lack: 802.1q VLAN devices (the
8021q module) or bridge VLAN filtering (CONFIG_BRIDGE_VLAN_FILTERING). Both are probed once
in a scratch namespace (the host is never changed by the probe) and the answer is cached, so
a VLAN port group on a Linux bridge is refused with FAILED_PRECONDITION naming the missing
feature instead of failing half-way when a VM starts.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import threading
import uuid
from dataclasses import dataclass, field
from typing import Any

from cna_agent.errors import FailedPrecondition, InvalidArgument, Unavailable

log = logging.getLogger(__name__)

IFF_UP = 0x1


@dataclass
class LinuxBridgeState:
    name: str
    exists: bool = False
    up: bool = False
    mtu: int = 0
    ports: list[str] = field(default_factory=list)
    addresses: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class VlanSupport:
    vlan_devices: bool
    vlan_filtering: bool
    detail: str = ""


_vlan_cache: VlanSupport | None = None
_vlan_lock = threading.Lock()


def _ipr(netns: str | None) -> Any:
    from pyroute2 import IPRoute, NetNS

    return NetNS(netns) if netns else IPRoute()


def _netlink_error(exc: Exception, what: str) -> Exception:
    code = getattr(exc, "code", None)
    if code == errno.EPERM:
        return Unavailable(f"{what}: not permitted (the agent needs CAP_NET_ADMIN)")
    if code == errno.EOPNOTSUPP:
        return FailedPrecondition(f"{what}: the kernel does not support this ({os.strerror(code)})")
    return Unavailable(f"{what}: {exc}")


def probe_vlan_support() -> VlanSupport:
    """Whether this kernel has 802.1q VLAN devices and bridge VLAN filtering (cached).

    Tried for real in a throw-away network namespace: module lists and config files lie on
    containers and custom kernels, a failed netlink request does not.
    """
    global _vlan_cache
    with _vlan_lock:
        if _vlan_cache is not None:
            return _vlan_cache
        from pyroute2 import NetNS, netns

        name = f"cna-probe-{uuid.uuid4().hex[:8]}"
        vlan_dev = filtering = False
        notes = []
        try:
            netns.create(name)
        except Exception as exc:  # no netns support at all: assume nothing
            _vlan_cache = VlanSupport(False, False, f"cannot create a scratch network namespace: {exc}")
            return _vlan_cache
        try:
            with NetNS(name) as ns:
                ns.link("add", ifname="probe-br", kind="bridge")
                idx = ns.link_lookup(ifname="probe-br")[0]
                try:
                    ns.link("add", ifname="probe-br.10", kind="vlan", link=idx, vlan_id=10)
                    vlan_dev = True
                except Exception as exc:
                    notes.append(f"802.1q VLAN devices: {exc}")
                try:
                    ns.link("set", index=idx, kind="bridge", br_vlan_filtering=1)
                    filtering = True
                except Exception as exc:
                    notes.append(f"bridge VLAN filtering: {exc}")
        finally:
            try:
                netns.remove(name)
            except Exception:
                log.warning("event=network.probe_cleanup_failed netns=%s", name)
        _vlan_cache = VlanSupport(vlan_dev, filtering, "; ".join(notes))
        log.info("event=network.vlan_probe vlan_devices=%s vlan_filtering=%s", vlan_dev, filtering)
        return _vlan_cache


class LinuxBridgeDriver:
    """Ensure/inspect/delete Linux bridges; blocking (run it in an executor)."""

    def __init__(self, netns: str | None = None) -> None:
        self.netns = netns

    def state(self, name: str) -> LinuxBridgeState:
        with _ipr(self.netns) as ipr:
            return self._state(ipr, name)

    @staticmethod
    def _state(ipr: Any, name: str) -> LinuxBridgeState:
        idx = ipr.link_lookup(ifname=name)
        if not idx:
            return LinuxBridgeState(name=name)
        link = ipr.get_links(idx[0])[0]
        st = LinuxBridgeState(name=name, exists=True, up=bool(link["flags"] & IFF_UP), mtu=int(link.get_attr("IFLA_MTU") or 0))
        st.ports = sorted(l.get_attr("IFLA_IFNAME") for l in ipr.get_links() if l.get_attr("IFLA_MASTER") == idx[0])
        st.addresses = sorted(f"{a.get_attr('IFA_ADDRESS')}/{a['prefixlen']}" for a in ipr.get_addr(index=idx[0]))
        return st

    def is_bridge(self, name: str) -> bool:
        with _ipr(self.netns) as ipr:
            idx = ipr.link_lookup(ifname=name)
            if not idx:
                return False
            info = ipr.get_links(idx[0])[0].get_attr("IFLA_LINKINFO")
            return bool(info) and info.get_attr("IFLA_INFO_KIND") == "bridge"

    def link_exists(self, name: str) -> bool:
        with _ipr(self.netns) as ipr:
            return bool(ipr.link_lookup(ifname=name))

    def ensure(self, name: str, *, uplink: str = "", mtu: int = 0, addresses: tuple[str, ...] = ()) -> list[str]:
        """Make bridge ``name`` exist, up, with its uplink, MTU and addresses; return changes.

        The uplink is checked before anything is created, so a missing uplink changes nothing.
        """
        changes: list[str] = []
        with _ipr(self.netns) as ipr:
            up_idx = None
            if uplink:
                found = ipr.link_lookup(ifname=uplink)
                if not found:
                    raise InvalidArgument("bridge.uplink", f"uplink {uplink!r} does not exist on this host")
                up_idx = found[0]
            idx = ipr.link_lookup(ifname=name)
            try:
                if not idx:
                    ipr.link("add", ifname=name, kind="bridge")
                    idx = ipr.link_lookup(ifname=name)
                    changes.append(f"created Linux bridge {name}")
                else:
                    info = ipr.get_links(idx[0])[0].get_attr("IFLA_LINKINFO")
                    if not info or info.get_attr("IFLA_INFO_KIND") != "bridge":
                        raise FailedPrecondition(f"bridge.name: {name!r} exists and is not a bridge", field="bridge.name")
                bidx = idx[0]
                st = self._state(ipr, name)
                if mtu and st.mtu != mtu:
                    if up_idx is not None:
                        ipr.link("set", index=up_idx, mtu=mtu)
                    ipr.link("set", index=bidx, mtu=mtu)
                    changes.append(f"mtu {st.mtu} -> {mtu}")
                if up_idx is not None:
                    link = ipr.get_links(up_idx)[0]
                    if link.get_attr("IFLA_MASTER") != bidx:
                        ipr.link("set", index=up_idx, master=bidx)
                        changes.append(f"enslaved uplink {uplink}")
                    if not link["flags"] & IFF_UP:
                        ipr.link("set", index=up_idx, state="up")
                        changes.append(f"uplink {uplink} up")
                for addr in addresses:
                    iface = ipaddress.ip_interface(addr)
                    if str(iface) not in st.addresses:
                        ipr.addr("add", index=bidx, address=str(iface.ip), prefixlen=iface.network.prefixlen)
                        changes.append(f"address {iface}")
                if not st.up:
                    ipr.link("set", index=bidx, state="up")
                    if not changes or not changes[0].startswith("created"):
                        changes.append("brought up")
            except (FailedPrecondition, InvalidArgument):
                raise
            except Exception as exc:
                raise _netlink_error(exc, f"Linux bridge {name}") from exc
        return changes

    def delete(self, name: str) -> bool:
        with _ipr(self.netns) as ipr:
            idx = ipr.link_lookup(ifname=name)
            if not idx:
                return False
            try:
                ipr.link("del", index=idx[0])
            except Exception as exc:
                raise _netlink_error(exc, f"delete Linux bridge {name}") from exc
            return True

    def require_vlans(self, field: str) -> None:
        """Refuse VLAN port groups on Linux bridges when the kernel cannot carry them."""
        support = probe_vlan_support()
        if not support.vlan_devices:
            raise FailedPrecondition(
                f"{field}: VLAN port groups on Linux bridges need 802.1q VLAN devices (kernel module 8021q), "
                f"which this host's kernel does not provide; use an Open vSwitch bridge for VLANs ({support.detail})",
                field=field,
            )

