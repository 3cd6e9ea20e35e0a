"""The typed seams between subsystems: what each one offers the others, and the plain data
that crosses.

Providers (compute asks them): the VM spec names host resources abstractly (a volume
"ds1/vm1/root.qcow2", a SAN LUN, a port group "pg-web", "dedicated CPUs"). Storage, network and
placement each turn those names into a *binding*: plain data saying exactly what libvirt must
be told (a file path or an iSCSI target, a bridge and VLAN, a vCPU-to-pCPU map). Compute's
domain XML builder renders bindings and knows nothing about datastores, OVSDB or NUMA planning;
the other subsystems never build XML.

Views of the VMs (the others ask compute): which VM disks use which volume or LUN (storage's
in-use checks and LUN releases), which NICs every VM has (network's port repair and listings),
where a VM's QEMU runs (placement's drift check). Compute owns VMs and every device of theirs,
so these answers come from it, not from each subsystem reading libvirt on its own.

Each side is a Protocol; the composition root (cna_agent/wiring) hands every service the
objects it needs as constructor arguments, so nothing is found by name at run time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Mapping, Protocol


# -- disks (storage) --------------------------------------------------------------------------


def format_from_name(path: str) -> str:
    """A disk image's format, decided by its name: "*.qcow2" is qcow2, anything else raw.

    Never probed from the file's content: the content is guest-writable, and a raw disk whose
    guest wrote a qcow2 header would otherwise be opened as qcow2 with a backing file of the
    guest's choosing (the classic format-probing hole). Storage and compute's local-file
    resolver both use this one rule.
    """
    return "qcow2" if path.endswith(".qcow2") else "raw"



@dataclass(frozen=True)
class DiskSourceBinding:
    #: "file" (a volume on a directory datastore), "block" (a host block device: kernel
    #: iSCSI/FC LUN, multipath map) or "network" (QEMU's own initiator, e.g. libiscsi).
    kind: str
    #: file/block: absolute host path, already confined to its datastore.
    path: str = ""
    #: "qcow2" or "raw", as probed by the agent (never guessed from guest-writable data).
    format: str = "raw"
    #: network: "iscsi"; hosts as (address, port); name = "<iqn>/<lun>".
    protocol: str = ""
    hosts: tuple[tuple[str, int], ...] = ()
    name: str = ""
    #: CHAP: user name and the UUID of the libvirt secret holding the password.
    auth_username: str = ""
    auth_secret_uuid: str = ""
    #: O_DIRECT works on this datastore, so cache='none' is the default.
    supports_direct_io: bool = True
    datastore: str = ""
    #: Stable identity (volume id or LUN WWN) kept in the domain metadata for reconcile.
    volume_id: str = ""


class DiskProvider(Protocol):
    """What compute needs from storage (implemented by StorageService; compute/resolvers.py
    has the local-file stand-in for an agent without datastores)."""

    async def resolve_volume(self, volume_id: str, *, field: str) -> DiskSourceBinding:
        """Bind "datastore/relative/path"; raise InvalidArgument(field, ...) / NotFound."""

    async def resolve_lun(self, datastore: str, lun_id: str, *, field: str, vm: str) -> DiskSourceBinding:
        """Bind a SAN LUN for VM ``vm`` (log in / scan as needed) and record that ``vm`` claims
        it: from now on a release by another VM keeps it, even before ``vm`` is defined."""

    async def release_lun(self, datastore: str, lun_id: str, *, field: str, vm: str) -> "LunRelease":
        """``vm`` no longer uses the LUN (VM undefined, disk detached, or the define it was
        bound for failed): drop its claim and undo resolve_lun's host-side attach unless
        another VM still claims or uses the LUN.

        Called after the VM change is done in libvirt, so SAN trouble never raises: the
        provider reports it (event, log), keeps the release owed and retries it later. Only
        bad input (unknown datastore, malformed lun_id) raises, naming ``field``.
        """

    def resolve_boot_file(self, path: str, *, field: str) -> str:
        """A direct-boot kernel/initrd: an absolute host path for "datastore/rel/path"."""

    async def delete_volume(self, volume_id: str, *, field: str) -> None:
        """Delete a VM's volume (DeleteVm with delete_disks)."""

    async def check_deletable(self, volume_id: str, *, field: str) -> None:
        """Raise FailedPrecondition (naming ``field``) when delete_volume would refuse the
        volume (a linked clone of another name stands on it): DeleteVm asks before it changes
        anything, so a refused disk never leaves the VM undefined and its disks half-deleted."""

    async def new_volume(self, volume_id: str, size: int, *, room: int, field: str) -> DiskSourceBinding:
        """Create an empty volume "datastore/relative/path" of ``size`` bytes (its format by
        its name) for a disk to be copied into, and bind it; ResourceExhausted when the
        datastore has less than ``room`` bytes free, AlreadyExists when the name is taken,
        each naming ``field``; nothing is made then."""

    async def clone_for_vm(self, source_id: str, volume_id: str, *, linked: bool, field: str) -> DiskSourceBinding:
        """A new volume ``volume_id`` made from ``source_id`` for a VM deployed from a template:
        a qcow2 overlay on it (``linked``) or a full copy; AlreadyExists when the name is taken,
        each error naming ``field``; nothing is left behind on failure."""

    async def protect_template(self, volume_id: str, *, field: str) -> None:
        """Make a volume a read-only template base (what linked clones stand on): it cannot be
        written, resized or deleted while clones use it."""

    async def state_area(self, datastore: str, *, field: str) -> str:
        """An absolute directory on dir datastore ``datastore`` where compute keeps VM state
        that is not a volume (hibernation images: compute/hibernate_store.py); not made here
        (the caller makes it when it writes there, so a refused request leaves nothing), and
        hidden from volume listings. NotFound for an unknown datastore, FailedPrecondition for a
        SAN datastore or one that is unreachable, each naming ``field``."""


