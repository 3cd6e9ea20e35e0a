"""The config's schema: one frozen dataclass per TOML section, with every option's default.

Separate from loading and validation because this is what the rest of the agent imports:
services receive these typed sections from the wiring and read fields, and never need to
know how files, drop-ins and environment variables were merged into them. Every option has
a default here, so an empty file is a valid configuration.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from cna_agent.config.toml_render import render_toml

__all__ = [
    "SECTION_TYPES",
    "TABLE_KEYS",
    "VM_STATS_GROUPS",
    "AgentConfig",
    "ComputeConfig",
    "ConfigError",
    "GrpcConfig",
    "HostConfig",
    "LibvirtConfig",
    "LogConfig",
    "MetricsConfig",
    "NetworkConfig",
    "StateConfig",
    "StatsConfig",
    "StorageConfig",
    "TlsConfig",
    "VrmConfig",
]


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
    #: Seconds between sweeps of the recycle bin for VMs whose hold is up (DeleteVm hold_time_s).
    recycle_sweep_interval_s: float = 60.0
    #: Seconds between checks of this host's hibernated VMs for a resume on another host (whose
    #: definition here is then removed); also checked at start-up.
    hibernation_check_interval_s: float = 30.0
    #: A VM's guest agent is read (GetGuestInfo, and once after it connects) at most once in
    #: this many seconds; a caller asking more often gets the last read (compute/guest_agent.py).
    guest_info_min_interval_s: float = 10.0
    #: A graceful ShutdownVm presses the ACPI button for this long (or half its timeout) before
    #: it asks the VM's guest agent too, for guests that ignore the button (compute/shutdown.py).
    shutdown_guest_agent_after_s: float = 20.0
    #: Empty PCIe root ports every q35/aarch64 VM keeps for hot-plugging disks and NICs, unless
    #: its spec sets hotplug_slots (0-32). Each costs QEMU one device and a PCI bus number.
    hotplug_slots: int = 4


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
    #: "auto": journald entries with fields (PRIORITY, CNA_EVENT, CNA_VM, ...) when systemd
    #: connected stderr to the journal, else lines on stderr; "stderr" or "journal" to choose.
    target: str = "auto"


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
    #: Where VM figures come from: "host" = each from its cheapest correct source (/proc for
    #: CPU, vCPUs, RSS and NICs; the agent's QMP side channel for disks and guest memory, only
    #: from guests that ran), libvirt's calls for VMs that cannot be read so; "libvirt" = one
    #: virConnectGetAllDomainStats for everything (a monitor round trip per VM and group).
    vm_sources: str = "host"


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
class MigrationConfig:
    """Live migration between agents (compute/migration.py, compute/migration_incoming.py).

    The source agent calls the destination agent's MigrationService with the agent's own
    mutual-TLS identity ([vrm] cert, key and CA); libvirt's peer-to-peer job then runs between
    the two hosts' libvirt daemons.
    """

    #: This host's libvirt as the SOURCE's libvirtd dials it, e.g. "qemu+tls://node2.example/system";
    #: empty = this host takes no incoming migrations (PrepareIncoming refuses, naming this key).
    libvirt_uri: str = ""
    #: Address (host or host:port) of this host's migration network for QEMU's stream;
    #: empty = libvirt's choice (the host name).
    migrate_host: str = ""
    #: At most this many outgoing and incoming migrations at once; more are refused as busy
    #: (retryable), not failed.
    max_outgoing: int = 2
    max_incoming: int = 2
    #: A prepared incoming migration neither finished nor aborted within this is aborted here.
    prepare_ttl_s: int = 600


#: The TOML sections, by name, and the dataclass each one fills.
SECTION_TYPES: dict[str, type] = {
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
    "migration": MigrationConfig,
}

#: Keys holding tables of named entries ([network.bridges.br0]); merged per entry, last wins.
TABLE_KEYS: dict[str, tuple[str, ...]] = {"network": ("bridges", "port_groups"), "storage": ("datastores",)}


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
    migration: MigrationConfig = field(default_factory=MigrationConfig)
    #: Files that were read, in order (for check-config and the start-up log line).
    sources: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data.pop("sources")
        # Declared networks as TOML shows them: tables keyed by name.
        for section, keys in TABLE_KEYS.items():
            for key in keys:
                data[section][key] = {
                    item["name"]: {k: (list(v) if isinstance(v, tuple) else v) for k, v in item.items() if k not in ("name", "source")}
                    for item in data[section][key]
                }
        return data

    def to_toml(self) -> str:
        """The effective config as TOML (what ``check-config`` prints)."""
        return render_toml(self.to_dict())
