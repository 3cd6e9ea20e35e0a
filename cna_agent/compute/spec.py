"""The VM spec: plain dataclasses mirroring proto ``cna.v1.VmSpec``, and its one validator.

Why a separate model: the servicer converts proto -> spec, the CLI and tests build specs
directly, and the spec is what the agent stores in the domain's ``<metadata>`` (as JSON), so
a VM carries the manager's intent with it across agent restarts. Enums are short lowercase
strings ("uefi", "windows"); "" means "the default for this arch/OS family".

``validate()`` is the single place where caller input is checked. It raises
``InvalidArgument("spec.<field path>", reason)`` and runs before anything touches libvirt,
so a bad spec changes nothing on the host.
"""

from __future__ import annotations

import dataclasses
import json
import re
import uuid as uuidlib
from dataclasses import dataclass, field
from typing import Any, Mapping

from cna_agent.contracts import Bandwidth, check_bandwidth
from cna_agent.errors import InvalidArgument

ARCHES = ("x86_64", "aarch64")
FIRMWARES = ("", "bios", "uefi")
OS_FAMILIES = ("", "linux", "windows", "euler")
CPU_MODES = ("", "host-passthrough", "host-model", "custom")
DISK_BUSES = ("", "virtio", "scsi", "sata", "ide")
DISK_DEVICES = ("", "disk", "cdrom", "lun")
DISK_CACHES = ("", "none", "writethrough", "writeback", "directsync", "unsafe")
DISK_IO_MODES = ("", "native", "threads", "io_uring")
DISK_ERROR_POLICIES = ("", "stop", "report", "ignore", "enospace", "retry")
NIC_MODELS = ("", "virtio", "e1000e", "e1000", "rtl8139")
CONSOLE_TYPES = ("", "vnc", "spice", "none")

NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,63}$")
UUID_RE = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
MAC_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
TARGET_RE = re.compile(r"^(vd|sd|hd)[a-z]{1,2}$")
MACHINE_RE = {
    "x86_64": re.compile(r"^(pc|q35|pc-q35-[0-9.]+|pc-i440fx-[0-9.]+)$"),
    "aarch64": re.compile(r"^virt(-[0-9.]+)?$"),
}
CPU_MODEL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
KEYMAP_RE = re.compile(r"^[a-z]{2}(-[a-z]{2,3})?$")
LABEL_KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,62}$")
#: A disk serial: a name (not starting with '.' or '-', so never "-rf", "--help", "." or "..").
SERIAL_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,19}$")
#: The smallest I/O limits (0 = none): below these a guest's disk is as good as frozen.
MIN_QOS_BYTES_SEC = 1 << 20
MIN_QOS_IOPS_SEC = 10
MAX_QOS = 1 << 50

MIN_MEMORY_MIB = 16
MAX_MEMORY_MIB = 16 * 1024 * 1024  # 16 TiB: beyond any host this agent runs on
MAX_DISKS = 64
MAX_NICS = 32
MAX_NUMA_CELLS = 64
MAX_LABELS = 64
#: Spare PCIe root ports a spec may ask for (each a QEMU device and a PCI bus number).
MAX_HOTPLUG_SLOTS = 32


def machine_max_vcpus(arch: str, machine: str) -> int:
    """QEMU's vCPU ceiling per machine family (pc: 255, q35: 288, aarch64 virt+GICv3: 512)."""
    if arch == "aarch64":
        return 512
    if machine == "pc" or machine.startswith("pc-i440fx"):
        return 255
    return 288


@dataclass
class CpuTopology:
    sockets: int = 0
    dies: int = 0
    clusters: int = 0
    cores: int = 0
    threads: int = 0

    def is_set(self) -> bool:
        return any((self.sockets, self.dies, self.clusters, self.cores, self.threads))


@dataclass
class CpuQos:
    shares: int = 0
    limit_mhz: int = 0
    reservation_mhz: int = 0


@dataclass
class MemoryQos:
    limit_mib: int = 0
    reservation_mib: int = 0
    shares: int = 0


