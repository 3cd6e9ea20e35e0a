"""libvirt domain XML as typed objects (the parts the agent writes and reads).

One class per element kind, each field declared once (see cna_agent/xmlobj.py); the builder in
render.py fills these from a VM spec, and the service parses libvirt's live XML with the
same classes (e.g. the VNC port libvirt picked, the QEMU-assigned aliases are ignored).
Field order follows libvirt's domain schema so generated documents pass virt-xml-validate.
"""

from __future__ import annotations

from xml.etree import ElementTree as ET

from typing import Any

from cna_agent.xmlobj import _KIB, Child, Children, Field, Prop, Raw, XmlObject

#: The agent's metadata namespace (a URI libvirt only uses as a key).
CNA_NS = "https://cna-agent.org/xmlns/vm/1.0"
ET.register_namespace("cna", CNA_NS)
#: libvirt's namespace for extra QEMU arguments (the agent's QMP side channel).
QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
ET.register_namespace("qemu", QEMU_NS)


class QemuArgs(Field):
    """``<qemu:commandline><qemu:arg value=.../>...`` as a list of strings.

    A field of its own because the namespaced tags contain '/' (the URI), which the generic
    path syntax of xmlobj splits on.
    """

    def default(self) -> Any:
        return []

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        if obj is None:
            return self
        return obj.__dict__.setdefault(self.name, [])

    def build(self, obj: "XmlObject", root: ET.Element) -> None:
        args = self.__get__(obj)
        if not args:
            return
        cmd = ET.SubElement(root, f"{{{QEMU_NS}}}commandline")
        for a in args:
            ET.SubElement(cmd, f"{{{QEMU_NS}}}arg").set("value", a)

    def parse(self, obj: "XmlObject", root: ET.Element) -> None:
        cmd = root.find(f"{{{QEMU_NS}}}commandline")
        if cmd is not None:
            self.__set__(obj, [a.get("value", "") for a in cmd.findall(f"{{{QEMU_NS}}}arg")])


# -- os / firmware ----------------------------------------------------------------------------


class BootDev(XmlObject):
    dev = Prop("@dev")


class OsFeature(XmlObject):
    name = Prop("@name")
    enabled = Prop("@enabled", "yesno")


class Os(XmlObject):
    TAG = "os"
    firmware = Prop("@firmware")
    arch = Prop("type/@arch")
    machine = Prop("type/@machine")
    type = Prop("type")
    firmware_features = Children(OsFeature, "firmware/feature")
    loader = Prop("loader")
    loader_readonly = Prop("loader/@readonly", "yesno")
    loader_secure = Prop("loader/@secure", "yesno")
    loader_type = Prop("loader/@type")
    nvram = Prop("nvram")
    nvram_template = Prop("nvram/@template")
    kernel = Prop("kernel")
    initrd = Prop("initrd")
    cmdline = Prop("cmdline")
    boot = Children(BootDev, "boot")


# -- features ---------------------------------------------------------------------------------


class HyperV(XmlObject):
    """Hyper-V enlightenments: Windows runs markedly faster and keeps time with them."""

    mode = Prop("@mode")
    relaxed = Prop("relaxed/@state", "onoff")
    vapic = Prop("vapic/@state", "onoff")
    spinlocks = Prop("spinlocks/@state", "onoff")
    spinlock_retries = Prop("spinlocks/@retries", "int")
    vpindex = Prop("vpindex/@state", "onoff")
    runtime = Prop("runtime/@state", "onoff")
    synic = Prop("synic/@state", "onoff")
    stimer = Prop("stimer/@state", "onoff")
    reset = Prop("reset/@state", "onoff")
    frequencies = Prop("frequencies/@state", "onoff")
    reenlightenment = Prop("reenlightenment/@state", "onoff")
    tlbflush = Prop("tlbflush/@state", "onoff")
    ipi = Prop("ipi/@state", "onoff")


class Features(XmlObject):
    TAG = "features"
    acpi = Prop("acpi", "flag")
    apic = Prop("apic", "flag")
    hyperv = Child(HyperV, "hyperv")
    kvm_hidden = Prop("kvm/hidden/@state", "onoff")
    vmport = Prop("vmport/@state", "onoff")
    gic_version = Prop("gic/@version")
    smm = Prop("smm/@state", "onoff")