@dataclass(frozen=True)
class ImageSource:
    """A disk image: a whole file, or the ``length`` bytes at ``offset`` inside one (a disk
    stored in an OVA, read in place through QEMU's raw driver rather than extracted first)."""

    path: str
    offset: int = 0
    length: int = 0  # 0 with offset 0: the whole file


@dataclass(frozen=True)
class ImageFacts:
    format: str
    virtual_size: int
    #: vmdk: the create type ("streamOptimized", ...).
    subformat: str = ""
    #: qemu-img check's word on it ("no errors", "... leaked cluster(s)", "not supported").
    check: str = ""
    #: Bytes of the file itself (write_image).
    file_size: int = 0


class ImageStore(Protocol):
    """Files on dir datastores for appliance import and export (OVF/OVA: compute/appliance_*.py).
    Every id is "datastore/relative/path", confined like a volume's (storage/paths.py), each
    error naming ``field``; storage/images.py implements it."""

    def existing_file(self, file_id: str, *, field: str) -> str:
        """The absolute path of an existing regular file; NotFound otherwise."""

    def new_path(self, file_id: str, *, field: str) -> str:
        """The absolute path where a new file or directory may be made (the name policy of new
        files, nothing there yet: AlreadyExists); nothing is made."""

    def staging_path(self, path: str) -> str:
        """A hidden name beside ``path`` for a package being written: removed by storage's
        start-up sweep if the agent dies before it is put in place."""

    async def probe(self, source: ImageSource, *, field: str) -> ImageFacts:
        """The image's format and size, refused (InvalidArgument) unless it is importable: a
        format qemu-img reads, self-contained (no backing file, external data file, or vmdk
        extent naming another file) and clean under ``qemu-img check``."""

    async def import_image(self, source: ImageSource, volume_id: str, *, field: str,
                           on_progress: Any) -> ImageFacts:
        """probe(), then the image converted into new volume ``volume_id`` (format by its name);
        ``on_progress(percent)`` from a worker thread; cancellable (nothing is left then)."""

    async def blank_volume(self, volume_id: str, size: int, *, field: str) -> None:
        """An empty volume of ``size`` bytes (format by its name)."""

    async def write_image(self, volume_id: str, dest_path: str, *, fmt: str, subformat: str = "",
                          on_progress: Any) -> ImageFacts:
        """Volume ``volume_id`` converted into a new file at ``dest_path`` (a path new_path gave,
        or one inside a directory it gave): its virtual size and file size."""

    async def free_bytes(self, datastore: str, *, field: str) -> int:
        """Bytes free on the datastore's file system."""

    async def remove(self, path: str) -> None:
        """Remove a file or directory tree this interface's caller made (clean-up)."""


