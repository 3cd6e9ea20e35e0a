"""Validating a merged config: the cross-field and range checks, each error naming its source.

Separate from loading because these rules look at the finished AgentConfig (listeners need
TLS unless on loopback, cert and key come together, paths are absolute, intervals positive)
whatever the values' sources were; loading passes in where each key came from so an error
still says "(from /etc/cna-agent/agent.toml.d/10-tls.toml)" or "(from defaults)".
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping

from cna_agent.config.sections import (
    VM_STATS_GROUPS,
    AgentConfig,
    ConfigError,
    VrmConfig,
)

__all__ = ["is_loopback", "parse_host_port", "validate"]


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


def validate_vrm(vrm: VrmConfig, fail) -> None:
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


def validate(cfg: AgentConfig, origins: Mapping[tuple[str, str], str]) -> None:
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
    if cfg.log.target not in ("auto", "stderr", "journal"):
        fail("log", "target", f"{cfg.log.target!r} is not one of auto, stderr, journal")
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
    if cfg.stats.vm_sources not in ("host", "libvirt"):
        fail("stats", "vm_sources", f"{cfg.stats.vm_sources!r} is not one of host, libvirt")
    validate_vrm(cfg.vrm, fail)
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
    mig = cfg.migration
    if mig.libvirt_uri and not re.match(r"^qemu(\+(tls|tcp|ssh|libssh2?))?://[^\s/]*/system(\?[^\s]*)?$", mig.libvirt_uri):
        fail("migration", "libvirt_uri", f"{mig.libvirt_uri!r} is not a qemu://, qemu+tls:// or qemu+tcp://HOST/system URI")
    if mig.migrate_host and not re.match(r"^[A-Za-z0-9.:\[\]-]{1,255}$", mig.migrate_host):
        fail("migration", "migrate_host", f"{mig.migrate_host!r} is not a host or host:port")
    for key in ("max_outgoing", "max_incoming"):
        if not 1 <= getattr(mig, key) <= 16:
            fail("migration", key, f"{getattr(mig, key)} is not between 1 and 16")
    if not 30 <= mig.prepare_ttl_s <= 86400:
        fail("migration", "prepare_ttl_s", f"{mig.prepare_ttl_s} is not between 30 and 86400")
    if not 0 <= cfg.compute.hotplug_slots <= 32:
        fail("compute", "hotplug_slots", f"{cfg.compute.hotplug_slots} is not between 0 and 32")
    if cfg.compute.io_error_check_interval_s <= 0:
        fail("compute", "io_error_check_interval_s", "must be greater than 0")
    if not 1 <= cfg.compute.recycle_sweep_interval_s <= 86400:
        fail("compute", "recycle_sweep_interval_s", f"{cfg.compute.recycle_sweep_interval_s} is not between 1 and 86400")
    if not 1 <= cfg.compute.hibernation_check_interval_s <= 86400:
        fail("compute", "hibernation_check_interval_s",
             f"{cfg.compute.hibernation_check_interval_s} is not between 1 and 86400")
    if not 1 <= cfg.compute.shutdown_guest_agent_after_s <= 3600:
        fail("compute", "shutdown_guest_agent_after_s", f"{cfg.compute.shutdown_guest_agent_after_s} is not between 1 and 3600")
    if not 1 <= cfg.compute.guest_info_min_interval_s <= 3600:
        fail("compute", "guest_info_min_interval_s", f"{cfg.compute.guest_info_min_interval_s} is not between 1 and 3600")
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
