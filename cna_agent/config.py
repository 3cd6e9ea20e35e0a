"""The agent's configuration: one typed object, loaded and validated once at start-up.

Sources, later ones winning (the CRI-O model admins know):

1. defaults in the dataclasses below (every option has one, so an empty file is valid);
2. ``/etc/cna-agent/agent.toml`` (or ``--config``);
3. drop-ins ``<config>.d/*.toml`` in lexical order;
4. environment variables ``CNA_AGENT_<SECTION>_<KEY>`` (e.g. ``CNA_AGENT_GRPC_LISTEN``), so a
   systemd ``EnvironmentFile=`` can override one key without editing files.

Unknown sections and keys are errors, not warnings: a typo such as ``listn`` silently
ignored would leave the agent listening where the admin did not expect. Every error names the
key and the file it came from, and the daemon exits non-zero on it.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

DEFAULT_CONFIG_PATH = Path("/etc/cna-agent/agent.toml")
ENV_PREFIX = "CNA_AGENT_"


class ConfigError(Exception):
    """A bad configuration; the message names the key and where it came from."""


@dataclass(frozen=True)
class GrpcConfig:
    #: TCP "host:port" for the VRM; empty disables TCP (unix socket only).
    listen: str = "127.0.0.1:7443"
    #: Root-only unix socket for cna-ctl and local tools.
    unix_socket: str = "/run/cna-agent/cna-agent.sock"
    #: Serve plaintext TCP on a non-loopback address. Off: the agent refuses to start so.
    allow_insecure_tcp: bool = False
    #: Server keepalive ping period; clients must not ping faster than min_ping_interval_s or
    #: gRPC answers GOAWAY "too_many_pings".
    keepalive_time_s: float = 30.0
    keepalive_timeout_s: float = 10.0
    min_ping_interval_s: float = 10.0
    max_concurrent_streams: int = 256
    #: Largest request or reply in MiB (VM specs and listings of a thousand VMs fit easily).
    max_message_mib: int = 16


@dataclass(frozen=True)
class TlsConfig:
    #: PEM server certificate chain and key; both set = TLS on the TCP listener.
    cert: str = ""
    key: str = ""
    #: PEM CA bundle that signs VRM client certificates; set = mutual TLS (client cert required).
    ca: str = ""

    @property
    def enabled(self) -> bool:
        return bool(self.cert and self.key)


@dataclass(frozen=True)
class StateConfig:
    #: Persistent state: the SQLite journal and, in embedded mode, libvirt's own tree.
    dir: str = "/var/lib/cna-agent"
    #: Volatile runtime files (QMP side-channel sockets, pid files).
    run_dir: str = "/run/cna-agent"
    #: Side-channel sockets go here when run_dir is too deep for a unix socket path (108 bytes).
    qmp_fallback_dir: str = "/run/cna-qmp"
    #: Finished operations (and their request ids) are kept this long.
    operation_retention_days: float = 7.0
    #: The event log keeps at most this many events (oldest dropped first).
    event_retention: int = 100_000


@dataclass(frozen=True)
class LibvirtConfig:
    #: Empty = auto: qemu:///system when libvirtd/virtqemud answers, else the embedded driver.
    uri: str = ""
    #: "auto" (kvm only when it really works), "kvm" or "qemu" (TCG).
    virt_type: str = "auto"
    #: Threads running blocking libvirt calls.
    executor_threads: int = 16
    #: How often the connection is pinged, and the reconnect back-off ceiling.
    keepalive_interval_s: float = 5.0
    reconnect_max_backoff_s: float = 30.0
    #: Seconds one libvirt call may take before the caller gets DEADLINE_EXCEEDED.
    call_timeout_s: float = 60.0


@dataclass(frozen=True)
class StorageConfig:
    #: Threads for storage work (qemu-img, LUN scans); separate from libvirt's so a hung SAN
    #: cannot starve VM calls.
    executor_threads: int = 4
    command_timeout_s: float = 3600.0
    probe_interval_s: float = 30.0
    probe_timeout_s: float = 10.0
    #: Declared datastores, ``[storage.datastores.NAME]`` tables validated by
    #: cna_agent.storage.model (cna_agent.storage.model.DatastoreDecl).
    datastores: tuple[Any, ...] = ()


@dataclass(frozen=True)
class HostConfig:
    #: Host CPUs never given to guests, cpulist syntax ("0-1,48-49").
    reserved_cpus: str = ""
    #: Address VNC/SPICE consoles listen on; loopback unless an authenticated tunnel fronts it.
    console_listen: str = "127.0.0.1"
    #: Host identity reported to the VRM; empty = the libvirt host UUID / machine-id.
    host_uuid: str = ""
    #: How often real vCPU/emulator affinity and memory nodes are compared with the placement
    #: plan (seconds; 0 = no periodic check), and whether drift is repaired (re-pinned) or only
    #: reported as placement.drift events.
    placement_check_interval_s: float = 60.0
    placement_repair: bool = False


@dataclass(frozen=True)
class ComputeConfig:
    #: Comma-separated absolute directories whose files a VM spec may name by absolute path
    #: (direct-boot kernels/initrds, disk images) while no storage subsystem resolves volumes.
    #: Empty = none: every path is refused.
    image_dirs: str = ""
    #: A VM paused by an I/O error (disks use error_policy=stop) is resumed by the agent once
    #: every failed disk's storage answers again ("auto", VDSM's auto_resume), or stays paused
    #: for the VRM/admin ("manual").
    io_error_resume: str = "auto"
    #: Seconds between checks of VMs paused by I/O errors (also checked at each I/O error event).
    io_error_check_interval_s: float = 10.0


@dataclass(frozen=True)
class NetworkConfig:
    """Host networks: the OVSDB remote and the bridges/port groups declared in this file.

    ``[network.bridges.NAME]`` and ``[network.port_groups.NAME]`` tables are validated by
    cna_agent.network.model (the same checks as the gRPC API) and re-applied on every start.
    """

    #: Open vSwitch database remote ("unix:PATH" or "tcp:HOST:PORT").
    ovsdb: str = "unix:/run/openvswitch/db.sock"
    #: Seconds one OVSDB connect or transaction may take.
    ovsdb_timeout_s: float = 10.0
    #: Threads for netlink (bridge/VLAN/link) work, each call with a 30 s deadline.
    netlink_threads: int = 2
    #: Periodic drift check and repair; 0 = only at start and on request.
    reconcile_interval_s: float = 60.0
    #: Declared bridges and port groups (cna_agent.network.model.BridgeDecl / PortGroupDecl).
    bridges: tuple[Any, ...] = ()
    port_groups: tuple[Any, ...] = ()


@dataclass(frozen=True)
class LogConfig:
    level: str = "info"
    #: "text" (key=value per line) or "json" (one object per line).
    format: str = "text"


@dataclass(frozen=True)
class MetricsConfig:
    #: Prometheus endpoint "host:port"; empty = off.
    listen: str = ""
    #: Serve metrics on a non-loopback address (they name VMs). Off: refused at start.
    allow_remote: bool = False


#: Stats groups of libvirt's bulk call (virConnectGetAllDomainStats) the agent may ask for.
VM_STATS_GROUPS: tuple[str, ...] = ("state", "cpu-total", "vcpu", "balloon", "block", "interface")


@dataclass(frozen=True)
class StatsConfig:
    #: Seconds between samples (one bulk libvirt call for all VMs, plus psutil for the host);
    #: rates are deltas between consecutive samples. Used by the VRM heartbeat and metrics.
    interval_s: float = 10.0
    #: Comma-separated bulk stats groups (libvirt's names, as in ``virsh domstats --<group>``).
    vm_stats: str = ",".join(VM_STATS_GROUPS)


@dataclass(frozen=True)
class VrmConfig:
    """The link to the central manager (cna_agent.vrm.link)."""

    #: VRM gRPC address "host:port"; empty = no link (the agent only serves its node API).
    address: str = ""
    #: Client certificate and key presented to the VRM, and the CA that signs the VRM's
    #: server certificate (mutual TLS). All empty = plaintext.
    cert: str = ""
    key: str = ""
    ca: str = ""
    #: Talk plaintext to a VRM that is not on loopback. Off: refused at start.
    allow_insecure: bool = False
    #: Host identity sent to the VRM; empty = the host's (host.host_uuid, machine-id, libvirt).
    host_uuid: str = ""
    #: The node API address the VRM calls back ("host:port"); empty = grpc.listen.
    endpoint: str = ""
    heartbeat_interval_s: float = 10.0
    #: Reconnect back-off: exponential from min to max seconds, with full jitter.
    backoff_min_s: float = 1.0
    backoff_max_s: float = 60.0
    #: Most events in one batch on the stream.
    batch_size: int = 500


@dataclass(frozen=True)
class AgentConfig:
    grpc: GrpcConfig = field(default_factory=GrpcConfig)
    tls: TlsConfig = field(default_factory=TlsConfig)
    state: StateConfig = field(default_factory=StateConfig)
    libvirt: LibvirtConfig = field(default_factory=LibvirtConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    host: HostConfig = field(default_factory=HostConfig)
    compute: ComputeConfig = field(default_factory=ComputeConfig)
    network: NetworkConfig = field(default_factory=NetworkConfig)
    log: LogConfig = field(default_factory=LogConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    stats: StatsConfig = field(default_factory=StatsConfig)
    vrm: VrmConfig = field(default_factory=VrmConfig)
    #: Files that were read, in order (for check-config and the start-up log line).
    sources: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data.pop("sources")
        # Declared networks as TOML shows them: tables keyed by name.
        for section, keys in _TABLE_KEYS.items():
            for key in keys:
                data[section][key] = {
                    item["name"]: {k: (list(v) if isinstance(v, tuple) else v) for k, v in item.items() if k not in ("name", "source")}
                    for item in data[section][key]
                }
        return data

    def to_toml(self) -> str:
        """The effective config as TOML (what ``check-config`` prints)."""
        lines: list[str] = []
        for section, values in self.to_dict().items():
            lines.append(f"[{section}]")
            tables = {k: v for k, v in values.items() if isinstance(v, dict) and v}
            for key, value in values.items():
                if key not in tables:
                    lines.append(f"{key} = {_toml_value(value)}")
            lines.append("")
            for key, entries in tables.items():
                for name, entry in entries.items():
                    lines.append(f"[{section}.{key}.{_toml_value(name)}]")
                    lines.extend(f"{k} = {_toml_value(v)}" for k, v in entry.items())
                    lines.append("")
        return "\n".join(lines)


def _toml_value(value: Any) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    text = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'


_SECTION_TYPES: dict[str, type] = {
    "grpc": GrpcConfig,
    "tls": TlsConfig,
    "state": StateConfig,
    "libvirt": LibvirtConfig,
    "storage": StorageConfig,
    "host": HostConfig,
    "compute": ComputeConfig,
    "network": NetworkConfig,
    "log": LogConfig,
    "metrics": MetricsConfig,
    "stats": StatsConfig,
    "vrm": VrmConfig,
}


def _coerce(section: str, key: str, want: type, value: Any, origin: str) -> Any:
    """Check one value's type; environment strings are converted, file values must match."""
    where = f"{section}.{key} (from {origin})"
    if isinstance(value, str) and origin.startswith("env "):
        try:
            if want is bool:
                low = value.strip().lower()
                if low in ("1", "true", "yes", "on"):
                    return True
                if low in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            if want is int:
                return int(value)
            if want is float:
                return float(value)
        except ValueError:
            raise ConfigError(f"{where}: expected {want.__name__}, got {value!r}") from None
        return value
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if want is bool and not isinstance(value, bool):
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if want is int and (not isinstance(value, int) or isinstance(value, bool)):
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if want is float and not isinstance(value, float):
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if want is str and not isinstance(value, str):
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    return value


