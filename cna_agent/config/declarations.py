"""The declared networks and datastores: ``[network.bridges.NAME]``, ``[network.port_groups.NAME]``
and ``[storage.datastores.NAME]`` tables turned into validated declarations.

Separate because these tables are not plain section keys: each entry is checked field by
field here, then by the subsystem's own model (cna_agent.network.model,
cna_agent.storage.model, the same checks the gRPC API applies), and that model's error is
re-worded to name the file the entry came from.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from cna_agent.config.coerce import coerce
from cna_agent.contracts import Bandwidth
from cna_agent.config.sections import ConfigError, NetworkConfig, StorageConfig

__all__ = ["datastore_declarations", "network_declarations"]


def network_declarations(net: NetworkConfig, tables: Mapping[str, Mapping[str, tuple[dict[str, Any], str]]]) -> NetworkConfig:
    """Turn [network.bridges.*] / [network.port_groups.*] into validated declarations.

    The checks are cna_agent.network.model's, the same the gRPC API applies; an error names
    the key (network.bridges.br0.mtu) and the file it came from.
    """
    from cna_agent.errors import InvalidArgument
    from cna_agent.network import model

    origins: dict[str, str] = {}

    def fields_of(kind: str, name: str, entry: dict[str, Any], origin: str, allowed: dict[str, type]) -> dict[str, Any]:
        origins[f"network.{kind}.{name}"] = origin
        out: dict[str, Any] = {}
        for key, value in entry.items():
            where = f"network.{kind}.{name}.{key} (from {origin})"
            if key not in allowed:
                raise ConfigError(f"unknown key network.{kind}.{name}.{key} in {origin} (known: {', '.join(sorted(allowed))})")
            want = allowed[key]
            if want is Bandwidth:
                if not isinstance(value, Mapping) or set(value) - {"average_kbps", "peak_kbps", "burst_kib"}:
                    raise ConfigError(f"{where}: expected a table with average_kbps, peak_kbps, burst_kib")
                value = Bandwidth(**dict(value))
            elif want is tuple:
                if not isinstance(value, list):
                    raise ConfigError(f"{where}: expected a list, got {value!r}")
                value = tuple(value)
            else:
                value = coerce("network", f"{kind}.{name}.{key}", want, value, origin)
            out[key] = value
        return out

    bridge_keys = {"type": str, "uplink": str, "mtu": int, "addresses": tuple, "datapath_type": str, "fail_mode": str}
    pg_keys = {"bridge": str, "vlan": int, "trunk_vlans": tuple, "inbound": Bandwidth,
               "outbound": Bandwidth, "mac_anti_spoofing": bool, "ip_anti_spoofing": bool}
    bridges = [model.BridgeDecl(name=name, source="config", **fields_of("bridges", name, entry, origin, bridge_keys))
               for name, (entry, origin) in tables.get("bridges", {}).items()]
    port_groups = [model.PortGroupDecl(name=name, source="config", **fields_of("port_groups", name, entry, origin, pg_keys))
                   for name, (entry, origin) in tables.get("port_groups", {}).items()]
    try:
        out_b, out_pg = model.validate_all(bridges, port_groups, "network")
    except InvalidArgument as exc:
        parts = exc.field.split(".")
        origin = origins.get(".".join(parts[:3]), "defaults")
        raise ConfigError(f"{exc.message} (from {origin})") from None
    return dataclasses.replace(net, bridges=tuple(out_b.values()), port_groups=tuple(out_pg.values()))


def datastore_declarations(cfg: StorageConfig, tables: Mapping[str, tuple[dict[str, Any], str]]) -> StorageConfig:
    """Turn [storage.datastores.*] into validated declarations (cna_agent.storage.model's checks);
    an error names the key (storage.datastores.san1.portals[0]) and the file it came from."""
    from cna_agent.errors import InvalidArgument
    from cna_agent.storage import model

    allowed = {"type": str, "path": str, "portals": tuple, "target_iqn": str, "initiator": str, "chap_user": str,
               "chap_secret_file": str, "target_wwpns": tuple, "lun_wwns": tuple, "scan_timeout_s": float,
               "replacement_timeout_s": int}
    decls = []
    origins: dict[str, str] = {}
    for name, (entry, origin) in tables.items():
        origins[name] = origin
        kwargs: dict[str, Any] = {}
        for key, value in entry.items():
            where = f"storage.datastores.{name}.{key} (from {origin})"
            if key not in allowed:
                raise ConfigError(f"unknown key storage.datastores.{name}.{key} in {origin} (known: {', '.join(sorted(allowed))})")
            if allowed[key] is tuple:
                if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                    raise ConfigError(f"{where}: expected a list of strings, got {value!r}")
                value = tuple(value)
            else:
                value = coerce("storage", f"datastores.{name}.{key}", allowed[key], value, origin)
            kwargs[key] = value
        decls.append(model.DatastoreDecl(name=name, **kwargs))
    try:
        out = model.validate_all(decls, "storage.datastores")
    except InvalidArgument as exc:
        origin = next((o for n, o in origins.items() if exc.field == f"storage.datastores.{n}"
                       or exc.field.startswith(f"storage.datastores.{n}.")), "defaults")
        raise ConfigError(f"{exc.message} (from {origin})") from None
    return dataclasses.replace(cfg, datastores=tuple(out.values()))
