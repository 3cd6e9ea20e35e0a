"""VM spec (+ the bindings storage/network/placement resolved) -> libvirt domain model.

All per-arch and per-OS-family defaults live here, so the rest of compute never guesses:

* x86_64: q35 (pc allowed), SeaBIOS, or OVMF through ``<os firmware='efi'>`` with per-VM
  NVRAM under the agent's state dir; aarch64: machine virt, GICv3, AAVMF (or plain direct
  kernel boot when no firmware was asked for and a kernel is given), no x86-only devices.
* OS family (guest_profiles.py, one profile per family and arch): Windows gets Hyper-V
  enlightenments (the full set under KVM; what the hypervisor offers otherwise, hyperv.py, and
  GetVm says what was left out), RTC in local time with the hypervclock timer (KVM), SATA disks
  and an e1000e NIC (bootable without drivers) unless ``virtio_drivers``; Linux and Euler
  virtio everything; Euler on aarch64 boots through UEFI even with a direct kernel.
* CPU: host-model under KVM (host-passthrough on aarch64), a named model under TCG
  (qemu64 / cortex-a57), since TCG cannot offer the host's CPU.
* Disks: cache=none (O_DIRECT) with io=native when the datastore supports direct I/O, else
  writeback; error_policy=stop so a failing datastore pauses the guest instead of
  corrupting it.
* Placement: the host's PlacementPlan is rendered whole by render_placement.apply_placement (pins,
  numatune memory + memnode, hugepage size, the plan's guest NUMA cells); this is the only
  renderer of a plan.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Sequence

from cna_agent.compute import domxml as dx
from cna_agent.compute import hyperv, qmp
from cna_agent.compute.guest_profiles import GuestProfile, profile_for
from cna_agent.compute.render_placement import apply_placement
from cna_agent.contracts import Bandwidth, DiskSourceBinding, NicBinding, PlacementPlan
from cna_agent.compute.spec import VmSpec
from cna_agent.compute.spec_validation import default_target_prefix

log = logging.getLogger(__name__)

#: Empty PCIe root ports a VM keeps for hot-plug (disks, NICs) unless its spec says otherwise
#: (``hotplug_slots``) or the host's ``[compute] hotplug_slots`` does. Each is one QEMU device
#: and one PCI bus number; see DESIGN.md for what they cost.
DEFAULT_HOTPLUG_SLOTS = 4
HYPERV_SPINLOCK_RETRIES = 8191
CFS_PERIOD_US = 100_000


@dataclass(frozen=True)
class RenderContext:
    """Host facts the builder needs (no libvirt calls here: pure and unit-testable)."""

    host_arch: str
    virt_type: str  # "kvm" or "qemu" (TCG)
    state_dir: str  # per-VM NVRAM lives under <state_dir>/nvram
    run_dir: str  # serial logs under <run_dir>/vms/<uuid>/
    console_listen: str = "127.0.0.1"
    host_cpu_mhz: int = 2000
    agent_version: str = ""
    created: str = ""
    #: Add the agent's own QMP monitor (qmp.py) to every domain it builds.
    qmp_side_channel: bool = True
    #: Where side-channel sockets go when run_dir is too deep for a unix socket path.
    qmp_fallback_dir: str = qmp.SHORT_SOCKET_ROOT
    #: The Hyper-V enlightenments libvirt's domain capabilities list (None: it does not say).
    hyperv_features: tuple[str, ...] | None = None
    #: Empty PCIe root ports per VM for hot-plug when its spec does not say (``[compute] hotplug_slots``).
    hotplug_slots: int = DEFAULT_HOTPLUG_SLOTS


@dataclass(frozen=True)
class Bindings:
    """What the resolvers returned for the spec's disks, NICs and boot files (same order)."""

    disks: Sequence[DiskSourceBinding] = ()
    nics: Sequence[NicBinding] = ()
    kernel: str = ""
    initrd: str = ""
    placement: PlacementPlan | None = None


