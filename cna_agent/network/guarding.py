"""Which NICs must be guarded against spoofing, and what the host has: the drift between them.

The port group says whether its NICs get MAC (``mac_anti_spoofing``) or MAC+IP
(``ip_anti_spoofing``) checks; the NIC's spec says which addresses it may use
(``NicSpec.ip_addresses``, seen here as ``VmNic.ip_addresses``). vifguard.py enforces it
(nftables for taps on Linux bridges, OpenFlow for OVS ports). This module follows the VIF's
lifecycle level-triggered, like the port repair in drift.py: every pass compares each running
NIC's wanted guard with what nft/OpenFlow have, applies missing or outdated guards, and removes
guards nobody wants any more (the VM stopped, the NIC was unplugged, the VM was deleted) so a
later tap or OpenFlow port number reused by another VM never inherits them.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Awaitable, Callable

from cna_agent.contracts import VmNic
from cna_agent.errors import AgentError
from cna_agent.network.vifguard import GuardWant, NftGuard, OpenFlowGuard

if TYPE_CHECKING:
    from cna_agent.network.service import NetworkService

Fix = Callable[[], Awaitable[list[str]]]


@dataclass
class GuardDrift:
    resource: str
    problem: str
    fix: Fix


def ovs_rundir(remote: str) -> str:
    """ovs-vswitchd's run directory (bridge management sockets live there): the directory of
    the ovsdb-server socket the agent uses, as for OVS's own tools (OVS_RUNDIR)."""
    if remote.startswith("unix:"):
        return os.path.dirname(remote[len("unix:"):])
    return os.environ.get("OVS_RUNDIR", "/run/openvswitch")


class Guards:
    def __init__(self, net: "NetworkService", ovsdb_remote: str) -> None:
        self.net = net
        self.nft = NftGuard()
        self.openflow = OpenFlowGuard(ovs_rundir(ovsdb_remote))
        #: What nft / each bridge's flows showed, for CACHE_S: a timer pass runs the check for
        #: every VM (stopped ones too), which must not cost a command per VM. Any fix clears it.
        self._seen: dict[str, tuple[float, Any]] = {}

    CACHE_S = 2.0

    async def _read(self, key: str, fn: Callable[[], Any]) -> Any:
        hit = self._seen.get(key)
        if hit is not None and time.monotonic() - hit[0] < self.CACHE_S:
            return hit[1]
        value = await self.net.blocking(fn, what=key)
        self._seen[key] = (time.monotonic(), value)
        return value

    def _changed(self, fix: Fix) -> Fix:
        async def run() -> list[str]:
            self._seen.clear()
            try:
                return await fix()
            finally:
                self._seen.clear()
        return run

    def want(self, v: VmNic) -> GuardWant | None:
        """The guard a running NIC needs (None: its port group asks for none)."""
        pg = self.net.port_groups.get(v.port_group)
        if pg is None or not v.device or not v.active:
            return None
        spoof = pg.mac_anti_spoofing or pg.ip_anti_spoofing
        # The NIC's own outbound limit wins over its port group's (as for the inbound one).
        rate, burst = (v.outbound_kbps, 0) if v.outbound_kbps else (pg.outbound.average_kbps, pg.outbound.burst_kib)
        if not spoof and not rate:
            return None
        return GuardWant(device=v.device, mac=v.mac.lower(), vm_uuid=v.vm_uuid, ip_check=pg.ip_anti_spoofing,
                         ips=tuple(v.ip_addresses), mac_check=spoof, rate_kbps=rate, burst_kib=burst)

    async def drift(self, nics: list[VmNic], *, vm_uuid: str = "") -> list[GuardDrift]:
        """Guards missing, outdated or stale for ``nics`` (already normalised: bridge and kind
        known). With ``vm_uuid`` only that VM's guards are judged; else every guard on the host."""
        found: list[GuardDrift] = []
        wanted_linux: dict[str, GuardWant] = {}
        wanted_ovs: dict[str, dict[str, GuardWant]] = {}
        for v in nics:
            decl = self.net.bridges.get(v.bridge)
            w = self.want(v) if decl is not None else None
            if w is None:
                continue
            if decl.type == "linux":
                wanted_linux[w.device] = w
            else:
                wanted_ovs.setdefault(v.bridge, {})[w.mac] = w
        vm_macs = {v.mac.lower() for v in nics if not vm_uuid or v.vm_uuid == vm_uuid}
        # A tap of this VM may carry a chain left by an earlier VM whose tap had the same name.
        vm_devices = {v.device for v in nics if v.active and v.device and (not vm_uuid or v.vm_uuid == vm_uuid)}
        found += await self._linux(wanted_linux, vm_uuid, vm_devices)
        found += await self._ovs(wanted_ovs, vm_uuid, vm_macs)
        return [GuardDrift(g.resource, g.problem, self._changed(g.fix)) for g in found]

    async def _linux(self, wanted: dict[str, GuardWant], vm_uuid: str, vm_devices: set[str]) -> list[GuardDrift]:
        has_linux = any(b.type == "linux" for b in self.net.bridges.values())
        if not wanted and not has_linux:
            return []
        try:
            applied = await self._read("nft list", self.nft.applied)
        except AgentError as exc:
            if not wanted:
                return []  # nothing to enforce; nft missing is only an error when needed
            applied = {}
            err = exc.message
            return [GuardDrift(f"port/{w.device}", f"anti-spoofing cannot be read: {err}", self._nft_apply(w))
                    for w in wanted.values()]
        out: list[GuardDrift] = []
        for dev, w in wanted.items():
            have = applied.get(dev)
            if have != w.summary:
                problem = "anti-spoofing missing" if have is None else f"anti-spoofing outdated ({have[4:] or 'no summary'})"
                out.append(GuardDrift(f"port/{dev}", problem, self._nft_apply(w)))
        for dev, have in applied.items():
            if dev in wanted or (vm_uuid and f"vm={vm_uuid} " not in have + " " and dev not in vm_devices):
                continue
            out.append(GuardDrift(f"port/{dev}", f"stale anti-spoofing chain ({have[4:] or 'no summary'})",
                                  self._nft_remove(dev)))
        return out

    def _nft_apply(self, w: GuardWant) -> Fix:
        async def fix() -> list[str]:
            return await self.net.blocking(lambda: self.nft.apply(w), what=f"nft apply {w.device}")
        return fix

    def _nft_remove(self, dev: str) -> Fix:
        async def fix() -> list[str]:
            return await self.net.blocking(lambda: self.nft.remove(dev), what=f"nft remove {dev}")
        return fix

    async def _ovs(self, wanted: dict[str, dict[str, GuardWant]], vm_uuid: str, vm_macs: set[str]) -> list[GuardDrift]:
        out: list[GuardDrift] = []
        ovs_bridges = [b.name for b in self.net.bridges.values() if b.type == "ovs"]
        if not ovs_bridges or (not wanted and vm_uuid and not vm_macs):
            return out
        try:
            state = await self.net.ovs.call(lambda c: c.bridges())
        except AgentError:
            return out  # the bridge/port drift reports OVSDB trouble
        for br in ovs_bridges:
            want = wanted.get(br, {})
            if br not in state:
                continue
            try:
                applied = await self._read(f"ovs-ofctl dump-flows {br}", lambda: self.openflow.applied(br))
            except AgentError as exc:
                if want:
                    out += [GuardDrift(f"port/{w.device}", f"anti-spoofing flows cannot be read: {exc.message}",
                                       self._of_apply(br, w)) for w in want.values()]
                continue
            for mac, w in want.items():
                port = state[br].ports.get(w.device)
                ofport = port.ofport if port is not None else None
                have = applied.get(mac)
                if ofport and have is not None and have == self.openflow.expected(w, ofport):
                    if not w.rate_kbps:
                        continue
                    try:
                        if await self.net.blocking(lambda: self.openflow.meter_rate(br, int(ofport))) == w.rate_kbps:
                            continue
                    except AgentError:
                        pass
                problem = "anti-spoofing flows missing" if have is None else "anti-spoofing flows outdated"
                out.append(GuardDrift(f"port/{w.device}", problem,
                                      self._of_apply(br, w, have.meters if have is not None else frozenset())))
            for mac in applied:
                if mac in want or (vm_uuid and mac not in vm_macs):
                    continue
                out.append(GuardDrift(f"bridge/{br}", f"stale anti-spoofing flows of {mac}",
                                      self._of_remove(br, mac, applied[mac].meters)))
        return out

    def _of_apply(self, br: str, w: GuardWant, old_meters: frozenset[int] = frozenset()) -> Fix:
        async def fix() -> list[str]:
            # The OpenFlow port number is read now: a port plugged a moment ago has it only
            # once ovs-vswitchd applied it.
            state = await self.net.ovs.call(lambda c: c.bridges())
            port = state.get(br).ports.get(w.device) if br in state else None
            if port is None or not port.ofport or port.ofport < 0:
                raise AgentError(f"port {w.device} is not on {br} (yet)")
            ofport = int(port.ofport)
            changes = await self.net.blocking(lambda: self.openflow.apply(br, ofport, w), what=f"ovs-ofctl add-flows {br}")
            for meter in old_meters - {ofport}:  # the port was re-plugged under another number
                await self.net.blocking(lambda: self.openflow.del_meter(br, meter), what=f"ovs-ofctl del-meter {br}")
            return changes
        return fix

    def _of_remove(self, br: str, mac: str, meters: frozenset[int]) -> Fix:
        async def fix() -> list[str]:
            return await self.net.blocking(lambda: self.openflow.remove(br, mac, meters), what=f"ovs-ofctl del-flows {br}")
        return fix