#: Keys holding tables of named entries ([network.bridges.br0]); merged per entry, last wins.
_TABLE_KEYS: dict[str, tuple[str, ...]] = {"network": ("bridges", "port_groups"), "storage": ("datastores",)}


def _field_types(cls: type) -> dict[str, type]:
    hints = {"str": str, "int": int, "float": float, "bool": bool}
    return {f.name: hints.get(f.type, dict) if isinstance(f.type, str) else f.type for f in dataclasses.fields(cls)}


def _merge(target: dict[str, dict[str, tuple[Any, str]]], data: Mapping[str, Any], origin: str) -> None:
    for section, values in data.items():
        if section not in _SECTION_TYPES:
            known = ", ".join(sorted(_SECTION_TYPES))
            raise ConfigError(f"unknown section [{section}] in {origin} (known: {known})")
        if not isinstance(values, Mapping):
            raise ConfigError(f"[{section}] in {origin} must be a table")
        types = _field_types(_SECTION_TYPES[section])
        for key, value in values.items():
            if key not in types:
                known = ", ".join(sorted(types))
                raise ConfigError(f"unknown key {section}.{key} in {origin} (known: {known})")
            if key in _TABLE_KEYS.get(section, ()):
                if not isinstance(value, Mapping):
                    raise ConfigError(f"{section}.{key} in {origin} must be tables like [{section}.{key}.NAME]")
                entries, _ = target.setdefault(section, {}).get(key, ({}, origin))
                for name, entry in value.items():
                    if not isinstance(entry, Mapping):
                        raise ConfigError(f"{section}.{key}.{name} in {origin} must be a table")
                    entries = {**entries, name: (dict(entry), origin)}
                target[section][key] = (entries, origin)
                continue
            target.setdefault(section, {})[key] = (_coerce(section, key, types[key], value, origin), origin)


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None


