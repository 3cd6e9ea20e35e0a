"""VmSpec validation: the one place where caller input in a spec is checked.

Why apart from the model (spec.py): the dataclasses are what every part stores and passes
around, while the rules (ranges, names, per-arch machine and firmware checks, QoS floors) change
more often and only the create, update and migration paths ask for them. ``validate()`` raises
``InvalidArgument("spec.<field path>", reason)`` and runs before anything touches libvirt, so a
bad spec changes nothing on the host.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

from cna_agent.compute.spec import (
    ARCHES,
    CONSOLE_TYPES,
    CPU_MODEL_RE,
    CPU_MODES,
    DISK_BUSES,
    DISK_CACHES,
    DISK_DEVICES,
    DISK_ERROR_POLICIES,
    DISK_IO_MODES,
    FIRMWARES,
    IoQos,
    KEYMAP_RE,
    LABEL_KEY_RE,
    MACHINE_RE,
    MAC_RE,
    MAX_DISKS,
    MAX_HOTPLUG_SLOTS,
    MAX_LABELS,
    MAX_MEMORY_MIB,
    MAX_NICS,
    MAX_NUMA_CELLS,
    MAX_QOS,
    MIN_MEMORY_MIB,
    MIN_QOS_BYTES_SEC,
    MIN_QOS_IOPS_SEC,
    NAME_RE,
    NIC_MODELS,
    NicSpec,
    OS_FAMILIES,
    SERIAL_RE,
    STORAGE_ERROR_ACTIONS,
    TARGET_RE,
    UUID_RE,
    VmSpec,
    machine_max_vcpus,
)
from cna_agent.contracts import check_bandwidth
from cna_agent.errors import InvalidArgument


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