#: What the agent does with a VM a storage error paused (io_resume.py); "" = the host's default.
STORAGE_ERROR_ACTIONS = ("resume", "pause", "poweroff")
#: VDSM's default for its "kill" resume behaviour: 8 x the 10 s I/O timeout.
DEFAULT_POWEROFF_AFTER_S = 80


@dataclass
class StorageErrorPolicy:
    action: str = ""
    poweroff_after_s: int = 0

    def effective_poweroff_after_s(self) -> int:
        return self.poweroff_after_s or DEFAULT_POWEROFF_AFTER_S


@dataclass
class IoQos:
    read_bytes_sec: int = 0
    write_bytes_sec: int = 0
    total_bytes_sec: int = 0
    read_iops_sec: int = 0
    write_iops_sec: int = 0
    total_iops_sec: int = 0

    def is_set(self) -> bool:
        return any(dataclasses.astuple(self))


@dataclass
class LunSource:
    datastore: str = ""
    lun_id: str = ""


@dataclass
class DiskSpec:
    target: str = ""
    device: str = ""
    bus: str = ""
    #: Source: a datastore volume ("ds/rel/path", or an absolute path under compute.image_dirs
    #: with the built-in resolver) or a SAN LUN.
    volume: str = ""
    lun: LunSource | None = None
    format: str = ""
    readonly: bool = False
    shareable: bool = False
    cache: str = ""
    io: str = ""
    error_policy: str = ""
    boot_order: int = 0
    qos: IoQos = field(default_factory=IoQos)
    serial: str = ""


@dataclass
class NicSpec:
    port_group: str = ""
    mac: str = ""
    model: str = ""
    link_down: bool = False
    boot_order: int = 0
    inbound: Bandwidth | None = None
    outbound: Bandwidth | None = None
    interface_id: str = ""
    queues: int = 0
    #: Addresses the guest may send from on this NIC (IPv4/IPv6, no prefix); enforced when the
    #: port group has ip_anti_spoofing (anything else is dropped).
    ip_addresses: list[str] = field(default_factory=list)


@dataclass
class ConsoleSpec:
    type: str = ""
    password: str = ""
    listen: str = ""
    keymap: str = ""


@dataclass
class BootSpec:
    kernel: str = ""
    initrd: str = ""
    cmdline: str = ""


@dataclass
class VmSpec:
    name: str = ""
    uuid: str = ""
    description: str = ""
    arch: str = ""
    machine_type: str = ""
    firmware: str = ""
    secure_boot: bool = False
    os_family: str = ""
    virtio_drivers: bool = False
    vcpus: int = 0
    max_vcpus: int = 0
    cpu_topology: CpuTopology = field(default_factory=CpuTopology)
    cpu_mode: str = ""
    cpu_model: str = ""
    memory_mib: int = 0
    max_memory_mib: int = 0
    balloon: bool = False
    cpu_qos: CpuQos = field(default_factory=CpuQos)
    memory_qos: MemoryQos = field(default_factory=MemoryQos)
    disks: list[DiskSpec] = field(default_factory=list)
    nics: list[NicSpec] = field(default_factory=list)
    console: ConsoleSpec = field(default_factory=ConsoleSpec)
    serial_console: bool = False
    guest_agent: bool = False
    watchdog: bool = False
    panic_device: bool = False
    boot: BootSpec = field(default_factory=BootSpec)
    numa_cells: int = 0
    labels: dict[str, str] = field(default_factory=dict)
    autostart: bool = False
    dedicated_cpus: bool = False
    #: Empty PCIe root ports kept for hot-plug (q35/virt); -1: the host's default
    #: (``[compute] hotplug_slots``). Each costs a QEMU device and a PCI bus number.
    hotplug_slots: int = -1
    hugepages: bool = False
    storage_errors: StorageErrorPolicy = field(default_factory=StorageErrorPolicy)
    #: An emulated TPM 2.0 (swtpm); its state is libvirt's, kept across restarts (render.py).
    tpm: bool = False

    # -- serialisation (the form stored in the domain metadata) -----------------------------

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "VmSpec":
        return _from_dict(cls, data)

    @classmethod
    def from_json(cls, text: str) -> "VmSpec":
        return cls.from_dict(json.loads(text))

    def copy(self) -> "VmSpec":
        return VmSpec.from_dict(self.to_dict())

    @property
    def effective_max_vcpus(self) -> int:
        return self.max_vcpus or self.vcpus