def _env_overrides(environ: Mapping[str, str]) -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = {}
    for name, value in environ.items():
        if not name.startswith(ENV_PREFIX):
            continue
        rest = name[len(ENV_PREFIX):].lower()
        section, _, key = rest.partition("_")
        if section in _SECTION_TYPES and key:
            out.setdefault(section, {})[key] = value
    return out


def load_config(
    path: str | os.PathLike[str] | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    require_file: bool | None = None,
) -> AgentConfig:
    """Load, merge and validate the configuration.

    ``require_file`` defaults to True when a path was given explicitly: an admin who passes
    ``--config`` and mistypes it should hear so, while a missing default file just means
    "all defaults".
    """
    environ = os.environ if environ is None else environ
    explicit = path is not None
    cfg_path = Path(path) if path is not None else DEFAULT_CONFIG_PATH
    require = explicit if require_file is None else require_file
    merged: dict[str, dict[str, tuple[Any, str]]] = {}
    sources: list[str] = []
    if cfg_path.exists():
        _merge(merged, _read_toml(cfg_path), str(cfg_path))
        sources.append(str(cfg_path))
    elif require:
        raise ConfigError(f"{cfg_path}: config file does not exist")
    dropin_dir = Path(str(cfg_path) + ".d")
    if dropin_dir.is_dir():
        for dropin in sorted(dropin_dir.glob("*.toml")):
            _merge(merged, _read_toml(dropin), str(dropin))
            sources.append(str(dropin))
    for section, values in _env_overrides(environ).items():
        types = _field_types(_SECTION_TYPES[section])
        for key, value in values.items():
            origin = f"env {ENV_PREFIX}{section.upper()}_{key.upper()}"
            if key not in types:
                raise ConfigError(f"unknown key {section}.{key} in {origin}")
            if key in _TABLE_KEYS.get(section, ()):
                raise ConfigError(f"{section}.{key} in {origin}: declared networks and datastores are tables in agent.toml, not environment variables")
            merged.setdefault(section, {})[key] = (_coerce(section, key, types[key], value, origin), origin)
    network_tables = {k: merged.get("network", {}).pop(k, ({}, ""))[0] for k in _TABLE_KEYS["network"]}
    datastore_tables = merged.get("storage", {}).pop("datastores", ({}, ""))[0]
    sections = {
        name: cls(**{k: v for k, (v, _) in merged.get(name, {}).items()}) for name, cls in _SECTION_TYPES.items()
    }
    sections["network"] = _network_declarations(sections["network"], network_tables)
    sections["storage"] = _datastore_declarations(sections["storage"], datastore_tables)
    config = AgentConfig(**sections, sources=tuple(sources))
    origins = {(s, k): o for s, vals in merged.items() for k, (_, o) in vals.items()}
    _validate(config, origins)
    return config


