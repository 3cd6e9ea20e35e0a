"""iSCSI LUNs through QEMU's own initiator (libiscsi): no host block device, no kernel SCSI.

The guest's disk is ``<disk type='network'><source protocol='iscsi' name='IQN/LUN'>`` with the
datastore's portals as hosts; QEMU logs in itself. The agent only needs to list the target's
LUNs and their sizes: ``iscsi-ls`` enumerates them (it has no machine-readable mode, so only
its fixed "Lun:N Type:T" lines are read) and ``qemu-img info --output=json iscsi://...`` gives
the exact size. CHAP credentials reach libiscsi through its LIBISCSI_CHAP_USERNAME /
LIBISCSI_CHAP_PASSWORD environment variables, never the command line (``ps`` shows argv);
for guests, libvirt holds the password as a private secret (cna_agent.storage.secrets).
qemu-img echoes the credentials it used in its JSON ``filename`` (``"password": ...``), so of
its output only the size is kept, and no output of these tools goes into a message.

A target that refuses the login (wrong CHAP secret, CHAP required but not configured, an ACL
that does not admit this initiator) is a FAILED_PRECONDITION naming the datastore's config keys
to fix, not a missing LUN: libiscsi reports it as "Status: Authentication failure(513)" (login
status 0x0201, RFC 7143) or "Authorization failure(514)" (0x0202).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

from cna_agent.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable
from cna_agent.storage import qemuimg
from cna_agent.storage.model import DatastoreDecl
from cna_agent.storage.runner import CommandError, CommandRunner

log = logging.getLogger(__name__)
LUN_LINE = re.compile(r"^Lun:(\d+)\s+Type:(\S+)", re.M)
LOGIN_REFUSED = re.compile(r"Status: (Authentication|Authorization) failure\(\d+\)")
MAX_LUN = 16383


@dataclass(frozen=True)
class LibiscsiLun:
    id: str  # "<iqn>/<lun>"
    lun: int
    size_bytes: int
    type: str = "DIRECT_ACCESS"


def portal_url(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def lun_url(decl: DatastoreDecl, lun: int, portal: int = 0) -> str:
    host, port = decl.portal_hosts()[portal]
    return f"iscsi://{portal_url(host, port)}/{decl.target_iqn}/{lun}"


def chap_env(decl: DatastoreDecl, secret: str) -> dict[str, str]:
    if not decl.chap_user:
        return {}
    return {"LIBISCSI_CHAP_USERNAME": decl.chap_user, "LIBISCSI_CHAP_PASSWORD": secret}


def login_refused(decl: DatastoreDecl, output: str, *, field: str = "") -> FailedPrecondition | None:
    """The error for a login the target refused (module docstring), or None for other failures."""
    m = LOGIN_REFUSED.search(output)
    if m is None:
        return None
    key = f"storage.datastores.{decl.name}"
    host, port = decl.portal_hosts()[0]
    if m.group(1) == "Authorization":
        fix = "the target's ACL does not admit this host's initiator name; allow it on the array"
    elif decl.chap_user:
        fix = (f"the target rejected CHAP user {decl.chap_user!r}: check {key}.chap_user and the secret in "
               f"{key}.chap_secret_file")
    else:
        fix = f"the target requires CHAP: set {key}.chap_user and {key}.chap_secret_file"
    where = f"{field}: " if field else ""
    return FailedPrecondition(f"{where}datastore {decl.name!r}: iSCSI login to {decl.target_iqn} at "
                              f"{portal_url(host, port)} refused ({m.group(0)}); {fix}", field=field)


def _run(runner: CommandRunner, decl: DatastoreDecl, argv: list[str], *, secret: str, timeout: float, field: str = "") -> str:
    """Run an iscsi-ls / qemu-img command with the CHAP environment; a refused login is reported
    as such (login_refused)."""
    try:
        return runner.run(argv, timeout=timeout, env=chap_env(decl, secret)).stdout
    except CommandError as exc:
        refused = login_refused(decl, exc.result.stderr + exc.result.stdout, field=field)
        if refused is not None:
            raise refused from None
        raise


def parse_lun_id(decl: DatastoreDecl, lun_id: str, field: str) -> int:
    """Accept "<lun>" or "<target iqn>/<lun>" (the iqn must be the datastore's)."""
    iqn, sep, num = lun_id.rpartition("/")
    if sep and iqn != decl.target_iqn:
        raise InvalidArgument(field, f"{lun_id!r}: datastore {decl.name!r} serves target {decl.target_iqn}, not {iqn}")
    if not num.isdigit() or int(num) > MAX_LUN:
        raise InvalidArgument(field, f"{lun_id!r} is not a LUN number 0..{MAX_LUN} (or '<iqn>/<lun>')")
    return int(num)


class ListingBlocked(FailedPrecondition):
    """iscsi-ls stopped at another target before it reached the datastore's (_target_luns)."""


def _sections(out: str) -> dict[str, list[tuple[int, str]]]:
    """iscsi-ls -s output: target IQN -> [(LUN, type)], in the order iscsi-ls printed them."""
    sections: dict[str, list[tuple[int, str]]] = {}
    current = None
    for line in out.splitlines():
        if line.startswith("Target:"):
            current = sections.setdefault(line.split()[0].removeprefix("Target:"), [])
            continue
        m = LUN_LINE.match(line)
        if m and current is not None:
            current.append((int(m.group(1)), m.group(2)))
    return sections


def _target_luns(runner: CommandRunner, decl: DatastoreDecl, *, initiator_iqn: str, secret: str,
                 timeout: float) -> list[tuple[int, str]]:
    """(LUN, type) of the datastore's target, as ``iscsi-ls -s`` reports them after logging in.

    ``iscsi-ls -s`` logs in to every target the portal offers, in discovery order, and stops at
    the first one that refuses this initiator (another tenant's CHAP account or ACL), exit 10.
    The target it stopped at is the last one printed, so the datastore's LUNs are still known
    when its target came before; only when it is the one refused, or was never reached, does
    the listing fail.
    """
    argv = ["iscsi-ls", "-s"]  # -s: log in and list the LUNs of each target
    if initiator_iqn:
        argv += ["-i", initiator_iqn]
    host, port = decl.portal_hosts()[0]
    argv.append(f"iscsi://{portal_url(host, port)}")
    try:
        out = runner.run(argv, timeout=timeout, env=chap_env(decl, secret)).stdout
    except CommandError as exc:
        out = exc.result.stdout  # iscsi-ls prints its errors there too, after the target's line
        sections = _sections(out)
        stopped_at = list(sections)[-1] if sections else ""
        why = (out.rsplit("Target:", 1)[-1].split("\n", 1)[-1] + exc.result.stderr).strip()
        if decl.target_iqn not in sections or stopped_at == decl.target_iqn:
            refused = login_refused(decl, why) if stopped_at == decl.target_iqn else None
            if refused is not None:
                raise refused from None
            if stopped_at and stopped_at != decl.target_iqn:
                raise ListingBlocked(
                    f"datastore {decl.name!r}: listing the LUNs of {decl.target_iqn} stopped at target {stopped_at}, which "
                    f"comes first on {portal_url(host, port)} and refused this host: "
                    f"{why[-300:]}") from None
            raise
        log.warning("event=libiscsi.listing_stopped datastore=%s stopped_at=%s; the datastore's target was listed before",
                    decl.name, stopped_at)
    sections = _sections(out)
    if decl.target_iqn not in sections:
        raise NotFound(f"target {decl.target_iqn} is not offered by {portal_url(host, port)}")
    return sections[decl.target_iqn]


def list_luns(runner: CommandRunner, decl: DatastoreDecl, *, initiator_iqn: str, secret: str, timeout: float) -> list[LibiscsiLun]:
    """Disk LUNs of the datastore's target (controller LUN 0 and non-disk LUNs skipped)."""
    return [LibiscsiLun(f"{decl.target_iqn}/{n}", n, lun_size(runner, decl, n, secret=secret, timeout=timeout))
            for n, kind in _target_luns(runner, decl, initiator_iqn=initiator_iqn, secret=secret, timeout=timeout)
            if kind == "DIRECT_ACCESS"]


#: What libiscsi (through qemu-img) prints when no target answers at the portal, as opposed
#: to a target that answers and refuses the LUN (a SCSI sense: "SENSE KEY:ILLEGAL_REQUEST").
_UNREACHABLE = ("iscsi_service failed", "Connection refused", "timed out", "No route to host", "Network is unreachable")


def unreachable(stderr: str) -> bool:
    """Whether a libiscsi failure means the array did not answer (UNAVAILABLE, retryable)
    rather than that the LUN is not there (NOT_FOUND): seen with tgtd killed, "iSCSI: Failed to
    connect to LUN : iscsi_service failed with : iscsi_service_reconnect_if_loggedin"."""
    return "SENSE KEY" not in stderr and any(m in stderr for m in _UNREACHABLE)


def lun_size(runner: CommandRunner, decl: DatastoreDecl, lun: int, *, secret: str, timeout: float, field: str = "") -> int:
    argv = [qemuimg.QEMU_IMG, "info", "--output=json", "-f", "raw", lun_url(decl, lun)]
    try:
        data = qemuimg._json(_run(runner, decl, argv, secret=secret, timeout=timeout, field=field), " ".join(argv))
    except CommandError as exc:
        where = f"{field}: " if field else ""
        err = exc.result.stderr.strip()
        if unreachable(err):
            raise Unavailable(f"{where}the iSCSI target {decl.target_iqn} of datastore {decl.name!r} does not answer "
                              f"({err[-200:]}); retry when the array answers again", field=field) from None
        raise NotFound(f"{where}LUN {lun} of {decl.target_iqn} on datastore {decl.name!r} cannot be opened: "
                       f"{err[-300:]}", field=field) from None
    return int(data.get("virtual-size", 0))  # only the size: "filename" carries the credentials


def probe(runner: CommandRunner, decl: DatastoreDecl, *, initiator_iqn: str, secret: str, timeout: float) -> tuple[bool, str]:
    """Log in to the datastore's target and list its LUNs: I/O the target must answer (a stopped
    tgtd does not), and a login it refuses (a wrong CHAP secret) shows in the health's reason
    instead of a datastore that looks healthy until the first VM uses it. When another target
    on the portal blocks the listing, discovery alone (no login) must offer the target."""
    try:
        _target_luns(runner, decl, initiator_iqn=initiator_iqn, secret=secret, timeout=timeout)
    except ListingBlocked:
        argv = ["iscsi-ls"]
        if initiator_iqn:
            argv += ["-i", initiator_iqn]
        host, port = decl.portal_hosts()[0]
        argv.append(f"iscsi://{portal_url(host, port)}")
        if decl.target_iqn not in _sections(_run(runner, decl, argv, secret=secret, timeout=timeout)):
            raise NotFound(f"target {decl.target_iqn} is not offered by {host}:{port}") from None
    return True, ""
