"""A hibernated VM's state on a datastore: the memory image, what a host needs to restore it,
and who took it.

Why on a datastore and not in the agent's state directory: a VM whose disks are shared must be
resumable on any host that sees them (VDSM keeps hibernation volumes on shared storage for the
same reason), so its RAM goes where its disks are. Layout, under the datastore's state area
(storage's ``DiskProvider.state_area``, ``<root>/.cna-state``: hidden from volume listings,
never addressable as a volume)::

    hibernate/<vm uuid>/<token>/memory.save   libvirt's save image (virDomainSaveFlags)
                               /state.json    SavedState: spec, persistent XML, who saved it
                               /nvram.fd      the UEFI variable store, when the VM has one
                               /claim         hard-linked into place by the host that resumes it

``token`` is new for each hibernation, so a later hibernation of the same VM never meets an
old claim. Exactly one host resumes a state: the claim is hard-linked into place (atomic on
local file systems and on NFS), and the host that saved it learns from the claim that its own
copy is gone (hibernate.py's hand-off check). After a resume elsewhere the image and the record
are removed and only the claim stays, until the saving host has read it.

Everything here blocks (it is file I/O on a datastore that may hang): callers run it in a pool.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import time
from dataclasses import asdict, dataclass
from xml.etree import ElementTree as ET

import libvirt

from cna_agent.compute.marks import read_config_metadata, write_metadata
from cna_agent.errors import FailedPrecondition, NotFound

HIBERNATE_NS = "https://cna-agent.org/xmlns/hibernate/1.0"
HIBERNATE_KEY = "hib"
RECORD_VERSION = 1
MEMORY, RECORD, NVRAM, CLAIM = "memory.save", "state.json", "nvram.fd", "claim"


@dataclass(frozen=True)
class HibernateMark:
    """In the saving host's persistent definition: the VM is hibernated, its state is there."""

    datastore: str
    token: str
    saved_at: float

    def to_xml(self) -> str:
        el = ET.Element("hibernated")
        el.set("datastore", self.datastore)
        el.set("token", self.token)
        el.set("saved", f"{self.saved_at:.3f}")
        return ET.tostring(el, encoding="unicode")

    @classmethod
    def from_xml(cls, text: str) -> "HibernateMark | None":
        try:
            el = ET.fromstring(text)
            mark = cls(el.get("datastore", ""), el.get("token", ""), float(el.get("saved", "0")))
        except (ET.ParseError, ValueError):
            return None
        return mark if mark.datastore and check_token(mark.token) else None


def read_mark(dom: libvirt.virDomain) -> HibernateMark | None:
    text = read_config_metadata(dom, HIBERNATE_NS)
    return HibernateMark.from_xml(text) if text is not None else None


def write_mark(dom: libvirt.virDomain, mark: HibernateMark | None) -> None:
    write_metadata(dom, HIBERNATE_NS, HIBERNATE_KEY, mark.to_xml() if mark else None)


def new_token() -> str:
    """Sortable by time (the newest state of a VM is found first), unique by its random tail."""
    return f"{int(time.time() * 1000):013d}-{secrets.token_hex(4)}"


def check_token(token: str) -> bool:
    head, _, tail = token.partition("-")
    return len(head) == 13 and head.isdigit() and len(tail) == 8 and all(c in "0123456789abcdef" for c in tail)


@dataclass(frozen=True)
class SavedState:
    """state.json: what any host needs, besides the image, to bring the VM back."""

    uuid: str
    name: str
    #: The agent's spec (VmSpec.to_json): the restoring host renders its own bindings from it.
    spec_json: str
    #: The persistent definition when it was saved (guest ABI, device addresses), without marks.
    config_xml: str
    datastore: str
    token: str
    saved_at: float
    source_host: str
    #: The guest was paused when saved (it is restored paused then).
    paused: bool
    memory_bytes: int = 0
    version: int = RECORD_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "SavedState":
        raw = json.loads(text)
        if raw.get("version") != RECORD_VERSION:
            raise ValueError(f"state record version {raw.get('version')!r} is not {RECORD_VERSION}")
        return cls(**{k: raw[k] for k in cls.__dataclass_fields__ if k in raw})


@dataclass(frozen=True)
class StatePaths:
    """One hibernation's files (``root`` is the token directory)."""

    root: str

    @property
    def memory(self) -> str:
        return os.path.join(self.root, MEMORY)

    @property
    def record(self) -> str:
        return os.path.join(self.root, RECORD)

    @property
    def nvram(self) -> str:
        return os.path.join(self.root, NVRAM)

    @property
    def claim(self) -> str:
        return os.path.join(self.root, CLAIM)


