"""The host networks that should exist: bridges and port groups declared in agent.toml
(re-applied on every start) and by the VRM (EnsureBridge/EnsurePortGroup), the latter kept in
``<state_dir>/network/declared.json`` so they survive restarts. agent.toml wins on a name both
declare. Also the plain views the API returns for them (with health, and with their NICs).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from cna_agent.contracts import Bandwidth, VmNic
from cna_agent.network.model import BridgeDecl, PortGroupDecl

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BridgeView:
    """A declared bridge and how the host matches it: ("ok"|"degraded"|"unreachable", reason)."""

    decl: BridgeDecl
    health: str = "ok"
    reason: str = ""


@dataclass(frozen=True)
class PortGroupView:
    """A declared port group and the VM NICs in it."""

    decl: PortGroupDecl
    vifs: tuple[VmNic, ...] = ()


class Declarations:
    def __init__(self, state_dir: str, config_bridges: tuple[BridgeDecl, ...] = (),
                 config_port_groups: tuple[PortGroupDecl, ...] = ()) -> None:
        self._store = Path(state_dir) / "network" / "declared.json"
        self.config_bridges = {b.name: b for b in config_bridges}
        self.config_port_groups = {p.name: p for p in config_port_groups}
        self.api_bridges: dict[str, BridgeDecl] = {}
        self.api_port_groups: dict[str, PortGroupDecl] = {}
        self._load()

    @property
    def bridges(self) -> dict[str, BridgeDecl]:
        return {**self.api_bridges, **self.config_bridges}

    @property
    def port_groups(self) -> dict[str, PortGroupDecl]:
        return {**self.api_port_groups, **self.config_port_groups}

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
            self.api_bridges[b["name"]] = BridgeDecl(**b)
        for p in data.get("port_groups", []):
            p["trunk_vlans"] = tuple(p.get("trunk_vlans", ()))
            p["inbound"] = Bandwidth(**p.get("inbound", {}))
            p["outbound"] = Bandwidth(**p.get("outbound", {}))
            self.api_port_groups[p["name"]] = PortGroupDecl(**p)

    def save(self) -> None:
        self._store.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = self._store.with_suffix(".tmp")
        tmp.write_text(json.dumps({"bridges": [asdict(b) for b in self.api_bridges.values()],
                                   "port_groups": [asdict(p) for p in self.api_port_groups.values()]}, indent=1))
        os.replace(tmp, self._store)

    def guess_port_group(self, nic: VmNic) -> str:
        """The port group a NIC's XML matches (bridge + VLAN), when nothing recorded it."""
        for pg in self.port_groups.values():
            if pg.bridge == nic.bridge and (pg.vlan or None) == nic.vlan and tuple(pg.trunk_vlans) == tuple(sorted(nic.trunk)):
                return pg.name
        return ""