_NESTED: dict[tuple[type, str], type] = {
    (VmSpec, "cpu_topology"): CpuTopology,
    (VmSpec, "cpu_qos"): CpuQos,
    (VmSpec, "memory_qos"): MemoryQos,
    (VmSpec, "console"): ConsoleSpec,
    (VmSpec, "boot"): BootSpec,
    (VmSpec, "storage_errors"): StorageErrorPolicy,
    (DiskSpec, "qos"): IoQos,
    (DiskSpec, "lun"): LunSource,
    (NicSpec, "inbound"): Bandwidth,
    (NicSpec, "outbound"): Bandwidth,
}
_LISTS: dict[tuple[type, str], type] = {(VmSpec, "disks"): DiskSpec, (VmSpec, "nics"): NicSpec}


def _from_dict(cls: type, data: Mapping[str, Any]) -> Any:
    """Build a dataclass from a dict, ignoring unknown keys (specs written by newer agents)."""
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        value = data[f.name]
        nested = _NESTED.get((cls, f.name))
        item = _LISTS.get((cls, f.name))
        if nested is not None and value is not None:
            value = _from_dict(nested, value)
        elif item is not None:
            value = [_from_dict(item, v) for v in value or ()]
        elif f.name == "labels":
            value = dict(value or {})
        kwargs[f.name] = value
    return cls(**kwargs)


# -- validation ----------------------------------------------------------------------------


def check_mac(mac: str, field: str) -> str:
    """A unicast MAC address, lower-cased; InvalidArgument naming ``field`` otherwise."""
    low = mac.lower()
    if not MAC_RE.match(low):
        raise InvalidArgument(field, f"{mac!r} is not a MAC address like 52:54:00:12:34:56")
    if int(low[:2], 16) & 1:
        raise InvalidArgument(field, f"{mac!r} is a multicast address")
    if low == "00:00:00:00:00:00":
        raise InvalidArgument(field, "the all-zero MAC address is not usable")
    return low


@dataclass(frozen=True)
class ValidationContext:
    """What validation needs to know about the host, without asking libvirt."""

    host_arch: str = "x86_64"
    virt_type: str = "qemu"
    #: Host logical CPUs: under KVM a guest may not have more vCPUs than this.
    host_cpus: int = 0
    #: Whether a placement planner is available (dedicated CPUs, hugepages need one).
    have_placer: bool = False
    #: Whether swtpm is installed (spec.tpm needs it).
    tpm_emulator: bool = True
    #: Architectures with a Secure Boot UEFI build with enrolled keys (QEMU's firmware
    #: descriptors); None: not known, not checked.
    secure_boot_arches: frozenset[str] | None = None


def _enum(value: str, allowed: tuple[str, ...], path: str) -> None:
    if value not in allowed:
        choices = ", ".join(a for a in allowed if a) or "none"
        raise InvalidArgument(path, f"unknown value {value!r} (expected one of: {choices})")


def _text(value: str, path: str, *, max_len: int, pattern: re.Pattern[str] | None = None, what: str = "") -> None:
    if len(value) > max_len:
        raise InvalidArgument(path, f"longer than {max_len} characters")
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise InvalidArgument(path, "contains control characters")
    if pattern is not None and value and not pattern.match(value):
        raise InvalidArgument(path, f"{value!r} is not {what or 'valid'}")


#: Addresses one NIC may declare for IP anti-spoofing.
MAX_NIC_ADDRESSES = 16