# -- cpu / numa -------------------------------------------------------------------------------


class NumaCell(XmlObject):
    id = Prop("@id", "int")
    cpus = Prop("@cpus")
    memory_kib = Prop("@memory", "int")
    unit = Prop("@unit")


class Cpu(XmlObject):
    TAG = "cpu"
    mode = Prop("@mode")
    match = Prop("@match")
    check = Prop("@check")
    model = Prop("model")
    model_fallback = Prop("model/@fallback")
    sockets = Prop("topology/@sockets", "int")
    dies = Prop("topology/@dies", "int")
    cores = Prop("topology/@cores", "int")
    threads = Prop("topology/@threads", "int")
    numa_cells = Children(NumaCell, "numa/cell")


class VcpuPin(XmlObject):
    vcpu = Prop("@vcpu", "int")
    cpuset = Prop("@cpuset")


class IoThreadPin(XmlObject):
    """Host CPUs of one I/O thread (libvirt refuses a pin for an id the domain does not define)."""

    iothread = Prop("@iothread", "int")
    cpuset = Prop("@cpuset")


class CpuTune(XmlObject):
    TAG = "cputune"
    shares = Prop("shares", "int")
    global_period = Prop("global_period", "int")
    global_quota = Prop("global_quota", "int")
    vcpupins = Children(VcpuPin, "vcpupin")
    emulatorpin = Prop("emulatorpin/@cpuset")
    iothreadpins = Children(IoThreadPin, "iothreadpin")


class MemTune(XmlObject):
    TAG = "memtune"
    hard_limit_kib = Prop("hard_limit", "kib")
    soft_limit_kib = Prop("soft_limit", "kib")


class MemNode(XmlObject):
    """One guest NUMA cell's memory bound to host node(s) (``cellid`` must name a guest cell)."""

    cellid = Prop("@cellid", "int")
    mode = Prop("@mode")
    nodeset = Prop("@nodeset")


class NumaTune(XmlObject):
    TAG = "numatune"
    mode = Prop("memory/@mode")
    nodeset = Prop("memory/@nodeset")
    memnodes = Children(MemNode, "memnode")


class HugePage(XmlObject):
    """``<memoryBacking><hugepages><page size= unit=>``: the page size backing guest memory.

    The agent writes KiB, but the element allows any unit (``2`` ``M``, ``1`` ``G``), so
    :attr:`size_kib` normalises it for comparisons.
    """

    size = Prop("@size", "int")
    unit = Prop("@unit")
    nodeset = Prop("@nodeset")

    @property
    def size_kib(self) -> int | None:
        if self.size is None:
            return None
        return int(self.size * _KIB.get((self.unit or "KiB").lower(), 1))


class Timer(XmlObject):
    name = Prop("@name")
    present = Prop("@present", "yesno")
    tickpolicy = Prop("@tickpolicy")


class Clock(XmlObject):
    TAG = "clock"
    offset = Prop("@offset")
    timers = Children(Timer, "timer")


# -- devices ----------------------------------------------------------------------------------


class DiskHost(XmlObject):
    name = Prop("@name")
    port = Prop("@port")


class IoTune(XmlObject):
    total_bytes_sec = Prop("total_bytes_sec", "int")
    read_bytes_sec = Prop("read_bytes_sec", "int")
    write_bytes_sec = Prop("write_bytes_sec", "int")
    total_iops_sec = Prop("total_iops_sec", "int")
    read_iops_sec = Prop("read_iops_sec", "int")
    write_iops_sec = Prop("write_iops_sec", "int")


class Disk(XmlObject):
    TAG = "disk"
    type = Prop("@type")
    device = Prop("@device")
    driver_name = Prop("driver/@name")
    driver_type = Prop("driver/@type")
    cache = Prop("driver/@cache")
    error_policy = Prop("driver/@error_policy")
    rerror_policy = Prop("driver/@rerror_policy")
    io = Prop("driver/@io")
    discard = Prop("driver/@discard")
    auth_username = Prop("auth/@username")
    auth_secret_type = Prop("auth/secret/@type")
    auth_secret_uuid = Prop("auth/secret/@uuid")
    source_file = Prop("source/@file")
    source_dev = Prop("source/@dev")
    source_protocol = Prop("source/@protocol")
    source_name = Prop("source/@name")
    source_hosts = Children(DiskHost, "source/host")
    target_dev = Prop("target/@dev")
    target_bus = Prop("target/@bus")
    target_removable = Prop("target/@removable")
    iotune = Child(IoTune, "iotune")
    boot_order = Prop("boot/@order", "int")
    readonly = Prop("readonly", "flag")
    shareable = Prop("shareable", "flag")
    serial = Prop("serial")
    #: libvirt's device alias in a live domain (virtio-disk0): how the guest agent names disks.
    alias = Prop("alias/@name")


