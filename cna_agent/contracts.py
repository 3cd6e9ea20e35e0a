"""What a VM's devices bind to on this host: the seams between compute and the other subsystems.

The VM spec names host resources abstractly (a volume "ds1/vm1/root.qcow2", a SAN LUN, a
port group "pg-web", "dedicated CPUs"). Storage, network and placement each turn those names
into a *binding*: plain data saying exactly what libvirt must be told (a file path or an iSCSI
target, a bridge and VLAN, a vCPU-to-pCPU map). Compute's domain XML builder renders bindings
and knows nothing about datastores, OVSDB or NUMA planning; the other subsystems never build
XML. Each resolver is a Protocol so compute can be tested with the simple local resolvers and
the real subsystems plug in through the daemon's components.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Mapping, Protocol


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


class DiskResolver(Protocol):
    async def resolve_volume(self, volume_id: str, *, field: str) -> DiskSourceBinding:
        """Bind "datastore/relative/path"; raise InvalidArgument(field, ...) / NotFound."""

    async def resolve_lun(self, datastore: str, lun_id: str, *, field: str) -> DiskSourceBinding:
        """Bind a SAN LUN (log in / scan as needed)."""

    async def release_lun(self, datastore: str, lun_id: str, *, field: str, vm: str = "") -> "LunRelease":
        """Undo resolve_lun's host-side attach once a LUN disk left a VM (VM undefined, disk
        detached), unless another defined VM still uses the LUN.

        Called after the VM change is done in libvirt, so SAN trouble never raises: the
        resolver reports it (event, log), keeps the release owed and retries it later. Only
        bad input (unknown datastore, malformed lun_id) raises, naming ``field``.
        """


#: What release_lun did with the host's devices for a LUN:
#: "released"   multipath map, SCSI paths and, for a target's last LUN, the iSCSI session removed;
#: "in-use"     another defined VM uses the same LUN (multi-attach): kept;
#: "absent"     nothing of it is attached on this host;
#: "not-needed" QEMU's own initiator (libiscsi) holds the session: no host state to remove;
#: "deferred"   resolve_lun attached it moments ago for a VM being defined: retried later;
#: "failed"     the release failed or ran past its deadline: reported, retried later.
LunRelease = Literal["released", "in-use", "absent", "not-needed", "deferred", "failed"]


# -- NICs (network) ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Bandwidth:
    average_kbps: int = 0
    peak_kbps: int = 0
    burst_kib: int = 0


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
    #: libvirt nwfilter to apply (e.g. "clean-traffic" for MAC/IP anti-spoofing), or "".
    filter: str = ""
    filter_params: Mapping[str, str] = field(default_factory=dict)
    mtu: int = 0


class NicResolver(Protocol):
    async def resolve_port_group(self, port_group: str, *, field: str) -> NicBinding:
        """Bind a port group name; raise InvalidArgument(field, ...) when unknown."""


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
    async def plan(self, vm_uuid: str, vcpus: int, memory_mib: int, *, dedicated: bool,
                   hugepages: bool, numa_cells: int) -> PlacementPlan:
        """Reserve host CPUs/memory for a VM; raise FailedPrecondition with the reason it does not fit."""

    async def release(self, vm_uuid: str) -> None: ...