#: What release_lun did with the host's devices for a LUN:
#: "released"   multipath map, SCSI paths and, for a target's last LUN, the iSCSI session removed;
#: "in-use"     another defined VM uses the same LUN (multi-attach): kept;
#: "absent"     nothing of it is attached on this host;
#: "not-needed" QEMU's own initiator (libiscsi) holds the session: no host state to remove;
#: "claimed"    a VM that is being defined or hot-plugged on it claims it: kept;
#: "failed"     the release failed or ran past its deadline: reported, retried later.
LunRelease = Literal["released", "in-use", "absent", "not-needed", "claimed", "failed"]


# -- NICs (network) ---------------------------------------------------------------------------


#: kbit/s ceiling of a traffic limit (100 Gbit/s), so a typo cannot overflow libvirt's KiB/s
#: fields; and the floor of a set limit (1 KiB/s: libvirt's unit; less would stall the NIC).
MAX_KBPS = 100_000_000
MIN_KBPS = 8


@dataclass(frozen=True)
class Bandwidth:
    """A NIC's or port group's traffic limit, in the API's units (kbit/s, KiB)."""

    average_kbps: int = 0
    peak_kbps: int = 0
    burst_kib: int = 0

    @property
    def is_set(self) -> bool:
        return self.average_kbps > 0