@dataclass(frozen=True)
class Resolved:
    """The spec with every default filled in (what the domain really gets)."""

    arch: str
    machine: str
    domain_type: str
    firmware: str  # "bios", "uefi" or "" (aarch64 direct kernel boot without firmware)
    os_family: str
    cpu_mode: str
    cpu_model: str
    disk_targets: tuple[str, ...]
    #: What the OS family gets on this arch (guest_profiles.py).
    profile: GuestProfile


def resolve_defaults(spec: VmSpec, ctx: RenderContext) -> Resolved:
    arch = spec.arch or ctx.host_arch
    os_family = spec.os_family or "linux"
    profile = profile_for(os_family, arch)
    machine = spec.machine_type or profile.machine
    domain_type = ctx.virt_type if arch == ctx.host_arch else "qemu"
    firmware = spec.firmware or profile.default_firmware(direct_kernel=bool(spec.boot.kernel))
    if spec.cpu_mode and spec.cpu_mode != "custom":
        cpu_mode, cpu_model = spec.cpu_mode, ""
    elif spec.cpu_mode == "custom":
        cpu_mode, cpu_model = "custom", spec.cpu_model
    elif domain_type == "kvm":
        cpu_mode, cpu_model = ("host-passthrough" if arch == "aarch64" else "host-model"), ""
    else:
        cpu_mode, cpu_model = "custom", ("cortex-a57" if arch == "aarch64" else "qemu64")
    targets = assign_disk_targets(spec, os_family)
    return Resolved(arch, machine, domain_type, firmware, os_family, cpu_mode, cpu_model, targets, profile)


def host_limitations(spec: VmSpec, ctx: RenderContext) -> tuple[str, ...]:
    """What this host leaves out of ``spec``'s domain that a KVM host would give it, one sentence
    each (GetVm reports them; derived from the same facts the builder uses, so it stays true
    across restarts without being stored)."""
    r = resolve_defaults(spec, ctx)
    if not r.profile.hyperv:
        return ()
    return hyperv.limitations(r.domain_type, ctx.hyperv_features, panic_device=spec.panic_device)


def _family(spec: VmSpec) -> GuestProfile:
    """The family's profile where no host context is at hand (hot-plug, disk targets): what a
    guest without virtio drivers gets is the family's on every arch, and Windows exists on
    x86_64 only, so the arch a spec leaves to the host does not change it."""
    return profile_for(spec.os_family, spec.arch or "x86_64")


def disk_bus(spec: VmSpec, i: int) -> str:
    return spec.disks[i].bus or _family(spec).disk_bus(spec.virtio_drivers)


def assign_disk_targets(spec: VmSpec, os_family: str = "") -> tuple[str, ...]:
    """Guest device names: the spec's where given, else the next free one for the bus."""
    used = {d.target for d in spec.disks if d.target}
    out: list[str] = []
    for i, disk in enumerate(spec.disks):
        if disk.target:
            out.append(disk.target)
            continue
        prefix = default_target_prefix(disk_bus(spec, i))
        n = 0
        while True:
            name = prefix + _letters(n)
            if name not in used:
                break
            n += 1
        used.add(name)
        out.append(name)
    return tuple(out)


def _letters(n: int) -> str:
    s = ""
    n += 1
    while n:
        n, r = divmod(n - 1, 26)
        s = chr(ord("a") + r) + s
    return s


def vm_run_dir(ctx: RenderContext, uuid: str) -> str:
    return os.path.join(ctx.run_dir, "vms", uuid)


def serial_log_path(ctx: RenderContext, uuid: str) -> str:
    return os.path.join(vm_run_dir(ctx, uuid), "serial.log")