class Controller(XmlObject):
    TAG = "controller"
    type = Prop("@type")
    index = Prop("@index", "int")
    model = Prop("@model")


class Bandwidth(XmlObject):
    average = Prop("@average", "int")
    peak = Prop("@peak", "int")
    burst = Prop("@burst", "int")


class VlanTag(XmlObject):
    id = Prop("@id", "int")


class FilterParam(XmlObject):
    name = Prop("@name")
    value = Prop("@value")


class Interface(XmlObject):
    TAG = "interface"
    type = Prop("@type")
    mac = Prop("mac/@address")
    source_bridge = Prop("source/@bridge")
    vlan_trunk = Prop("vlan/@trunk", "yesno")
    vlan_tags = Children(VlanTag, "vlan/tag")
    virtualport_type = Prop("virtualport/@type")
    interface_id = Prop("virtualport/parameters/@interfaceid")
    target_dev = Prop("target/@dev")
    model = Prop("model/@type")
    driver_queues = Prop("driver/@queues", "int")
    #: Offloads the guest may use toward the host (csum='off' turns off TSO/GSO too).
    host_csum = Prop("driver/host/@csum", "onoff")
    inbound = Child(Bandwidth, "bandwidth/inbound")
    outbound = Child(Bandwidth, "bandwidth/outbound")
    filter = Prop("filterref/@filter")
    filter_params = Children(FilterParam, "filterref/parameter")
    link_state = Prop("link/@state")
    mtu = Prop("mtu/@size", "int")
    boot_order = Prop("boot/@order", "int")


class Serial(XmlObject):
    TAG = "serial"
    type = Prop("@type")
    source_path = Prop("source/@path")
    log_file = Prop("log/@file")
    log_append = Prop("log/@append", "onoff")
    target_port = Prop("target/@port", "int")


class Console(XmlObject):
    TAG = "console"
    type = Prop("@type")
    source_path = Prop("source/@path")
    target_type = Prop("target/@type")
    target_port = Prop("target/@port", "int")


class Channel(XmlObject):
    TAG = "channel"
    type = Prop("@type")
    source_path = Prop("source/@path")
    target_type = Prop("target/@type")
    target_name = Prop("target/@name")
    #: A running domain's virtio channel: "connected" while a guest program holds the port.
    target_state = Prop("target/@state")


class Input(XmlObject):
    TAG = "input"
    type = Prop("@type")
    bus = Prop("@bus")


class GraphicsListen(XmlObject):
    type = Prop("@type")
    address = Prop("@address")


class Graphics(XmlObject):
    TAG = "graphics"
    type = Prop("@type")
    port = Prop("@port", "int")
    autoport = Prop("@autoport", "yesno")
    listen = Prop("@listen")
    passwd = Prop("@passwd")
    passwd_valid_to = Prop("@passwdValidTo")
    keymap = Prop("@keymap")
    listens = Children(GraphicsListen, "listen")


class Video(XmlObject):
    TAG = "video"
    model = Prop("model/@type")


class Watchdog(XmlObject):
    TAG = "watchdog"
    model = Prop("@model")
    action = Prop("@action")


class MemBalloon(XmlObject):
    TAG = "memballoon"
    model = Prop("@model")
    stats_period = Prop("stats/@period", "int")
    #: libvirt's alias in a live domain (balloon0): the QOM path of its guest-stats.
    alias = Prop("alias/@name")


class Panic(XmlObject):
    TAG = "panic"
    model = Prop("@model")


class MemoryDevice(XmlObject):
    """A DIMM for memory hot-plug."""

    TAG = "memory"
    model = Prop("@model")
    size_kib = Prop("target/size", "kib")
    node = Prop("target/node", "int")