def check_bandwidth(bw: Bandwidth, field: str) -> Bandwidth:
    """The one validator of a traffic limit (NICs of a VM spec, port groups): each value 0 (no
    limit) or within MIN_KBPS..MAX_KBPS, peak and burst only with an average, peak >= average."""
    from cna_agent.errors import InvalidArgument

    for key in ("average_kbps", "peak_kbps", "burst_kib"):
        value = getattr(bw, key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0 or value > MAX_KBPS:
            raise InvalidArgument(f"{field}.{key}", f"{value!r} is not in 0..{MAX_KBPS}")
    if (bw.peak_kbps or bw.burst_kib) and not bw.average_kbps:
        raise InvalidArgument(f"{field}.average_kbps", "is required when peak_kbps or burst_kib is set")
    if bw.peak_kbps and bw.peak_kbps < bw.average_kbps:
        raise InvalidArgument(f"{field}.peak_kbps", f"{bw.peak_kbps} is below average_kbps {bw.average_kbps}")
    if 0 < bw.average_kbps < MIN_KBPS:
        raise InvalidArgument(f"{field}.average_kbps", f"{bw.average_kbps} kbit/s is below the smallest limit, "
                                                       f"{MIN_KBPS} (0 = none)")
    return bw


@dataclass(frozen=True)
class NicBinding:
    #: "linux-bridge" or "ovs".
    kind: str
    bridge: str
    port_group: str
    #: Access VLAN (None = untagged) or trunk VLANs; OVS renders them as <vlan> on the
    #: interface, Linux bridges through per-VLAN bridges the network subsystem manages.
    vlan: int | None = None
    trunk: tuple[int, ...] = ()
    inbound: Bandwidth | None = None
    outbound: Bandwidth | None = None
    #: libvirt nwfilter to apply, or "". NetworkService never sets it: anti-spoofing is
    #: enforced by network itself (network/vifguard.py), in every libvirt mode.
    filter: str = ""
    filter_params: Mapping[str, str] = field(default_factory=dict)
    mtu: int = 0
    #: Who adds an "ovs" NIC's port to its bridge: "libvirt" (<virtualport type='openvswitch'>,
    #: libvirt runs ovs-vsctl against the default database) or "agent" (the NIC is rendered as
    #: <interface type='ethernet'>: libvirt only makes the tap, network adds the port through
    #: its own OVSDB connection; used when libvirt would reach another database than the agent).
    plugged_by: str = "libvirt"
    #: False: the guest must not hand the host partial checksums or large (TSO/GSO) segments:
    #: a userspace-datapath OVS reads the tap through a packet socket and forwards such frames
    #: as they are (unchecksummed, oversized), so TCP from the guest would stall.
    host_offloads: bool = True


class PortProvider(Protocol):
    """What compute needs from network (implemented by NetworkService; compute/resolvers.py
    has the stand-in that refuses NICs on an agent without networking)."""

    async def resolve_port_group(self, port_group: str, *, field: str) -> NicBinding:
        """Bind a port group name; raise InvalidArgument(field, ...) when unknown."""

    async def port_plugged(self, binding: NicBinding, nic: "VmNic") -> None:
        """A NIC was plugged into ``binding``'s bridge (VM start or hot-plug): label its port
        (OVS external_ids) so listings and repair know its VM and port group, add the port when
        the agent plugs it (``plugged_by="agent"``) and guard it against spoofing. Never raises:
        the periodic port repair catches up on what fails here."""

    async def port_unplugged(self, nic: "VmNic") -> None:
        """A NIC left its VM (hot-unplug): drop what network added for it (an agent-plugged
        OVS port, anti-spoofing rules). Never raises; the port repair sweeps what is left."""


# -- CPU and memory placement (host/placement) --------------------------------------------------


@dataclass(frozen=True)
class GuestNumaCell:
    id: int
    vcpus: tuple[int, ...]
    memory_mib: int
    #: Host node the cell's memory is bound to (numatune memnode), or None.
    host_node: int | None = None


@dataclass(frozen=True)
class PlacementPlan:
    #: vCPU -> host CPUs it may run on (one CPU each when dedicated).
    vcpu_pins: Mapping[int, tuple[int, ...]] = field(default_factory=dict)
    emulator_cpus: tuple[int, ...] = ()
    iothread_cpus: Mapping[int, tuple[int, ...]] = field(default_factory=dict)
    #: Host nodes memory comes from, and how strictly ("strict", "preferred", "interleave").
    memory_nodes: tuple[int, ...] = ()
    memory_mode: str = "strict"
    guest_cells: tuple[GuestNumaCell, ...] = ()
    #: Hugepage size backing guest memory, or None for normal pages.
    hugepage_kib: int | None = None
    dedicated: bool = False


class Placer(Protocol):
    """What compute needs from placement (implemented by host/placer.py's HostPlacer)."""

    def get(self, vm_uuid: str) -> Any:
        """The VM's current reservation, or None."""

    async def plan(self, vm_uuid: str, vcpus: int, memory_mib: int, *, dedicated: bool,
                   hugepages: bool, numa_cells: int) -> PlacementPlan:
        """Reserve host CPUs/memory for a VM; raise FailedPrecondition with the reason it does not fit."""

    async def release(self, vm_uuid: str) -> None: ...

    def placements(self) -> list[Any]:
        """Every reservation held (each has ``uuid``): start-up releases those of VMs that are
        not on this host any more (a crash between claiming and defining)."""


# -- views of the VMs (compute answers; storage, network and placement ask) --------------------


@dataclass(frozen=True)
class DiskUse:
    """One VM disk and what it uses: a volume id, or a SAN LUN as the VM's spec spells it."""

    vm_uuid: str
    volume: str = ""
    lun_datastore: str = ""
    lun_id: str = ""


@dataclass(frozen=True)
class VmNic:
    """One NIC of one VM, as the VM's definition (live XML when it runs) and spec say."""

    vm_uuid: str
    vm_name: str
    mac: str
    active: bool
    #: "bridge" for NICs on a Linux or OVS bridge; other libvirt interface types are listed too.
    type: str = "bridge"
    bridge: str = ""
    #: Host tap device ("" while the VM is stopped).
    device: str = ""
    #: The port group the spec put it in ("" for NICs the agent did not define).
    port_group: str = ""
    virtualport: str = ""
    interface_id: str = ""
    vlan: int | None = None
    trunk: tuple[int, ...] = ()
    link_up: bool = True
    inbound_kbps: int = 0
    outbound_kbps: int = 0
    #: Addresses the NIC may send from when its port group has ip_anti_spoofing (the spec's).
    ip_addresses: tuple[str, ...] = ()


class VmDisks(Protocol):
    async def disk_users(self) -> list[DiskUse]:
        """Every disk of every defined managed VM; raises when the VMs cannot be listed (a
        caller deciding "nobody uses it" must never conclude it from "nobody could be asked")."""


class VmNics(Protocol):
    async def vm_nics(self, vm_uuid: str = "") -> list[VmNic]:
        """Every NIC of every domain (or of one), live definitions for running VMs."""


class VmLocator(Protocol):
    async def locate(self, vm_uuid: str) -> tuple[str, str, int]:
        """(name, state, QEMU pid or 0) of a VM; LookupError / NotFound when it is gone."""


# -- per-VM reconcile (compute/reconcile.py runs the checks; each subsystem offers its own) -----


@dataclass(frozen=True)
class VmStatus:
    """A VM as the reconciler hands it to a check: identity and libvirt's state just read."""

    uuid: str
    name: str
    #: compute/state.py names: "running", "paused", "stopped", ...; reason e.g. "ioerror".
    state: str
    reason: str = ""


@dataclass(frozen=True)
class Finding:
    """One difference a per-VM check found between what should be and what is."""

    check: str
    vm_uuid: str
    problem: str
    repaired: bool = False
    action: str = ""


class VmCheck(Protocol):
    """One aspect of a VM that can drift from its desired state (its NICs' ports, its pinning,
    an I/O-error pause), compared and repaired for one VM at a time. Each check publishes its
    own events; the reconciler only schedules."""

    #: Short name for logs ("ports", "placement", "io-resume").
    name: str
    #: How often the timer runs it over every VM; 0 = only at start-up and on the VM's events.
    interval_s: float

    async def check_vm(self, vm: VmStatus) -> list[Finding]: ...


# -- live migration between agents (compute asks the destination agent) ------------------------


@dataclass(frozen=True)
class IncomingPlan:
    """What a destination answers to a prepared incoming migration (PrepareIncomingResponse)."""

    #: The destination's libvirt as the source's libvirtd dials it (peer-to-peer).
    libvirt_uri: str
    #: QEMU's migration stream target ("tcp://HOST[:PORT]"); "" = libvirt's choice.
    migrate_uri: str
    #: The domain definition for the destination host (its pins, paths, ports).
    domain_xml: str
    #: Seconds the destination keeps the preparation before aborting it itself.
    ttl_s: int


class MigrationPeer(Protocol):
    """The destination agent, as the source's migration sees it (api/peer.py implements it over
    gRPC with the agent's mutual-TLS identity). ``spec`` is compute's VmSpec; the VM returned by
    ``finish`` is compute's VmInfo as the destination reads it."""

    async def prepare(self, destination: str, migration_id: str, spec: Any, domain_xml: str,
                      source_host_uuid: str, *, post_copy: bool = False) -> IncomingPlan: ...

    async def finish(self, destination: str, migration_id: str, completed: bool) -> Any: ...

    async def abort(self, destination: str, migration_id: str, reason: str) -> None: ...



# -- cold migration: volume files between hosts (storage moves the bytes) -----------------------


@dataclass(frozen=True)
class FileIdentity:
    """What the source tells the destination about one disk file, so the destination can say
    whether it already sees the very same file (a shared datastore) or must receive a copy.

    Sameness is judged from facts a shared file system keeps identical for every client (NFS,
    CephFS, GPFS and a bind mount all report the same inode number, size and mtime) plus a
    hash of the file's first bytes; ``st_dev`` is left out on purpose (each NFS client numbers
    its mounts itself)."""

    size: int
    #: Bytes really allocated (st_blocks), for the space check; with a backing chain, the chain's
    #: sum (a flattened copy can hold all of it).
    allocated: int
    inode: int
    mtime_ns: int
    head_sha256: str
    #: A qcow2 with a backing file: copied flattened (storage/transfer.py says why).
    has_backing: bool = False


@dataclass(frozen=True)
class ReceivePlan:
    """The destination's answer for one file disk: where it lives there and whether it is copied."""

    path: str
    copy: bool


@dataclass(frozen=True)
class TransferChunk:
    """One piece of a volume stream: ``data`` at ``offset``; the last piece carries the digest
    of the whole stream (``sha256``, storage/transfer.py's sparse digest) and may have no data."""

    offset: int
    data: bytes
    sha256: str = ""


class VolumeTransfer(Protocol):
    """Moving a volume file to another host (implemented by storage/transfer.py's
    VolumeTransfers; the source reads, the destination receives)."""

    async def identify(self, path: str) -> FileIdentity: ...

    def send(self, path: str) -> Any:
        """An async iterator of TransferChunk (zero blocks skipped, the digest in the last one);
        its ``sent`` attribute counts the bytes of the file covered so far."""

    async def flatten(self, path: str) -> str:
        """A standalone temporary copy of a qcow2 with a backing chain (removed with remove())."""

    async def plan_receive(self, volumes: list[tuple[str, FileIdentity, str]]) -> list[ReceivePlan]:
        """For each (volume id, the source's identity, field): shared (the same file is here),
        or a copy target (free name, enough space on its datastore); refused naming the field."""

    async def receive(self, path: str, size: int, chunks: Any) -> int:
        """Write the stream to a temporary name next to ``path``, check the digest, then link it
        into place; nothing is left at either name on failure. Returns the bytes written."""

    async def remove(self, path: str) -> None: ...


class ColdMigrationPeer(Protocol):
    """The destination agent as a cold migration's source sees it (api/peer.py over gRPC).
    ``disks``: spec disk index -> the source's identity of its file."""

    async def prepare_cold(self, destination: str, migration_id: str, spec: Any, disks: Mapping[int, FileIdentity],
                           source_host_uuid: str) -> dict[int, ReceivePlan]: ...

    async def push_volume(self, destination: str, migration_id: str, disk_index: int, size: int, chunks: Any) -> int:
        """Stream ``chunks`` (an async iterator of TransferChunk) as disk ``disk_index``."""

    async def finish_cold(self, destination: str, migration_id: str) -> Any: ...

    async def abort_cold(self, destination: str, migration_id: str, reason: str) -> None: ...


# -- host admission (compute asks before a VM starts to use this host) ------------------------


class HostAdmission(Protocol):
    """Whether this host takes new VMs now (compute/maintenance.py's MaintenanceMode implements
    it). Compute asks before it creates a VM, starts a stopped one, or prepares an incoming
    migration: a host in maintenance refuses those while its running VMs keep running."""

    def check_admission(self, what: str, *, field: str) -> None:
        """Raise FailedPrecondition(field=...) naming maintenance when the host takes no new VMs;
        ``what`` says what was refused ("a new VM", "starting vm 'web1'")."""