def _network_declarations(net: NetworkConfig, tables: Mapping[str, Mapping[str, tuple[dict[str, Any], str]]]) -> NetworkConfig:
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
            if want is model.BandwidthDecl:
                if not isinstance(value, Mapping) or set(value) - {"average_kbps", "peak_kbps", "burst_kib"}:
                    raise ConfigError(f"{where}: expected a table with average_kbps, peak_kbps, burst_kib")
                value = model.BandwidthDecl(**dict(value))
            elif want is tuple:
                if not isinstance(value, list):
                    raise ConfigError(f"{where}: expected a list, got {value!r}")
                value = tuple(value)
            else:
                value = _coerce("network", f"{kind}.{name}.{key}", want, value, origin)
            out[key] = value
        return out

    bridge_keys = {"type": str, "uplink": str, "mtu": int, "addresses": tuple, "datapath_type": str, "fail_mode": str}
    pg_keys = {"bridge": str, "vlan": int, "trunk_vlans": tuple, "inbound": model.BandwidthDecl,
               "outbound": model.BandwidthDecl, "mac_anti_spoofing": bool, "ip_anti_spoofing": bool}
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


def _datastore_declarations(cfg: StorageConfig, tables: Mapping[str, tuple[dict[str, Any], str]]) -> StorageConfig:
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
                value = _coerce("storage", f"datastores.{name}.{key}", allowed[key], value, origin)
            kwargs[key] = value
        decls.append(model.DatastoreDecl(name=name, **kwargs))
    try:
        out = model.validate_all(decls, "storage.datastores")
    except InvalidArgument as exc:
        origin = next((o for n, o in origins.items() if exc.field == f"storage.datastores.{n}"
                       or exc.field.startswith(f"storage.datastores.{n}.")), "defaults")
        raise ConfigError(f"{exc.message} (from {origin})") from None
    return dataclasses.replace(cfg, datastores=tuple(out.values()))