class Tpm(XmlObject):
    TAG = "tpm"
    model = Prop("@model")
    backend_type = Prop("backend/@type")
    backend_version = Prop("backend/@version")


class Devices(XmlObject):
    TAG = "devices"
    emulator = Prop("emulator")
    disks = Children(Disk, "disk")
    controllers = Children(Controller, "controller")
    interfaces = Children(Interface, "interface")
    serials = Children(Serial, "serial")
    consoles = Children(Console, "console")
    channels = Children(Channel, "channel")
    inputs = Children(Input, "input")
    graphics = Children(Graphics, "graphics")
    videos = Children(Video, "video")
    watchdogs = Children(Watchdog, "watchdog")
    memballoon = Child(MemBalloon, "memballoon")
    panics = Children(Panic, "panic")
    memories = Children(MemoryDevice, "memory")
    tpms = Children(Tpm, "tpm")


# -- the domain -------------------------------------------------------------------------------


class Domain(XmlObject):
    TAG = "domain"
    type = Prop("@type")
    name = Prop("name")
    uuid = Prop("uuid")
    description = Prop("description")
    metadata = Raw("metadata")
    max_memory_kib = Prop("maxMemory", "kib")
    max_memory_slots = Prop("maxMemory/@slots", "int")
    memory_kib = Prop("memory", "kib")
    current_memory_kib = Prop("currentMemory", "kib")
    hugepages = Prop("memoryBacking/hugepages", "flag")
    hugepage_pages = Children(HugePage, "memoryBacking/hugepages/page")
    memtune = Child(MemTune, "memtune")
    vcpu_placement = Prop("vcpu/@placement")
    vcpu_current = Prop("vcpu/@current", "int")
    vcpu = Prop("vcpu", "int")
    #: How many I/O threads QEMU creates (ids 1..n); iothreadpin may name only these.
    iothreads = Prop("iothreads", "int")
    cputune = Child(CpuTune, "cputune")
    numatune = Child(NumaTune, "numatune")
    os = Child(Os, "os")
    features = Child(Features, "features")
    cpu = Child(Cpu, "cpu")
    clock = Child(Clock, "clock")
    on_poweroff = Prop("on_poweroff")
    on_reboot = Prop("on_reboot")
    on_crash = Prop("on_crash")
    pm_suspend_to_mem = Prop("pm/suspend-to-mem/@enabled", "yesno")
    pm_suspend_to_disk = Prop("pm/suspend-to-disk/@enabled", "yesno")
    devices = Child(Devices, "devices")
    qemu_args = QemuArgs("qemu:commandline")

    # -- the agent's metadata ------------------------------------------------------------------

    def agent_metadata(self) -> ET.Element | None:
        for el in self.metadata or ():
            if el.tag == f"{{{CNA_NS}}}vm":
                return el
        return None


def metadata_element(spec_json: str, *, agent_version: str, created: str = "") -> ET.Element:
    """``<cna:vm>``: the VM's full spec as JSON plus who wrote it (what adoption reads)."""
    root = ET.Element(f"{{{CNA_NS}}}vm")
    root.set("agent-version", agent_version)
    if created:
        root.set("created", created)
    spec = ET.SubElement(root, f"{{{CNA_NS}}}spec")
    spec.set("format", "json")
    spec.text = spec_json
    return root


def metadata_for_set(spec_json: str, *, agent_version: str) -> str:
    """The ``<vm>`` body for virDomainSetMetadata: libvirt adds the ``cna`` namespace itself
    from the key and URI it is given, and refuses an element that already declares one
    ("failed to create a new XML namespace")."""
    root = ET.Element("vm")
    root.set("agent-version", agent_version)
    spec = ET.SubElement(root, "spec")
    spec.set("format", "json")
    spec.text = spec_json
    return ET.tostring(root, encoding="unicode")


def spec_json_from_metadata(el: ET.Element) -> str | None:
    # virDomainGetMetadata returns the element with the namespace stripped; the full domain
    # XML keeps it.
    spec = el.find(f"{{{CNA_NS}}}spec")
    if spec is None:
        spec = el.find("spec")
    return spec.text if spec is not None and spec.text else None


def spec_json_from_metadata_xml(text: str) -> str | None:
    """The spec JSON in virDomainGetMetadata's answer (raises ET.ParseError on bad XML)."""
    return spec_json_from_metadata(ET.fromstring(text))