def qmp_socket_path(ctx: RenderContext, uuid: str) -> str:
    """The VM's side-channel monitor socket (short hashed fallback when run_dir is too deep)."""
    path, short = qmp.monitor_socket_path(ctx.run_dir, uuid, short_root=ctx.qmp_fallback_dir)
    if short:
        log.warning("event=qmp.socket_fallback vm=%s path=%s reason=run_dir too long for a unix socket path "
                    "(sun_path is 108 bytes)", uuid, path)
    return str(path)


def nvram_path(ctx: RenderContext, uuid: str) -> str:
    return os.path.join(ctx.state_dir, "nvram", f"{uuid}_VARS.fd")


def _cells(spec: VmSpec) -> list[dx.NumaCell]:
    n = spec.numa_cells if spec.numa_cells > 1 else 1
    vcpus = spec.effective_max_vcpus
    mem = spec.memory_mib
    cells = []
    first = 0
    for i in range(n):
        count = vcpus // n + (1 if i < vcpus % n else 0)
        cpus = f"{first}-{first + count - 1}" if count > 1 else str(first)
        first += count
        mib = mem // n + (mem % n if i == 0 else 0)
        cells.append(dx.NumaCell(id=i, cpus=cpus, memory_kib=mib * 1024, unit="KiB"))
    return cells