def vm_dir(area: str, uuid: str) -> str:
    return os.path.join(area, "hibernate", uuid)


def paths_for(area: str, uuid: str, token: str) -> StatePaths:
    return StatePaths(os.path.join(vm_dir(area, uuid), token))


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(path))


def prepare(paths: StatePaths) -> None:
    """Make the token directory (0700: the image holds the guest's RAM)."""
    os.makedirs(os.path.dirname(paths.root), mode=0o700, exist_ok=True)  # .cna-state/hibernate/<uuid>
    os.mkdir(paths.root, 0o700)


def write_record(paths: StatePaths, state: SavedState) -> None:
    _write_atomic(paths.record, state.to_json().encode())


def read_record(paths: StatePaths) -> SavedState:
    try:
        with open(paths.record, encoding="utf-8") as fh:
            return SavedState.from_json(fh.read())
    except FileNotFoundError:
        raise NotFound(f"no hibernation record at {paths.root}", field="vm") from None
    except (ValueError, TypeError, KeyError) as exc:
        raise FailedPrecondition(f"the hibernation record {paths.record} is unreadable: {exc}", field="vm") from None


def copy_nvram(src: str, dst: str) -> None:
    shutil.copyfile(src, dst)
    os.chmod(dst, 0o600)


@dataclass(frozen=True)
class Claim:
    host: str
    operation_id: str
    at: float


def claim_holder(paths: StatePaths) -> Claim | None:
    try:
        with open(paths.claim, encoding="utf-8") as fh:
            raw = json.load(fh)
        return Claim(str(raw.get("host", "")), str(raw.get("operation_id", "")), float(raw.get("at", 0)))
    except FileNotFoundError:
        return None
    except (ValueError, OSError):
        return Claim("?", "", 0.0)  # unreadable (a damaged file system?): taken all the same


def take_claim(paths: StatePaths, host: str, operation_id: str) -> Claim:
    """Claim the state for ``host``; the holder when another host has it already (a claim of
    this host's own, an earlier attempt of a resume, is this host's again).

    The claim is written whole to a file of this host's own and then hard-linked to its name:
    link() fails when the name exists, atomically (also on NFS, where it is the classic lock),
    so no host ever reads a claim that is created but not yet written."""
    claimed = Claim(host, operation_id, time.time())
    body = json.dumps({"host": host, "operation_id": operation_id, "at": claimed.at}).encode()
    tmp = f"{paths.claim}.{secrets.token_hex(8)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, body)
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(tmp, paths.claim)
    except FileExistsError:
        holder = claim_holder(paths)
        return holder if holder is not None else take_claim(paths, host, operation_id)
    finally:
        os.unlink(tmp)
    _fsync_dir(paths.root)
    return claimed


def drop_claim(paths: StatePaths, host: str) -> None:
    """Give up this host's claim (a resume that failed: the state can be resumed again)."""
    holder = claim_holder(paths)
    if holder is not None and holder.host == host:
        os.unlink(paths.claim)


def discard_image(paths: StatePaths) -> None:
    """After a resume elsewhere: the image and the record go, the claim stays for the saver."""
    for p in (paths.memory, paths.nvram, paths.record):
        try:
            os.unlink(p)
        except FileNotFoundError:
            pass


def discard(paths: StatePaths) -> None:
    """The whole hibernation (and the VM's directory when it was the last one)."""
    shutil.rmtree(paths.root, ignore_errors=True)
    try:
        os.rmdir(os.path.dirname(paths.root))
    except OSError:
        pass  # another hibernation's claim still there, or already gone


def resumable(area: str, uuid: str) -> list[tuple[StatePaths, SavedState]]:
    """The VM's unclaimed, complete states on this datastore, newest first."""
    try:
        tokens = sorted((t for t in os.listdir(vm_dir(area, uuid)) if check_token(t)), reverse=True)
    except FileNotFoundError:
        return []
    out = []
    for token in tokens:
        paths = paths_for(area, uuid, token)
        if os.path.exists(paths.claim) or not os.path.isfile(paths.memory):
            continue
        try:
            out.append((paths, read_record(paths)))
        except (NotFound, FailedPrecondition):
            continue
    return out


def free_bytes(path: str) -> int:
    """Free bytes for ``path``'s file system (its nearest existing parent: the area may not
    exist yet)."""
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize
