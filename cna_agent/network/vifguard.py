"""NIC anti-spoofing enforced by the agent itself: nftables on kernel taps, OpenFlow on OVS ports.

Why not libvirt's nwfilter (``<filterref filter='clean-traffic'/>``): the embedded QEMU driver
the agent runs by default has no nwfilter driver at all, and nwfilter's ebtables/iptables rules
never see traffic of an OVS port (OVS takes the frame before any bridge netfilter hook; with the
userspace datapath it reads the tap through a packet socket, before even the tap's ingress
hook). One mechanism per backend, the same in both libvirt modes:

* **Linux bridges**: one nftables ``netdev``-family base chain per tap, hooked on the tap's
  *ingress* (table ``cna_vif_guard``). It drops a frame before the bridge sees it, so a forged
  source MAC cannot even poison the bridge's forwarding database. The first rule's comment
  records what the chain enforces (``vm=... mac=... ips=...``), which is how a reconcile pass
  tells a current chain from a stale or outdated one.
* **Open vSwitch**: OpenFlow flows in table 0 of the NIC's bridge, cookie ``0xc7a0<mac>``, on
  the port's OpenFlow number: the NIC's own MAC (and, with IP anti-spoofing, its addresses, ARP
  with its MAC and address, DHCP discovery) goes to ``NORMAL``, everything else from the port is
  dropped. ovs-ofctl talks to the bridge's management socket ``<rundir>/<bridge>.mgmt``, the
  run directory of the ovsdb-server the agent uses. Flows are not stored in OVSDB, so an
  ovs-vswitchd restart loses them: the per-VM port check puts them back.

The same two mechanisms carry a NIC's *outbound* limit (guest -> host): libvirt renders it as a
tc ``police`` action on the tap's ingress, which needs the kernel's act_police (absent on some
kernels, e.g. this project's test hosts, where libvirt then fails to start the VM) and which a
userspace-datapath OVS never sees (it reads the tap before the ingress hook). So the agent
enforces it: an nftables ``limit rate over ... drop`` in the tap's chain, an OpenFlow meter
(meter id = the port's OpenFlow number) on the OVS port's flows. The inbound limit (host ->
guest) stays libvirt's ``<bandwidth><inbound>`` (an htb qdisc on the tap, seen by both).

Both are visible from outside (``nft list table netdev cna_vif_guard``, ``ovs-ofctl dump-flows``).
``nft`` is driven through its JSON mode for reads; ovs-ofctl has no machine-readable dump, so
only the cookie, in_port and address fields of our own flows are read back.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import re
import subprocess
from dataclasses import dataclass
from typing import Sequence

from cna_agent.errors import FailedPrecondition, Unavailable

log = logging.getLogger(__name__)

NFT_TABLE = "cna_vif_guard"
#: Before anything else on the tap's ingress (tc, other nft tables).
NFT_PRIORITY = -500
#: High half of the cookie of every anti-spoofing flow; the low 48 bits are the NIC's MAC.
COOKIE_PREFIX = 0xC7A0 << 48
COOKIE_MASK = 0xFFFF << 48
PRIO_ALLOW, PRIO_DROP = 40010, 40000
CMD_TIMEOUT_S = 20.0
_DEV_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,14}$")


@dataclass(frozen=True)
class GuardWant:
    """What one NIC may send: its MAC, and with ``ip_check`` only from ``ips``."""

    device: str
    mac: str
    vm_uuid: str
    ip_check: bool = False
    ips: tuple[str, ...] = ()
    #: MAC check (anti-spoofing on); False = only the outbound limit.
    mac_check: bool = True
    #: Outbound (guest -> host) limit, kbit/s and KiB; 0 = none.
    rate_kbps: int = 0
    burst_kib: int = 0

    @property
    def burst(self) -> int:
        """KiB a limited NIC may send above its rate: as asked, else 100 ms of its rate."""
        return self.burst_kib or max(16, self.rate_kbps // 8 // 10)

    @property
    def summary(self) -> str:
        """The enforced policy in one token string (kept in the nft rule comment)."""
        mac = self.mac if self.mac_check else "*"
        rate = f" rate={self.rate_kbps}k/{self.burst}KiB" if self.rate_kbps else ""
        return f"cna vm={self.vm_uuid} mac={mac} ips={','.join(self.ips) if self.ip_check else '*'}{rate}"


def check_want(w: GuardWant) -> GuardWant:
    """Everything that reaches a command line or a rule is checked here first."""
    if not _DEV_RE.match(w.device):
        raise FailedPrecondition(f"device {w.device!r} is not an interface name")
    if not re.fullmatch(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}", w.mac):
        raise FailedPrecondition(f"mac {w.mac!r} is not a lower-case MAC address")
    if not re.fullmatch(r"[0-9a-f-]{36}", w.vm_uuid):
        raise FailedPrecondition(f"vm uuid {w.vm_uuid!r} is not a UUID")
    for ip in w.ips:
        ipaddress.ip_address(ip)
    return w


def run(argv: Sequence[str], *, input: str | None = None, timeout: float = CMD_TIMEOUT_S) -> str:
    """One external command: argument list, deadline, stderr in the error."""
    try:
        p = subprocess.run(list(argv), input=input, capture_output=True, text=True, timeout=timeout,
                           stdin=None if input is not None else subprocess.DEVNULL)
    except FileNotFoundError:
        raise FailedPrecondition(f"{argv[0]} is not installed (anti-spoofing needs it)") from None
    except subprocess.TimeoutExpired:
        raise Unavailable(f"{' '.join(argv[:3])} did not finish within {timeout:g}s") from None
    if p.returncode != 0:
        raise Unavailable(f"{' '.join(argv[:3])} failed ({p.returncode}): {p.stderr.strip()[-800:]}")
    return p.stdout


# -- Linux bridges: nftables netdev ingress ----------------------------------------------------


def _chain(device: str) -> str:
    return f"vif-{device}"


def _nft_rules(w: GuardWant) -> list[str]:
    mac = w.mac
    if w.mac_check:
        rules = [f'ether saddr != {mac} counter drop comment "{w.summary}"']
    else:
        rules = [f'counter comment "{w.summary}"']
    if w.ip_check:
        v4 = [ip for ip in w.ips if ipaddress.ip_address(ip).version == 4]
        v6 = [ip for ip in w.ips if ipaddress.ip_address(ip).version == 6]
        spa = ", ".join(["0.0.0.0", *v4])
        rules += [
            f"arp saddr ether != {mac} counter drop",
            f"arp saddr ip != {{ {spa} }} counter drop",
            "ip saddr 0.0.0.0 udp sport 68 udp dport 67 accept",  # DHCP discovery
            (f"ip saddr != {{ {', '.join(v4)} }} counter drop" if v4 else "meta protocol ip counter drop"),
            (f"ip6 saddr != {{ ::, fe80::/10, {', '.join(v6)} }} counter drop" if v6
             else "ip6 saddr != { ::, fe80::/10 } counter drop"),
            # As on OVS (only IPv4, ARP and IPv6 flows pass): no other L2 protocol, no VLAN tags.
            "meta protocol != { ip, arp, ip6 } counter drop",
        ]
    if w.rate_kbps:
        # nft's byte units are 1024-based: the same KiB/s libvirt would have enforced.
        rules.append(f"limit rate over {max(1, w.rate_kbps // 8)} kbytes/second burst {w.burst} kbytes counter drop")
    return rules


class NftGuard:
    """Per-tap ingress chains in one nftables table of the netdev family."""

    def applied(self) -> dict[str, str]:
        """device -> the summary its chain enforces ("" when the chain has no summary)."""
        try:
            out = run(["nft", "-j", "list", "table", "netdev", NFT_TABLE])
        except Unavailable as exc:
            if "No such file" in exc.message:
                return {}
            raise
        chains: dict[str, str] = {}
        for item in json.loads(out).get("nftables", []):
            if "chain" in item and item["chain"].get("name", "").startswith("vif-"):
                chains.setdefault(item["chain"]["name"][4:], "")
            elif "rule" in item and item["rule"].get("chain", "").startswith("vif-"):
                dev = item["rule"]["chain"][4:]
                if not chains.get(dev) and item["rule"].get("comment", "").startswith("cna "):
                    chains[dev] = item["rule"]["comment"]
        return chains

    def apply(self, w: GuardWant) -> list[str]:
        w = check_want(w)
        chain = _chain(w.device)
        script = [f"add table netdev {NFT_TABLE}",
                  f"add chain netdev {NFT_TABLE} {chain} {{ type filter hook ingress device \"{w.device}\" "
                  f"priority {NFT_PRIORITY}; policy accept; }}",
                  f"flush chain netdev {NFT_TABLE} {chain}"]
        script += [f"add rule netdev {NFT_TABLE} {chain} {r}" for r in _nft_rules(w)]
        run(["nft", "-f", "-"], input="\n".join(script) + "\n")  # one transaction
        return [f"anti-spoofing on {w.device}: {w.summary[4:]} (nft netdev {NFT_TABLE} {chain})"]

    def remove(self, device: str) -> list[str]:
        if not _DEV_RE.match(device):
            return []
        try:
            run(["nft", "delete", "chain", "netdev", NFT_TABLE, _chain(device)])
        except Unavailable as exc:
            if "No such file" in exc.message:
                return []
            raise
        return [f"anti-spoofing removed from {device}"]


# -- Open vSwitch: OpenFlow table 0 -----------------------------------------------------------


def cookie_of(mac: str) -> int:
    return COOKIE_PREFIX | int(mac.replace(":", ""), 16)


def mac_of(cookie: int) -> str:
    h = f"{cookie & ~COOKIE_MASK & (2**64 - 1):012x}"
    return ":".join(h[i:i + 2] for i in range(0, 12, 2))


def _flows(w: GuardWant, ofport: int) -> list[str]:
    port = f"cookie={cookie_of(w.mac):#x},table=0,in_port={ofport}"
    base = f"{port},dl_src={w.mac}" if w.mac_check else port
    allow, drop = f"priority={PRIO_ALLOW}", f"priority={PRIO_DROP}"
    out = f"meter:{ofport},NORMAL" if w.rate_kbps else "NORMAL"
    if not w.mac_check:
        return [f"{base},{allow},actions={out}"]
    flows = [f"{port},{drop},actions=drop"]
    if not w.ip_check:
        return flows + [f"{base},{allow},actions={out}"]
    flows += [f"{base},{allow},udp,nw_src=0.0.0.0,tp_src=68,tp_dst=67,actions={out}",
              f"{base},{allow},arp,arp_sha={w.mac},arp_spa=0.0.0.0,actions={out}",
              f"{base},{allow},ipv6,ipv6_src=fe80::/10,actions={out}",
              f"{base},{allow},ipv6,ipv6_src=::,actions={out}"]
    for ip in w.ips:
        if ipaddress.ip_address(ip).version == 4:
            flows += [f"{base},{allow},ip,nw_src={ip},actions={out}",
                      f"{base},{allow},arp,arp_sha={w.mac},arp_spa={ip},actions={out}"]
        else:
            flows.append(f"{base},{allow},ipv6,ipv6_src={ip},actions={out}")
    return flows


@dataclass(frozen=True)
class FlowState:
    count: int
    in_ports: frozenset[int]
    addresses: frozenset[str]
    meters: frozenset[int] = frozenset()


_COOKIE_RE = re.compile(r"cookie=(0x[0-9a-f]+)")
_INPORT_RE = re.compile(r"in_port=(\d+)")
_ADDR_RE = re.compile(r"(?:nw_src|arp_spa|ipv6_src)=([0-9a-fA-F.:/]+)")
_METER_RE = re.compile(r"meter:(\d+)")


class OpenFlowGuard:
    """Anti-spoofing flows on OVS bridges, through the bridge's management socket."""

    def __init__(self, rundir: str) -> None:
        self.rundir = rundir

    def target(self, bridge: str) -> str:
        if not _DEV_RE.match(bridge):
            raise FailedPrecondition(f"bridge {bridge!r} is not an interface name")
        sock = os.path.join(self.rundir, f"{bridge}.mgmt")
        return f"unix:{sock}"

    def applied(self, bridge: str) -> dict[str, FlowState]:
        """mac -> what our flows on ``bridge`` enforce."""
        out = run(["ovs-ofctl", "--no-names", "--no-stats", "dump-flows", self.target(bridge),
                   f"cookie={COOKIE_PREFIX:#x}/{COOKIE_MASK:#x}"])
        found: dict[str, list[str]] = {}
        for line in out.splitlines():
            m = _COOKIE_RE.search(line)
            if m:
                found.setdefault(mac_of(int(m.group(1), 16)), []).append(line)
        return {mac: self._state(lines) for mac, lines in found.items()}

    @staticmethod
    def _state(lines: list[str]) -> FlowState:
        return FlowState(len(lines), frozenset(int(p) for ln in lines for p in _INPORT_RE.findall(ln)),
                         frozenset(a for ln in lines for a in _ADDR_RE.findall(ln)),
                         frozenset(int(m) for ln in lines for m in _METER_RE.findall(ln)))

    def expected(self, w: GuardWant, ofport: int) -> FlowState:
        return self._state(_flows(w, ofport))

    def meter_rate(self, bridge: str, meter: int) -> int:
        """The kbit/s of meter ``meter`` on ``bridge`` (0 = no such meter)."""
        out = run(["ovs-ofctl", "-O", "OpenFlow13", "dump-meters", self.target(bridge), f"meter={meter}"])
        m = re.search(r"rate=(\d+)", out)
        return int(m.group(1)) if m else 0

    def apply(self, bridge: str, ofport: int, w: GuardWant) -> list[str]:
        w = check_want(w)
        if not isinstance(ofport, int) or ofport <= 0:
            raise FailedPrecondition(f"port {w.device} has no OpenFlow port number yet")
        if w.rate_kbps:
            meter = (f"meter={ofport},kbps,burst,stats,bands=type=drop,rate={w.rate_kbps},"
                     f"burst_size={w.burst * 8}")
            verb = "mod-meter" if self.meter_rate(bridge, ofport) else "add-meter"
            run(["ovs-ofctl", "-O", "OpenFlow13", verb, self.target(bridge), meter])
        lines = [f"delete cookie={cookie_of(w.mac):#x}/-1"] + [f"add {f}" for f in _flows(w, ofport)]
        run(["ovs-ofctl", "-O", "OpenFlow14", "--bundle", "add-flows", self.target(bridge), "-"],
            input="\n".join(lines) + "\n")
        return [f"anti-spoofing on {w.device}: {w.summary[4:]} (OpenFlow cookie {cookie_of(w.mac):#x} on {bridge})"]

    def remove(self, bridge: str, mac: str, meters: frozenset[int] = frozenset()) -> list[str]:
        if not re.fullmatch(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}", mac):
            return []
        run(["ovs-ofctl", "del-flows", self.target(bridge), f"cookie={cookie_of(mac):#x}/-1"])
        for meter in sorted(meters):
            self.del_meter(bridge, meter)
        return [f"anti-spoofing flows of {mac} removed from {bridge}"]

    def del_meter(self, bridge: str, meter: int) -> None:
        run(["ovs-ofctl", "-O", "OpenFlow13", "del-meter", self.target(bridge), f"meter={int(meter)}"])