def parse_host_port(value: str) -> tuple[str, int]:
    """Split "host:port" / "[v6]:port"; raises ValueError with a reason."""
    if value.startswith("["):
        host, sep, port = value[1:].partition("]:")
        if not sep:
            raise ValueError("expected [address]:port")
    else:
        host, sep, port = value.rpartition(":")
        if not sep:
            raise ValueError("expected host:port")
    if not host:
        raise ValueError("missing host (use 0.0.0.0 or [::] to listen everywhere)")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"port {port!r} is not in 1..65535")
    return host, int(port)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _validate_vrm(vrm: VrmConfig, fail) -> None:
    for key in ("address", "endpoint"):
        value = getattr(vrm, key)
        if value:
            try:
                host, _ = parse_host_port(value)
            except ValueError as exc:
                fail("vrm", key, f"{value!r}: {exc}")
            if key == "address" and not (vrm.cert or vrm.ca) and not is_loopback(host) and not vrm.allow_insecure:
                fail("vrm", "address", f"{value!r} is not a loopback address and TLS is not configured; "
                     "set vrm.ca (and vrm.cert/vrm.key for mutual TLS), or vrm.allow_insecure = true")
    if bool(vrm.cert) != bool(vrm.key):
        present, missing = ("cert", "key") if vrm.cert else ("key", "cert")
        fail("vrm", present, f"vrm.{missing} is missing: vrm.cert and vrm.key must be set together")
    for key in ("cert", "key", "ca"):
        value = getattr(vrm, key)
        if value and not os.path.isabs(value):
            fail("vrm", key, f"{value!r} must be an absolute path")
    if vrm.host_uuid:
        import uuid as _uuid

        try:
            _uuid.UUID(vrm.host_uuid)
        except ValueError:
            fail("vrm", "host_uuid", f"{vrm.host_uuid!r} is not a UUID")
    for key in ("heartbeat_interval_s", "backoff_min_s", "backoff_max_s"):
        if getattr(vrm, key) <= 0:
            fail("vrm", key, "must be greater than 0")
    if vrm.backoff_max_s < vrm.backoff_min_s:
        fail("vrm", "backoff_max_s", f"{vrm.backoff_max_s} is below vrm.backoff_min_s ({vrm.backoff_min_s})")
    if not 1 <= vrm.batch_size <= 10_000:
        fail("vrm", "batch_size", f"{vrm.batch_size} is not in 1..10000")


