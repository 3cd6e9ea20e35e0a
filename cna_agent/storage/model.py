"""Datastore declarations and the one validator they go through.

Why one validator: datastores come from agent.toml today (``[storage.datastores.NAME]``) and
may come from the VRM later; both must be refused the same way before anything on the host is
touched (a portal that is not host:port would reach iscsiadm, a CHAP secret file that is
world-readable leaks the password, an FC WWN with a typo would scan for nothing). Errors are
InvalidArgument naming the field as the caller spelled it ("storage.datastores.san1.portals[0]").
"""

from __future__ import annotations

import ipaddress
import os
import re
import stat
from dataclasses import dataclass, replace
from typing import Iterable

from cna_agent.errors import InvalidArgument

#: Names become file names (probe files, secret usage ids) and parts of volume ids.
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
TYPES = ("dir", "iscsi", "fc")
INITIATORS = ("libiscsi", "kernel")
#: RFC 3720 names: iqn.YYYY-MM.reversed.domain[:unique] or eui.<16 hex>; naa.<16|32 hex>.
IQN_RE = re.compile(r"^(iqn\.\d{4}-\d{2}\.[a-z0-9][a-z0-9.-]*(:[A-Za-z0-9:._-]+)?|eui\.[0-9a-fA-F]{16}|naa\.([0-9a-fA-F]{16}|[0-9a-fA-F]{32}))$")
#: FC port names: 16 hex digits, with or without colons / 0x.
WWPN_RE = re.compile(r"^(0x)?[0-9a-fA-F]{16}$")
#: SCSI LUN WWNs as udev spells them under /dev/disk/by-id (NAA 16 or 32 hex, optional
#: leading "3" NAA designator type as in scsi-3600...).
WWN_RE = re.compile(r"^3?[0-9a-fA-F]{16}([0-9a-fA-F]{16})?$")
CHAP_USER_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:@-]{0,255}$")
DEFAULT_ISCSI_PORT = 3260


@dataclass(frozen=True)
class DatastoreDecl:
    name: str
    #: "dir" (a local or mounted directory), "iscsi" (LUNs of one target) or "fc".
    type: str = "dir"
    #: dir: absolute directory holding the volumes.
    path: str = ""
    #: iscsi: "host[:port]" portals of the target (several = several paths).
    portals: tuple[str, ...] = ()
    target_iqn: str = ""
    #: iscsi: "libiscsi" (QEMU's own initiator, no host block device) or "kernel".
    initiator: str = "libiscsi"
    #: iscsi CHAP: user name and a root-only file holding the secret (never in agent.toml).
    chap_user: str = ""
    chap_secret_file: str = ""
    #: fc: array target port WWPNs (informational/zoning) and the LUN WWNs of this datastore.
    target_wwpns: tuple[str, ...] = ()
    lun_wwns: tuple[str, ...] = ()
    #: Seconds a login / scan may take before the LUN is reported missing.
    scan_timeout_s: float = 30.0
    #: kernel iSCSI: seconds a lost session may take to come back before the kernel fails its
    #: I/O (node.session.timeo.replacement_timeout; iscsid's default is 120). With multipath
    #: this is how fast a dead path is given up; without it, how long a guest waits before
    #: QEMU sees EIO and pauses it (error_policy=stop) instead of hanging.
    replacement_timeout_s: int = 15

    def portal_hosts(self) -> tuple[tuple[str, int], ...]:
        return tuple(parse_portal(p, "portals") for p in self.portals)


def parse_portal(value: str, field: str) -> tuple[str, int]:
    """"host", "host:port" or "[v6]:port" -> (host, port)."""
    host, port = value, DEFAULT_ISCSI_PORT
    if value.startswith("["):
        inner, sep, rest = value[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise InvalidArgument(field, f"{value!r} is not [address]:port")
        host = inner
        if rest:
            port = _port(rest[1:], value, field)
    elif value.count(":") == 1:
        host, p = value.split(":")
        port = _port(p, value, field)
    if not host or not re.fullmatch(r"[A-Za-z0-9.:-]+", host) or host.startswith("-"):
        raise InvalidArgument(field, f"{value!r}: host must be an address or a DNS name")
    if ":" in host:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise InvalidArgument(field, f"{value!r}: IPv6 portals are written [address]:port") from None
    return host, port


def _port(text: str, value: str, field: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise InvalidArgument(field, f"{value!r}: port must be 1..65535")
    return int(text)


def normalise_wwn(value: str) -> str:
    """Lower-case, no colons/0x; the leading NAA designator "3" of by-id names dropped."""
    v = value.lower().replace(":", "")
    v = v.removeprefix("0x")
    if len(v) in (17, 33) and v.startswith("3"):
        v = v[1:]
    return v


def validate_datastore(d: DatastoreDecl, prefix: str) -> DatastoreDecl:
    """Check one declaration; return it normalised. ``prefix`` is how the caller names it."""

    def f(key: str) -> str:
        return f"{prefix}.{key}"

    if not NAME_RE.match(d.name):
        raise InvalidArgument(prefix, f"datastore name {d.name!r} must be 1-64 of A-Z a-z 0-9 _ . - and start with a letter or digit")
    if d.type not in TYPES:
        raise InvalidArgument(f("type"), f"{d.type!r} is not one of {', '.join(TYPES)}")
    if not 0 < d.scan_timeout_s <= 3600:
        raise InvalidArgument(f("scan_timeout_s"), f"{d.scan_timeout_s} is not in (0, 3600]")
    if not 1 <= d.replacement_timeout_s <= 3600:
        raise InvalidArgument(f("replacement_timeout_s"), f"{d.replacement_timeout_s} is not in [1, 3600]")
    if d.type == "dir":
        if not d.path or not os.path.isabs(d.path):
            raise InvalidArgument(f("path"), f"{d.path!r} must be an absolute directory")
        if "\x00" in d.path or ".." in d.path.split("/"):
            raise InvalidArgument(f("path"), "must not contain '..' or NUL")
        for key in ("portals", "target_iqn", "target_wwpns", "lun_wwns", "chap_user", "chap_secret_file"):
            if getattr(d, key):
                raise InvalidArgument(f(key), "only iscsi/fc datastores take this key")
        return replace(d, path=os.path.normpath(d.path))
    if d.path:
        raise InvalidArgument(f("path"), "only dir datastores take a path")
    if d.type == "iscsi":
        if not d.portals:
            raise InvalidArgument(f("portals"), "an iscsi datastore needs at least one portal (host[:port])")
        for i, p in enumerate(d.portals):
            parse_portal(p, f(f"portals[{i}]"))
        if not IQN_RE.match(d.target_iqn):
            raise InvalidArgument(f("target_iqn"), f"{d.target_iqn!r} is not an iSCSI name (iqn.YYYY-MM.domain[:id], eui.<16 hex>)")
        if d.initiator not in INITIATORS:
            raise InvalidArgument(f("initiator"), f"{d.initiator!r} is not one of {', '.join(INITIATORS)}")
        if bool(d.chap_user) != bool(d.chap_secret_file):
            key = "chap_secret_file" if d.chap_user else "chap_user"
            raise InvalidArgument(f(key), "chap_user and chap_secret_file must be set together")
        if d.chap_user and not CHAP_USER_RE.match(d.chap_user):
            raise InvalidArgument(f("chap_user"), f"{d.chap_user!r} has characters CHAP names do not allow")
        if d.chap_secret_file and not os.path.isabs(d.chap_secret_file):
            raise InvalidArgument(f("chap_secret_file"), f"{d.chap_secret_file!r} must be an absolute path")
        if d.target_wwpns or d.lun_wwns:
            key = "target_wwpns" if d.target_wwpns else "lun_wwns"
            raise InvalidArgument(f(key), "only fc datastores take this key")
        return d
    # fc
    if d.portals or d.target_iqn or d.chap_user or d.chap_secret_file:
        raise InvalidArgument(f("portals" if d.portals else "target_iqn"), "only iscsi datastores take this key")
    if not d.target_wwpns and not d.lun_wwns:
        raise InvalidArgument(f("lun_wwns"), "an fc datastore needs lun_wwns (and usually target_wwpns)")
    for i, w in enumerate(d.target_wwpns):
        if not WWPN_RE.match(w.replace(":", "")):
            raise InvalidArgument(f(f"target_wwpns[{i}]"), f"{w!r} is not a WWPN (16 hex digits)")
    for i, w in enumerate(d.lun_wwns):
        if not WWN_RE.match(w.replace(":", "").removeprefix("0x")):
            raise InvalidArgument(f(f"lun_wwns[{i}]"), f"{w!r} is not a LUN WWN (16 or 32 hex digits)")
    return replace(d, target_wwpns=tuple(normalise_wwn(w) for w in d.target_wwpns),
                   lun_wwns=tuple(normalise_wwn(w) for w in d.lun_wwns))


def validate_all(decls: Iterable[DatastoreDecl], prefix: str) -> dict[str, DatastoreDecl]:
    out: dict[str, DatastoreDecl] = {}
    for d in decls:
        if d.name in out:
            raise InvalidArgument(f"{prefix}.{d.name}", "declared twice")
        out[d.name] = validate_datastore(d, f"{prefix}.{d.name}")
    return out


def check_secret_file(path: str, field: str) -> str:
    """Read a CHAP secret; refuse files others can read (the secret would be shared)."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise InvalidArgument(field, f"{path}: {exc.strerror}") from None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise InvalidArgument(field, f"{path} is readable by group/others (mode {stat.S_IMODE(st.st_mode):o}); chmod 600 it")
    with open(path, encoding="utf-8") as fh:
        secret = fh.read().strip()
    if not secret or len(secret) > 255 or any(ord(c) < 32 for c in secret):
        raise InvalidArgument(field, f"{path} must hold one line with a 1-255 character secret")
    return secret
