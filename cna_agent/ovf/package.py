"""OVF packages on disk: an OVA (one tar file) or an .ovf descriptor beside its files, with the
optional manifest (.mf) of digests.

Decisions, and why:

* **An OVA is read in place.** Its members are stored whole and uncompressed (ustar), so a disk
  inside it is the byte range (offset, size) of the .ova; qemu-img reads that range through
  QEMU's raw driver (contracts.ImageSource) and nothing is extracted first: no second copy of
  a 100 GiB appliance, no scratch space.
* **Members are checked before anything is read**: regular files only (a link, device or
  directory entry is refused: tar links are how archives write outside their directory), each
  name a plain relative path, no name twice, at most MAX_MEMBERS.
* **The manifest is checked when present** (SHA1, SHA256 or SHA512 per file, as VMware's
  ovftool writes them): every file it lists must be in the package and match. A package
  without a manifest is imported and the import says so.
"""

from __future__ import annotations

import hashlib
import os
import re
import tarfile
import time
from dataclasses import dataclass
from typing import BinaryIO, Callable, Iterable

from cna_agent.ovf.descriptor import DescriptorError, check_href

MAX_MEMBERS = 1000
READ_BLOCK = 4 << 20
_MF_LINE = re.compile(r"^(SHA1|SHA256|SHA512)\((.+)\)\s*=\s*([0-9A-Fa-f]+)\s*$")


@dataclass(frozen=True)
class Member:
    """A file of the package: the bytes [offset, offset+size) of ``path``."""

    name: str
    path: str
    offset: int
    size: int


@dataclass
class Package:
    kind: str  # "ova" or "ovf"
    path: str  # the .ova, or the .ovf
    descriptor: str  # the .ovf member's name
    members: dict[str, Member]

    def find(self, name: str) -> Member | None:
        """The member named ``name``; for an .ovf, a regular file of that name under its
        directory (symlinks resolved, never leaving it)."""
        m = self.members.get(name)
        if m is not None or self.kind != "ovf":
            return m
        check_href(name, "file reference")
        root = os.path.realpath(os.path.dirname(self.path))
        full = os.path.realpath(os.path.join(root, name))
        if not full.startswith(root + "/") or not os.path.isfile(full):
            return None
        m = Member(name, full, 0, os.path.getsize(full))
        self.members[name] = m
        return m

    def read(self, name: str, limit: int) -> bytes:
        m = self.member(name)
        if m.size > limit:
            raise DescriptorError(f"{name} is {m.size} bytes; at most {limit} are read")
        with open(m.path, "rb") as f:
            f.seek(m.offset)
            return f.read(m.size)

    @property
    def manifest_name(self) -> str:
        return os.path.splitext(self.descriptor)[0] + ".mf"

    def member(self, href: str) -> Member:
        m = self.find(href)
        if m is None:
            raise DescriptorError(f"the descriptor references {href!r}, which is not in the package")
        return m


def open_ova(path: str) -> Package:
    members: dict[str, Member] = {}
    try:
        with tarfile.open(path, mode="r:") as tar:
            for n, info in enumerate(tar):
                if n >= MAX_MEMBERS:
                    raise DescriptorError(f"the OVA has more than {MAX_MEMBERS} members")
                if info.isdir():
                    continue
                if not info.isreg():
                    raise DescriptorError(f"the OVA's member {info.name!r} is a link or special file; only regular files "
                                          "are read")
                name = check_href(info.name.removeprefix("./"), "OVA member")
                if name in members:
                    raise DescriptorError(f"the OVA holds {name!r} twice")
                if info.sparse is not None:
                    raise DescriptorError(f"the OVA's member {name!r} is a GNU sparse file; OVF packages store files whole")
                members[name] = Member(name=name, path=path, offset=info.offset_data, size=info.size)
    except tarfile.ReadError as exc:
        raise DescriptorError(f"not an OVA (an uncompressed tar archive): {exc}") from None
    descriptors = [n for n in members if n.lower().endswith(".ovf")]
    if len(descriptors) != 1:
        raise DescriptorError(f"an OVA holds exactly one .ovf descriptor; this one holds {len(descriptors)}")
    return Package(kind="ova", path=path, descriptor=descriptors[0], members=members)


def open_ovf(path: str) -> Package:
    """An .ovf with its files beside it (hrefs relative to its directory, never leaving it)."""
    name = os.path.basename(path)
    return Package(kind="ovf", path=path, descriptor=name, members={name: Member(name, path, 0, os.path.getsize(path))})


def open_package(path: str) -> Package:
    if path.lower().endswith(".ova"):
        return open_ova(path)
    if path.lower().endswith(".ovf"):
        return open_ovf(path)
    raise DescriptorError(f"{os.path.basename(path)!r} is neither an .ova nor an .ovf")


# -- manifest ------------------------------------------------------------------------------------


def parse_manifest(text: str) -> dict[str, tuple[str, str]]:
    """file name -> (algorithm, hex digest)."""
    out: dict[str, tuple[str, str]] = {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        m = _MF_LINE.match(line.strip())
        if not m:
            raise DescriptorError(f"manifest line {n} is not 'SHA256(file)= digest': {line[:80]!r}")
        out[m.group(2)] = (m.group(1), m.group(3).lower())
    return out


def digest(member: Member, algorithm: str, on_bytes: Callable[[int], None] = lambda n: None) -> str:
    h = hashlib.new(algorithm.lower())
    with open(member.path, "rb") as f:
        f.seek(member.offset)
        left = member.size
        while left:
            chunk = f.read(min(READ_BLOCK, left))
            if not chunk:
                raise DescriptorError(f"{member.name} ends {left} bytes early")
            h.update(chunk)
            left -= len(chunk)
            on_bytes(len(chunk))
    return h.hexdigest()


def verify_manifest(pkg: Package, on_bytes: Callable[[int], None] = lambda n: None) -> int | None:
    """None without a manifest; else the number of files it vouched for. DescriptorError on
    a digest that does not match or a listed file that is missing."""
    name = pkg.manifest_name
    if pkg.find(name) is None:
        return None
    entries = parse_manifest(pkg.read(name, 1 << 20).decode("utf-8", "replace"))
    for fname, (algo, want) in entries.items():
        m = pkg.find(fname)
        if m is None:
            raise DescriptorError(f"the manifest lists {fname!r}, which is not in the package")
        got = digest(m, algo, on_bytes)
        if got != want:
            raise DescriptorError(f"{fname}: {algo} {got[:16]}... does not match the manifest's {want[:16]}... "
                                  "(a damaged or altered package)")
    return len(entries)


def manifest_text(files: Iterable[tuple[str, str]]) -> bytes:
    """A manifest of SHA256 digests for (name, path) pairs."""
    lines = []
    for name, path in files:
        m = Member(name, path, 0, os.path.getsize(path))
        lines.append(f"SHA256({name})= {digest(m, 'sha256')}\n")
    return "".join(lines).encode()


# -- writing an OVA ---------------------------------------------------------------------------------


def write_ova(out: BinaryIO, files: list[tuple[str, str]], on_bytes: Callable[[int], None] = lambda n: None) -> None:
    """An ustar archive of (name, path) in the given order (the descriptor first, as OVF asks),
    each file's data copied in READ_BLOCK pieces."""
    now = int(time.time())
    with tarfile.open(fileobj=out, mode="w:", format=tarfile.USTAR_FORMAT) as tar:
        for name, path in files:
            info = tarfile.TarInfo(name=name)
            info.size = os.path.getsize(path)
            info.mode, info.mtime, info.uname, info.gname = 0o644, now, "root", "root"
            with open(path, "rb") as f:
                tar.addfile(info, _Counting(f, on_bytes))


class _Counting:
    """A reader that reports what tarfile copied."""

    def __init__(self, f: BinaryIO, on_bytes: Callable[[int], None]) -> None:
        self.f, self.on_bytes = f, on_bytes

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.on_bytes(len(data))
        return data