def _validate(cfg: AgentConfig, origins: Mapping[tuple[str, str], str]) -> None:
    def fail(section: str, key: str, why: str) -> None:
        origin = origins.get((section, key), "defaults")
        raise ConfigError(f"{section}.{key} (from {origin}): {why}")

    if cfg.grpc.listen:
        try:
            host, _ = parse_host_port(cfg.grpc.listen)
        except ValueError as exc:
            fail("grpc", "listen", f"{cfg.grpc.listen!r}: {exc}")
        if not cfg.tls.enabled and not is_loopback(host) and not cfg.grpc.allow_insecure_tcp:
            fail(
                "grpc",
                "listen",
                f"{cfg.grpc.listen!r} is not a loopback address and TLS is not configured; "
                "set [tls] cert/key/ca, or grpc.allow_insecure_tcp = true to accept plaintext",
            )
    if not cfg.grpc.unix_socket and not cfg.grpc.listen:
        fail("grpc", "unix_socket", "both grpc.listen and grpc.unix_socket are empty: nothing to serve")
    for key in ("unix_socket",):
        val = getattr(cfg.grpc, key)
        if val and not os.path.isabs(val):
            fail("grpc", key, f"{val!r} must be an absolute path")
    if bool(cfg.tls.cert) != bool(cfg.tls.key):
        present, missing = ("cert", "key") if cfg.tls.cert else ("key", "cert")
        fail("tls", present, f"tls.{missing} is missing: tls.cert and tls.key must be set together")
    if cfg.tls.ca and not cfg.tls.enabled:
        fail("tls", "ca", "tls.ca needs tls.cert and tls.key")
    for key in ("cert", "key", "ca"):
        val = getattr(cfg.tls, key)
        if val and not os.path.isabs(val):
            fail("tls", key, f"{val!r} must be an absolute path")
    for key in ("dir", "run_dir", "qmp_fallback_dir"):
        val = getattr(cfg.state, key)
        if not os.path.isabs(val):
            fail("state", key, f"{val!r} must be an absolute path")
    if cfg.libvirt.virt_type not in ("auto", "kvm", "qemu"):
        fail("libvirt", "virt_type", f"{cfg.libvirt.virt_type!r} is not one of auto, kvm, qemu")
    for section, key, minimum in (
        ("grpc", "max_concurrent_streams", 1),
        ("grpc", "max_message_mib", 1),
        ("libvirt", "executor_threads", 1),
        ("storage", "executor_threads", 1),
        ("state", "event_retention", 100),
    ):
        val = getattr(getattr(cfg, section), key)
        if val < minimum:
            fail(section, key, f"{val} is below the minimum {minimum}")
    for section, key in (
        ("grpc", "keepalive_time_s"),
        ("grpc", "keepalive_timeout_s"),
        ("grpc", "min_ping_interval_s"),
        ("libvirt", "keepalive_interval_s"),
        ("libvirt", "reconnect_max_backoff_s"),
        ("libvirt", "call_timeout_s"),
        ("storage", "command_timeout_s"),
        ("storage", "probe_interval_s"),
        ("storage", "probe_timeout_s"),
        ("state", "operation_retention_days"),
    ):
        if getattr(getattr(cfg, section), key) <= 0:
            fail(section, key, "must be greater than 0")
    if cfg.log.level.lower() not in ("debug", "info", "warning", "error", "critical"):
        fail("log", "level", f"{cfg.log.level!r} is not one of debug, info, warning, error, critical")
    if cfg.log.format not in ("text", "json"):
        fail("log", "format", f"{cfg.log.format!r} is not one of text, json")
    if cfg.metrics.listen:
        try:
            host, _ = parse_host_port(cfg.metrics.listen)
        except ValueError as exc:
            fail("metrics", "listen", f"{cfg.metrics.listen!r}: {exc}")
        if not is_loopback(host) and not cfg.metrics.allow_remote:
            fail("metrics", "listen", f"{cfg.metrics.listen!r} is not a loopback address; metrics name VMs, "
                 "set metrics.allow_remote = true to serve them beyond this host")
    if cfg.stats.interval_s < 1:
        fail("stats", "interval_s", f"{cfg.stats.interval_s} is below the minimum 1")
    groups = [g.strip() for g in cfg.stats.vm_stats.split(",") if g.strip()]
    for group in groups:
        if group not in VM_STATS_GROUPS:
            fail("stats", "vm_stats", f"{group!r} is not one of {', '.join(VM_STATS_GROUPS)}")
    _validate_vrm(cfg.vrm, fail)
    if cfg.host.reserved_cpus:
        from cna_agent.host.cpulist import parse_cpulist

        try:
            parse_cpulist(cfg.host.reserved_cpus)
        except ValueError as exc:
            fail("host", "reserved_cpus", str(exc))
    for image_dir in filter(None, (d.strip() for d in cfg.compute.image_dirs.split(","))):
        if not os.path.isabs(image_dir):
            fail("compute", "image_dirs", f"{image_dir!r} must be an absolute path")
    if cfg.compute.io_error_resume not in ("auto", "manual"):
        fail("compute", "io_error_resume", f"{cfg.compute.io_error_resume!r} is not one of auto, manual")
    if cfg.compute.io_error_check_interval_s <= 0:
        fail("compute", "io_error_check_interval_s", "must be greater than 0")
    if not cfg.network.ovsdb.startswith(("unix:/", "tcp:", "ssl:")):
        fail("network", "ovsdb", f"{cfg.network.ovsdb!r} is not an OVSDB remote (unix:/PATH, tcp:HOST:PORT or ssl:HOST:PORT)")
    if cfg.network.ovsdb_timeout_s <= 0:
        fail("network", "ovsdb_timeout_s", "must be greater than 0")
    if cfg.network.netlink_threads < 1:
        fail("network", "netlink_threads", f"{cfg.network.netlink_threads} is below the minimum 1")
    if cfg.network.reconcile_interval_s < 0:
        fail("network", "reconcile_interval_s", "must be 0 (off) or greater")
    if cfg.host.placement_check_interval_s < 0:
        fail("host", "placement_check_interval_s", "must be 0 (off) or a positive number of seconds")
    try:
        ipaddress.ip_address(cfg.host.console_listen)
    except ValueError:
        fail("host", "console_listen", f"{cfg.host.console_listen!r} is not an IP address")