def _nic_addresses(nic: NicSpec, p: str) -> None:
    import ipaddress

    if len(nic.ip_addresses) > MAX_NIC_ADDRESSES:
        raise InvalidArgument(f"{p}.ip_addresses", f"at most {MAX_NIC_ADDRESSES} addresses")
    seen: set[str] = set()
    for j, a in enumerate(nic.ip_addresses):
        try:
            ip = ipaddress.ip_address(a) if isinstance(a, str) else None
        except ValueError:
            ip = None
        if ip is None or ip.is_unspecified or ip.is_multicast:
            raise InvalidArgument(f"{p}.ip_addresses[{j}]", f"{a!r} is not a unicast IP address like 192.0.2.10 (no prefix)")
        if str(ip) in seen:
            raise InvalidArgument(f"{p}.ip_addresses[{j}]", f"{a!r} is listed twice")
        seen.add(str(ip))
    nic.ip_addresses = sorted(seen)


def _u(value: int, path: str, *, maximum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise InvalidArgument(path, f"{value!r} must be a non-negative integer")
    if value > maximum:
        raise InvalidArgument(path, f"{value} is larger than the maximum {maximum}")


def validate_name(name: str, path: str = "spec.name") -> None:
    """1..64 of [A-Za-z0-9._-], not starting with '.' or '-' (names become file names)."""
    if not name:
        raise InvalidArgument(path, "must not be empty")
    if not NAME_RE.match(name):
        raise InvalidArgument(path, f"{name!r} must be 1-64 characters of A-Z a-z 0-9 . _ - and must not start with '.' or '-'")


def check_io_qos(qos: IoQos, field: str) -> IoQos:
    """The one validator of a disk's I/O limits (VM specs and SetDiskQos): each 0 (no limit) or
    within its floor and MAX_QOS, and a total never combined with its read/write limits."""
    for key, value in dataclasses.asdict(qos).items():
        _u(value, f"{field}.{key}", maximum=MAX_QOS)
        floor = MIN_QOS_BYTES_SEC if key.endswith("bytes_sec") else MIN_QOS_IOPS_SEC
        if 0 < value < floor:
            raise InvalidArgument(f"{field}.{key}", f"{value} is below the smallest limit, {floor} (0 = none)")
    for kind in ("bytes", "iops"):
        total = getattr(qos, f"total_{kind}_sec")
        if total and (getattr(qos, f"read_{kind}_sec") or getattr(qos, f"write_{kind}_sec")):
            raise InvalidArgument(f"{field}.total_{kind}_sec", f"cannot be combined with read_{kind}_sec/write_{kind}_sec")
    return qos


def default_target_prefix(bus: str) -> str:
    return {"virtio": "vd", "scsi": "sd", "sata": "sd", "ide": "hd"}.get(bus, "vd")


def validate(spec: VmSpec, ctx: ValidationContext) -> None:
    """Check the whole spec; raise InvalidArgument naming the first bad field."""
    validate_name(spec.name)
    if spec.uuid and not UUID_RE.match(spec.uuid):
        raise InvalidArgument("spec.uuid", f"{spec.uuid!r} is not a UUID (8-4-4-4-12 hex digits)")
    _text(spec.description, "spec.description", max_len=1024)
    _enum(spec.arch, ("",) + ARCHES, "spec.arch")
    arch = spec.arch or ctx.host_arch
    if arch not in ARCHES:
        raise InvalidArgument("spec.arch", f"the host's arch {arch!r} is not supported; name x86_64 or aarch64")
    if spec.machine_type:
        _text(spec.machine_type, "spec.machine_type", max_len=32)
        if not MACHINE_RE[arch].match(spec.machine_type):
            allowed = "pc, q35 (or versioned pc-i440fx-X / pc-q35-X)" if arch == "x86_64" else "virt (or virt-X.Y)"
            raise InvalidArgument("spec.machine_type", f"{spec.machine_type!r} is not a machine type for {arch}; use {allowed}")
    machine = spec.machine_type or ("q35" if arch == "x86_64" else "virt")
    _enum(spec.firmware, FIRMWARES, "spec.firmware")
    _enum(spec.os_family, OS_FAMILIES, "spec.os_family")
    if arch == "aarch64":
        if spec.firmware == "bios":
            raise InvalidArgument("spec.firmware", "BIOS (SeaBIOS) exists only on x86_64; aarch64 guests use UEFI or direct kernel boot")
        if spec.os_family == "windows":
            raise InvalidArgument("spec.os_family", "Windows guests (Hyper-V enlightenments) are supported on x86_64 only")
    if spec.secure_boot and spec.firmware != "uefi" and not (arch == "aarch64" and not spec.firmware and not spec.boot.kernel):
        raise InvalidArgument("spec.secure_boot", "secure boot needs firmware UEFI")
    if spec.secure_boot and machine != "q35" and arch == "x86_64" and not machine.startswith("pc-q35"):
        raise InvalidArgument("spec.secure_boot", "secure boot on x86_64 needs machine type q35 (SMM)")
    if spec.secure_boot and ctx.secure_boot_arches is not None and arch not in ctx.secure_boot_arches:
        package = "ovmf (edk2-ovmf)" if arch == "x86_64" else "qemu-efi-aarch64 (edk2-aarch64)"
        raise InvalidArgument("spec.secure_boot", f"this host has no UEFI firmware for {arch} with Secure Boot and "
                                                  f"enrolled keys (install {package})")

    # CPUs
    max_vcpus = machine_max_vcpus(arch, machine)
    if ctx.virt_type == "kvm" and arch == ctx.host_arch and ctx.host_cpus:
        max_vcpus = min(max_vcpus, ctx.host_cpus * 8)  # overcommit, but not absurdly
    if spec.vcpus < 1:
        raise InvalidArgument("spec.vcpus", "must be at least 1")
    _u(spec.vcpus, "spec.vcpus", maximum=max_vcpus)
    _u(spec.max_vcpus, "spec.max_vcpus", maximum=max_vcpus)
    if spec.max_vcpus and spec.max_vcpus < spec.vcpus:
        raise InvalidArgument("spec.max_vcpus", f"{spec.max_vcpus} is below vcpus ({spec.vcpus})")
    topo = spec.cpu_topology
    for key in ("sockets", "dies", "clusters", "cores", "threads"):
        _u(getattr(topo, key), f"spec.cpu_topology.{key}", maximum=max_vcpus)
    if topo.is_set():
        if not (topo.sockets and topo.cores and topo.threads):
            raise InvalidArgument("spec.cpu_topology", "sockets, cores and threads must all be set (dies and clusters default to 1)")
        if topo.clusters > 1 and arch != "aarch64":
            raise InvalidArgument("spec.cpu_topology.clusters", "clusters exist only on aarch64")
        product = topo.sockets * (topo.dies or 1) * (topo.clusters or 1) * topo.cores * topo.threads
        if product != spec.effective_max_vcpus:
            raise InvalidArgument("spec.cpu_topology", f"sockets*dies*clusters*cores*threads = {product} must equal max_vcpus ({spec.effective_max_vcpus})")
    _enum(spec.cpu_mode, CPU_MODES, "spec.cpu_mode")
    _text(spec.cpu_model, "spec.cpu_model", max_len=64, pattern=CPU_MODEL_RE, what="a CPU model name")
    if spec.cpu_mode == "custom" and not spec.cpu_model:
        raise InvalidArgument("spec.cpu_model", "cpu_mode CUSTOM needs cpu_model")
    if spec.cpu_model and spec.cpu_mode not in ("", "custom"):
        raise InvalidArgument("spec.cpu_model", f"cpu_model is only used with cpu_mode CUSTOM, not {spec.cpu_mode}")
    domain_type = ctx.virt_type if arch == ctx.host_arch else "qemu"
    if spec.cpu_mode == "host-passthrough" and domain_type != "kvm":
        raise InvalidArgument("spec.cpu_mode", "host-passthrough needs KVM; this host runs the guest under TCG emulation")

    # memory
    if spec.memory_mib < MIN_MEMORY_MIB:
        raise InvalidArgument("spec.memory_mib", f"{spec.memory_mib} MiB is below the minimum {MIN_MEMORY_MIB} MiB")
    _u(spec.memory_mib, "spec.memory_mib", maximum=MAX_MEMORY_MIB)
    _u(spec.max_memory_mib, "spec.max_memory_mib", maximum=MAX_MEMORY_MIB)
    if spec.max_memory_mib and spec.max_memory_mib < spec.memory_mib:
        raise InvalidArgument("spec.max_memory_mib", f"{spec.max_memory_mib} is below memory_mib ({spec.memory_mib})")
    _u(spec.numa_cells, "spec.numa_cells", maximum=MAX_NUMA_CELLS)
    if spec.numa_cells > 1:
        if spec.numa_cells > spec.effective_max_vcpus:
            raise InvalidArgument("spec.numa_cells", f"{spec.numa_cells} cells need at least as many vCPUs (max_vcpus {spec.effective_max_vcpus})")
        if spec.memory_mib < spec.numa_cells * MIN_MEMORY_MIB:
            raise InvalidArgument("spec.numa_cells", f"{spec.numa_cells} cells need at least {MIN_MEMORY_MIB} MiB each")
    if spec.hotplug_slots != -1:
        _u(spec.hotplug_slots, "spec.hotplug_slots", maximum=MAX_HOTPLUG_SLOTS)
    if spec.dedicated_cpus and not ctx.have_placer:
        raise InvalidArgument("spec.dedicated_cpus", "no placement planner is available on this host yet")
    if spec.tpm and not ctx.tpm_emulator:
        raise InvalidArgument("spec.tpm", "this host has no TPM emulator (install swtpm and swtpm-tools)")

    # QoS
    _u(spec.cpu_qos.shares, "spec.cpu_qos.shares", maximum=262144)
    _u(spec.cpu_qos.limit_mhz, "spec.cpu_qos.limit_mhz", maximum=10_000_000)
    _u(spec.cpu_qos.reservation_mhz, "spec.cpu_qos.reservation_mhz", maximum=10_000_000)
    if spec.cpu_qos.limit_mhz and spec.cpu_qos.reservation_mhz > spec.cpu_qos.limit_mhz:
        raise InvalidArgument("spec.cpu_qos.reservation_mhz", "reservation exceeds the limit")
    _u(spec.memory_qos.limit_mib, "spec.memory_qos.limit_mib", maximum=MAX_MEMORY_MIB)
    _u(spec.memory_qos.reservation_mib, "spec.memory_qos.reservation_mib", maximum=MAX_MEMORY_MIB)
    if spec.storage_errors.action and spec.storage_errors.action not in STORAGE_ERROR_ACTIONS:
        raise InvalidArgument("spec.storage_errors.action",
                              f"{spec.storage_errors.action!r} is not one of {', '.join(STORAGE_ERROR_ACTIONS)} (or empty)")
    if spec.storage_errors.poweroff_after_s:
        _u(spec.storage_errors.poweroff_after_s, "spec.storage_errors.poweroff_after_s", maximum=86400)
        if spec.storage_errors.action != "poweroff":
            raise InvalidArgument("spec.storage_errors.poweroff_after_s", "only applies to action \"poweroff\"")
    _u(spec.memory_qos.shares, "spec.memory_qos.shares", maximum=262144)
    if spec.memory_qos.limit_mib and spec.memory_qos.limit_mib < spec.memory_mib:
        raise InvalidArgument("spec.memory_qos.limit_mib", f"{spec.memory_qos.limit_mib} MiB is below the guest's memory ({spec.memory_mib} MiB); QEMU would be OOM-killed")
    if spec.memory_qos.reservation_mib > (spec.max_memory_mib or spec.memory_mib):
        raise InvalidArgument("spec.memory_qos.reservation_mib", "reservation exceeds the guest's memory")

    # devices
    if len(spec.disks) > MAX_DISKS:
        raise InvalidArgument("spec.disks", f"at most {MAX_DISKS} disks")
    targets: dict[str, int] = {}
    sources: dict[str, int] = {}
    boot_orders: dict[int, str] = {}
    windows_legacy = spec.os_family == "windows" and not spec.virtio_drivers
    for i, disk in enumerate(spec.disks):
        p = f"spec.disks[{i}]"
        _enum(disk.device, DISK_DEVICES, f"{p}.device")
        _enum(disk.bus, DISK_BUSES, f"{p}.bus")
        _enum(disk.cache, DISK_CACHES, f"{p}.cache")
        _enum(disk.io, DISK_IO_MODES, f"{p}.io")
        _enum(disk.error_policy, DISK_ERROR_POLICIES, f"{p}.error_policy")
        if disk.format not in ("", "qcow2", "raw"):
            raise InvalidArgument(f"{p}.format", f"{disk.format!r} is not qcow2 or raw")
        if bool(disk.volume) == bool(disk.lun and (disk.lun.datastore or disk.lun.lun_id)):
            raise InvalidArgument(f"{p}.volume", "exactly one of volume or lun must be set")
        _text(disk.volume, f"{p}.volume", max_len=4096)
        if disk.lun is not None:
            _text(disk.lun.datastore, f"{p}.lun.datastore", max_len=64)
            _text(disk.lun.lun_id, f"{p}.lun.lun_id", max_len=256)
        if "\x00" in disk.volume or ".." in disk.volume.split("/"):
            raise InvalidArgument(f"{p}.volume", "must not contain '..' components or NUL")
        bus = disk.bus or ("sata" if windows_legacy else "virtio")
        if bus == "ide" and (arch == "aarch64" or machine == "q35" or machine.startswith("pc-q35")):
            raise InvalidArgument(f"{p}.bus", f"IDE does not exist on {arch} machine {machine}; use virtio, scsi or sata")
        if bus == "sata" and arch == "aarch64":
            raise InvalidArgument(f"{p}.bus", "SATA is an x86 controller here; aarch64 guests use virtio or scsi")
        if disk.device == "lun" and bus != "scsi":
            raise InvalidArgument(f"{p}.bus", "device LUN (SCSI passthrough) needs bus SCSI")
        if disk.target:
            if not TARGET_RE.match(disk.target):
                raise InvalidArgument(f"{p}.target", f"{disk.target!r} is not a guest device name like vda, sdb or hdc")
            if disk.target[:2] != default_target_prefix(bus):
                raise InvalidArgument(f"{p}.target", f"{disk.target!r} does not match bus {bus} (use {default_target_prefix(bus)}X)")
            if disk.target in targets:
                raise InvalidArgument(f"{p}.target", f"{disk.target!r} is also used by spec.disks[{targets[disk.target]}]")
            targets[disk.target] = i
        _u(disk.boot_order, f"{p}.boot_order", maximum=1000)
        if disk.boot_order:
            if disk.boot_order in boot_orders:
                raise InvalidArgument(f"{p}.boot_order", f"{disk.boot_order} is also used by {boot_orders[disk.boot_order]}")
            boot_orders[disk.boot_order] = p
        _text(disk.serial, f"{p}.serial", max_len=20, pattern=SERIAL_RE,
              what="a disk serial (A-Z a-z 0-9 . _ -, at most 20, not starting with '.' or '-')")
        check_io_qos(disk.qos, f"{p}.qos")
        source = disk.volume or (f"{disk.lun.datastore}:{disk.lun.lun_id}" if disk.lun else "")
        if source in sources:
            what = "volume" if disk.volume else "lun"
            raise InvalidArgument(f"{p}.{what}", f"{source!r} is also used by spec.disks[{sources[source]}] "
                                                 "(a VM has each volume or LUN once)")
        sources[source] = i
        if disk.io == "native" and disk.cache not in ("", "none", "directsync"):
            raise InvalidArgument(f"{p}.io", "io NATIVE needs cache NONE or DIRECTSYNC (O_DIRECT)")
        if disk.error_policy == "retry":
            raise InvalidArgument(f"{p}.error_policy", "RETRY is only offered by openEuler's libvirt, not this host's")
    if len(spec.nics) > MAX_NICS:
        raise InvalidArgument("spec.nics", f"at most {MAX_NICS} NICs")
    macs: dict[str, int] = {}
    for i, nic in enumerate(spec.nics):
        p = f"spec.nics[{i}]"
        if not nic.port_group:
            raise InvalidArgument(f"{p}.port_group", "must name a port group")
        _text(nic.port_group, f"{p}.port_group", max_len=64, pattern=NAME_RE, what="a port group name")
        if nic.mac:
            mac = check_mac(nic.mac, f"{p}.mac")
            if mac in macs:
                raise InvalidArgument(f"{p}.mac", f"{nic.mac!r} is also used by spec.nics[{macs[mac]}]")
            macs[mac] = i
        _enum(nic.model, NIC_MODELS, f"{p}.model")
        if arch == "aarch64" and nic.model in ("e1000", "rtl8139"):
            raise InvalidArgument(f"{p}.model", f"{nic.model} is an x86 legacy NIC; aarch64 guests use virtio or e1000e")
        _u(nic.boot_order, f"{p}.boot_order", maximum=1000)
        if nic.boot_order:
            if nic.boot_order in boot_orders:
                raise InvalidArgument(f"{p}.boot_order", f"{nic.boot_order} is also used by {boot_orders[nic.boot_order]}")
            boot_orders[nic.boot_order] = p
        _u(nic.queues, f"{p}.queues", maximum=256)
        _text(nic.interface_id, f"{p}.interface_id", max_len=36, pattern=UUID_RE, what="a UUID (libvirt's virtualport interfaceid)")
        _nic_addresses(nic, p)
        for direction in ("inbound", "outbound"):
            bw = getattr(nic, direction)
            if bw is not None:
                check_bandwidth(bw, f"{p}.{direction}")

    # consoles and devices
    _enum(spec.console.type, CONSOLE_TYPES, "spec.console.type")
    if len(spec.console.password) > 8 and spec.console.type in ("", "vnc"):
        raise InvalidArgument("spec.console.password", "VNC passwords are at most 8 characters (a VNC protocol limit)")
    _text(spec.console.password, "spec.console.password", max_len=64)
    if spec.console.listen:
        import ipaddress

        try:
            ipaddress.ip_address(spec.console.listen)
        except ValueError:
            raise InvalidArgument("spec.console.listen", f"{spec.console.listen!r} is not an IP address") from None
    _text(spec.console.keymap, "spec.console.keymap", max_len=16, pattern=KEYMAP_RE, what="a keymap like en-us")
    if spec.panic_device and arch == "aarch64":
        raise InvalidArgument("spec.panic_device", "this host's libvirt has no guest panic device for aarch64 (pvpanic-pci needs libvirt 9.1+)")
    if spec.watchdog and arch == "aarch64":
        raise InvalidArgument("spec.watchdog", "no watchdog device is available on aarch64 machine virt")
    _text(spec.boot.kernel, "spec.boot.kernel", max_len=4096)
    _text(spec.boot.initrd, "spec.boot.initrd", max_len=4096)
    _text(spec.boot.cmdline, "spec.boot.cmdline", max_len=2048)
    if (spec.boot.initrd or spec.boot.cmdline) and not spec.boot.kernel:
        raise InvalidArgument("spec.boot.kernel", "initrd and cmdline need a kernel")
    if len(spec.labels) > MAX_LABELS:
        raise InvalidArgument("spec.labels", f"at most {MAX_LABELS} labels")
    for key, value in spec.labels.items():
        if not LABEL_KEY_RE.match(key):
            raise InvalidArgument(f"spec.labels[{key!r}]", "keys are 1-63 characters of A-Z a-z 0-9 . _ / -")
        _text(value, f"spec.labels[{key!r}]", max_len=256)


def new_uuid() -> str:
    return str(uuidlib.uuid4())
