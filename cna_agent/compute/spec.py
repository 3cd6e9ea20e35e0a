"""The VM spec: plain dataclasses mirroring proto ``cna.v1.VmSpec``, and its one validator.

Why a separate model: the servicer converts proto -> spec, the CLI and tests build specs
directly, and the spec is what the agent stores in the domain's ``<metadata>`` (as JSON), so
a VM carries the manager's intent with it across agent restarts. Enums are short lowercase
strings ("uefi", "windows"); "" means "the default for this arch/OS family".

``validate()`` (spec_validation.py) is the single place where caller input is checked.
"""

from __future__ import annotations

import dataclasses
import json
import re
import uuid as uuidlib
from dataclasses import dataclass, field
from typing import Any, Mapping

from cna_agent.contracts import Bandwidth

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


def new_uuid() -> str:
    return str(uuidlib.uuid4())