def build_domain(spec: VmSpec, bindings: Bindings, ctx: RenderContext) -> dx.Domain:
    """The complete domain for ``spec`` (uuid and NIC MACs must already be filled in)."""
    r = resolve_defaults(spec, ctx)
    dom = dx.Domain(type=r.domain_type, name=spec.name, uuid=spec.uuid)
    if spec.description:
        dom.description = spec.description
    dom.metadata = [dx.metadata_element(spec.to_json(), agent_version=ctx.agent_version, created=ctx.created)]

    # memory
    if spec.max_memory_mib:
        dom.max_memory_kib = spec.max_memory_mib * 1024
        dom.max_memory_slots = 16
    dom.memory_kib = spec.memory_mib * 1024
    dom.current_memory_kib = spec.memory_mib * 1024
    dom.hugepages = spec.hugepages
    if spec.memory_qos.limit_mib:
        dom.memtune = dx.MemTune(hard_limit_kib=spec.memory_qos.limit_mib * 1024)

    # vCPUs and CPU QoS
    dom.vcpu_placement = "static"
    dom.vcpu = spec.effective_max_vcpus
    if spec.effective_max_vcpus != spec.vcpus:
        dom.vcpu_current = spec.vcpus
    tune = dx.CpuTune()
    if spec.cpu_qos.shares:
        tune.shares = spec.cpu_qos.shares
    if spec.cpu_qos.limit_mhz:
        tune.global_period = CFS_PERIOD_US
        tune.global_quota = max(1000, spec.cpu_qos.limit_mhz * CFS_PERIOD_US // max(1, ctx.host_cpu_mhz))
    if len(tune.to_element()):
        dom.cputune = tune

    # firmware and boot
    os_ = dx.Os(type="hvm", arch=r.arch, machine=r.machine)
    if r.firmware == "uefi":
        os_.firmware = "efi"
        if spec.secure_boot:
            os_.firmware_features = [dx.OsFeature(name="enrolled-keys", enabled=True), dx.OsFeature(name="secure-boot", enabled=True)]
        else:
            os_.firmware_features = [dx.OsFeature(name="secure-boot", enabled=False)]
        os_.nvram = nvram_path(ctx, spec.uuid)
    if bindings.kernel:
        os_.kernel = bindings.kernel
        if bindings.initrd:
            os_.initrd = bindings.initrd
        if spec.boot.cmdline:
            os_.cmdline = spec.boot.cmdline
    dom.os = os_

    # features
    # aarch64 without UEFI boots with a device tree; libvirt refuses ACPI there (the power
    # button then reaches the guest as the PL061 GPIO power key).
    feats = dx.Features(acpi=r.arch == "x86_64" or r.firmware == "uefi")
    if r.arch == "x86_64":
        feats.apic = True
        if r.firmware == "uefi" and spec.secure_boot:
            feats.smm = True
        if r.profile.hyperv:
            on = hyperv.offered(r.domain_type, ctx.hyperv_features)
            if on:
                feats.hyperv = dx.HyperV(mode="custom", **{f: True for f in hyperv.WANTED if f in on})
                if "spinlocks" in on:
                    feats.hyperv.spinlock_retries = HYPERV_SPINLOCK_RETRIES
        if r.profile.vmport_off:
            feats.vmport = False
    else:
        feats.gic_version = "3"
    dom.features = feats

    # CPU model, topology, guest NUMA
    cpu = dx.Cpu(mode=r.cpu_mode)
    if r.cpu_mode == "custom":
        cpu.match = "exact"
        cpu.check = "none"
        cpu.model = r.cpu_model
        cpu.model_fallback = "forbid"
    topo = spec.cpu_topology
    if topo.is_set():
        cpu.sockets, cpu.cores, cpu.threads = topo.sockets, topo.cores, topo.threads
        if topo.dies > 1:
            cpu.dies = topo.dies
        if topo.clusters > 1:
            cpu.cores = topo.cores * topo.clusters  # libvirt 9.0 has no clusters attribute
    else:
        cpu.sockets, cpu.cores, cpu.threads = spec.effective_max_vcpus, 1, 1
    if spec.numa_cells > 1 or spec.max_memory_mib:
        cpu.numa_cells = _cells(spec)
    dom.cpu = cpu
    if bindings.placement is not None:
        apply_placement(dom, bindings.placement, spec)

    dom.clock = r.profile.clock(r.domain_type)
    dom.on_poweroff = "destroy"
    dom.on_reboot = "restart"
    dom.on_crash = "destroy"
    if r.arch == "x86_64":
        dom.pm_suspend_to_mem = False
        dom.pm_suspend_to_disk = False

    dom.devices = _devices(spec, bindings, ctx, r)
    if ctx.qmp_side_channel:
        dom.qemu_args = qmp.commandline_args(qmp_socket_path(ctx, spec.uuid))
    return dom


def _devices(spec: VmSpec, bindings: Bindings, ctx: RenderContext, r: Resolved) -> dx.Devices:
    devs = dx.Devices()
    pcie = r.machine == "q35" or r.machine.startswith("pc-q35") or r.arch == "aarch64"

    for i, disk in enumerate(spec.disks):
        devs.disks.append(_disk(spec, i, bindings.disks[i], r.disk_targets[i]))
    if any(disk_bus(spec, i) == "scsi" for i in range(len(spec.disks))):
        devs.controllers.append(dx.Controller(type="scsi", index=0, model="virtio-scsi"))

    for i, nic in enumerate(spec.nics):
        devs.interfaces.append(_interface(spec, i, bindings.nics[i], r.profile))

    # Serial console: a pty for interactive use, also logged to a file admins and tests read.
    if spec.serial_console:
        devs.serials.append(dx.Serial(type="pty", log_file=serial_log_path(ctx, spec.uuid), log_append=True, target_port=0))
        devs.consoles.append(dx.Console(type="pty", target_type="serial", target_port=0))
    if spec.guest_agent:
        devs.channels.append(dx.Channel(type="unix", target_type="virtio", target_name="org.qemu.guest_agent.0"))

    ctype = spec.console.type or "vnc"
    if ctype in ("vnc", "spice"):
        listen = spec.console.listen or ctx.console_listen
        g = dx.Graphics(type=ctype, autoport=True, listen=listen, listens=[dx.GraphicsListen(type="address", address=listen)])
        if spec.console.password:
            g.passwd = spec.console.password
        if spec.console.keymap:
            g.keymap = spec.console.keymap
        devs.graphics.append(g)
        if r.arch == "x86_64":
            devs.inputs.append(dx.Input(type="tablet", bus="usb"))
            devs.videos.append(dx.Video(model="vga"))
        else:
            # libvirt adds no USB controller on aarch64 virt by default; the inputs need one.
            devs.controllers.append(dx.Controller(type="usb", index=0, model="qemu-xhci"))
            devs.inputs.append(dx.Input(type="keyboard", bus="usb"))
            devs.inputs.append(dx.Input(type="tablet", bus="usb"))
            devs.videos.append(dx.Video(model="virtio"))
    if spec.watchdog:
        devs.watchdogs.append(dx.Watchdog(model="i6300esb", action="reset"))
    if spec.balloon and r.profile.balloon(spec.virtio_drivers):
        devs.memballoon = dx.MemBalloon(model="virtio", stats_period=10)
    else:
        devs.memballoon = dx.MemBalloon(model="none")
    if spec.tpm:
        # swtpm started by libvirt for the VM; CRB on x86 (q35 and pc), TIS on aarch64 virt.
        devs.tpms.append(dx.Tpm(model="tpm-crb" if r.arch == "x86_64" else "tpm-tis", backend_type="emulator",
                                backend_version="2.0"))
    if spec.panic_device:
        devs.panics.append(dx.Panic(model=r.profile.panic_model(r.domain_type)))
    if pcie:
        # libvirt puts each PCIe device into an empty root port it finds before it adds one, so
        # spare ports written as such would be taken by the VM's own devices: one port per
        # device that needs one, plus the spares.
        devs.controllers.append(dx.Controller(type="pci", index=0, model="pcie-root"))
        slots = spec.hotplug_slots if spec.hotplug_slots >= 0 else ctx.hotplug_slots
        for _ in range(pcie_endpoints(devs, r.arch) + slots):
            devs.controllers.append(dx.Controller(type="pci", model="pcie-root-port"))
    return devs


def pcie_endpoints(devs: dx.Devices, arch: str) -> int:
    """How many of these devices libvirt plugs into a PCIe root port (checked against libvirt
    9.0's own placement on q35 and virt: tests/integration/test_render_qemu_driver.py).

    Integrated devices sit on pcie-root itself and need none: x86's VGA and SATA (AHCI); disks
    on SATA/SCSI buses hang off their controller; USB devices off the USB controller, which
    libvirt adds to every x86 q35 domain and which is a port's device. The i6300esb watchdog is
    conventional PCI: libvirt adds a pcie-to-pci-bridge for it together with a root port of its
    own, so it is not counted.
    """
    n = sum(1 for d in devs.disks if d.target_bus == "virtio")
    n += len(devs.interfaces)
    n += sum(1 for c in devs.controllers if c.type == "scsi" or (c.type == "usb" and c.model not in (None, "none")))
    if arch == "x86_64" and not any(c.type == "usb" for c in devs.controllers):
        n += 1  # the USB controller libvirt adds by default (qemu-xhci on q35)
    if any(ch.target_type == "virtio" for ch in devs.channels):
        n += 1  # the virtio-serial controller the channels hang off
    if devs.memballoon is not None and devs.memballoon.model == "virtio":
        n += 1
    n += sum(1 for v in devs.videos if v.model == "virtio")
    return n


def _disk(spec: VmSpec, i: int, b: DiskSourceBinding, target: str) -> dx.Disk:
    d = spec.disks[i]
    device = d.device or "disk"
    disk = dx.Disk(type=b.kind, device=device, driver_name="qemu", driver_type=(d.format or b.format or "raw"))
    if device == "cdrom":
        disk.driver_type = "raw"
    cache = d.cache or ("none" if b.supports_direct_io else "writeback")
    disk.cache = cache
    if device != "cdrom":
        policy = d.error_policy or "stop"
        disk.error_policy = policy
        disk.rerror_policy = policy if policy in ("stop", "report", "ignore") else "stop"
    io = d.io or ("native" if cache in ("none", "directsync") else "")
    if io:
        disk.io = io
    if device == "disk" and not d.readonly:
        disk.discard = "unmap"
    if b.kind == "file":
        disk.source_file = b.path
    elif b.kind == "block":
        disk.source_dev = b.path
    else:
        disk.source_protocol = b.protocol
        disk.source_name = b.name
        disk.source_hosts = [dx.DiskHost(name=h, port=str(p)) for h, p in b.hosts]
        if b.auth_username:
            disk.auth_username = b.auth_username
            disk.auth_secret_type = b.protocol or "iscsi"
            disk.auth_secret_uuid = b.auth_secret_uuid
    disk.target_dev = target
    disk.target_bus = disk_bus(spec, i)
    if d.qos.is_set():
        disk.iotune = dx.IoTune(**{k: v for k, v in vars(d.qos).items() if v})
    if d.boot_order:
        disk.boot_order = d.boot_order
    disk.readonly = d.readonly or device == "cdrom"
    disk.shareable = d.shareable
    if d.serial:
        disk.serial = d.serial
    return disk


def disk_xml(spec: VmSpec, i: int, b: DiskSourceBinding, target: str) -> str:
    """One <disk> element for hot-plug, rendered exactly as in a full domain."""
    return _disk(spec, i, b, target).to_xml(pretty=False)


def interface_xml(spec: VmSpec, i: int, b: NicBinding) -> str:
    """One <interface> element for hot-plug, rendered exactly as in a full domain."""
    return _interface(spec, i, b, _family(spec)).to_xml(pretty=False)


def _interface(spec: VmSpec, i: int, b: NicBinding, profile: GuestProfile) -> dx.Interface:
    n = spec.nics[i]
    if b.kind == "ovs" and b.plugged_by == "agent":
        # libvirt only makes the tap; network adds it to the bridge (VLAN, ids) itself.
        iface = dx.Interface(type="ethernet", mac=n.mac)
    else:
        iface = dx.Interface(type="bridge", mac=n.mac, source_bridge=b.bridge)
        if b.vlan is not None:
            iface.vlan_tags = [dx.VlanTag(id=b.vlan)]
        elif b.trunk:
            iface.vlan_trunk = True
            iface.vlan_tags = [dx.VlanTag(id=v) for v in b.trunk]
        if b.kind == "ovs":
            iface.virtualport_type = "openvswitch"
            if n.interface_id:
                iface.interface_id = n.interface_id
    model = n.model or profile.nic_model(spec.virtio_drivers)
    iface.model = model
    if model == "virtio" and n.queues > 1:
        iface.driver_queues = n.queues
    if model == "virtio" and not b.host_offloads:
        iface.host_csum = False
    # The NIC's own limit wins over its port group's.
    inbound = n.inbound or b.inbound
    if inbound and inbound.average_kbps:
        iface.inbound = _bandwidth(inbound)
    # The outbound limit (guest -> host) is network's (an nftables limit or an OpenFlow meter on
    # the port, network/vifguard.py): libvirt's tc police needs act_police, which not every
    # kernel has, and a userspace-datapath OVS never sees it.
    if b.filter:
        iface.filter = b.filter
        iface.filter_params = [dx.FilterParam(name=k, value=v) for k, v in sorted(b.filter_params.items())]
    if n.link_down:
        iface.link_state = "down"
    if b.mtu:
        iface.mtu = b.mtu
    if n.boot_order:
        iface.boot_order = n.boot_order
    return iface


def _bandwidth(bw: Bandwidth) -> dx.Bandwidth:
    # libvirt: average/peak in KiB/s (kbytes), burst in KiB; the spec speaks kbit/s.
    out = dx.Bandwidth(average=max(1, bw.average_kbps // 8))
    if bw.peak_kbps:
        out.peak = max(1, bw.peak_kbps // 8)
    if bw.burst_kib:
        out.burst = bw.burst_kib
    return out


def render_xml(spec: VmSpec, bindings: Bindings, ctx: RenderContext) -> str:
    return build_domain(spec, bindings, ctx).to_xml()
